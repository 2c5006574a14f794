"""Original-layout checkpoints <-> diffusers model folders ("Create Model" and back).

`create_model` converts one part at a time (UNet, VAE, text encoder), checks
each strictly against the diffusers model it must load into, and writes it
before reading the next, so peak memory stays near one copy of the largest
part. Everything goes into a temporary folder that is renamed into place at
the end. Tensors of the checkpoint that no diffusers part holds (the unused
last OpenCLIP block, DDPM buffers, ...) are kept in `original_extras.safetensors`
so writing the model back gives the original keys and tensors exactly.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import keymap
from .architecture import UNET_PREFIX, ModelSpec, read_spec, spec_from_original_config
from .compat import canonical_clip_name, installed_clip_name
from .checkpoint_io import BackgroundSha256, CheckpointReader, save_checkpoint
from .config import MODEL_INFO_FILE, ModelInfo
from .errors import CheckpointError, ConfigError, ModelError
from .fileio import atomic_dir
from .hash_cache import file_stamp
from .host import ModelsDir, validate_model_name
from .leftovers import clean_leftovers
from .modellock import check_not_busy
from .safetensors_stream import mapped_file, write_safetensors
from .tokenizer import save_tokenizer

log = logging.getLogger(__name__)

EXTRAS_FILE = "original_extras.safetensors"
ORIGINAL_CONFIG_FILE = "original_config.yaml"
PART_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
              "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
EMA_PREFIX = "model_ema."

Progress = Callable[[str, float], None]


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass
class Part:
    name: str
    build: Callable
    links: Callable


PART_BUILDERS = {
    "unet": Part("unet", keymap.build_unet, keymap.unet_links),
    "vae": Part("vae", keymap.build_vae, keymap.vae_links),
    **{part: Part(part, functools.partial(keymap.build_text_encoder, part=part),
                  functools.partial(keymap.text_links, part=part)) for part in ("text_encoder", "text_encoder_2")},
}


def is_text_part(part: str) -> bool:
    return part.startswith("text_encoder")


def ema_key(unet_key: str) -> str:
    """Where ldm's EMA keeps a UNet weight: `model_ema.` + the name without dots."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def create_model(models: ModelsDir, source: str, name: str, *, extract_ema: bool = False,
                 overwrite: bool = False, progress: Progress = _no_progress) -> Path:
    """"Create Model": convert a checkpoint into `models.working/<name>/`; return that folder.

    Raises ConfigError for a bad name or an existing model without `overwrite`,
    CheckpointError for an unreadable, unsafe or unknown checkpoint. On any
    failure nothing is left behind and an existing model is kept as it was.
    """
    name = validate_model_name(name)
    target = models.model_dir(name)
    if target.exists() and not overwrite:
        raise ConfigError(f"Name: a model named {name!r} already exists in {models.working}; choose another name or overwrite it")
    clean_leftovers(models.working, what="Create Model")
    if target.exists():
        check_not_busy(target, "Create Model (overwrite)")
    checkpoint = models.find_checkpoint(source)
    stamp = file_stamp(checkpoint) or (0, 0)
    # The working model holds about what the checkpoint holds (a full disk's message says so).
    with _source_hash(models, checkpoint) as sha256, CheckpointReader(checkpoint) as reader, \
            atomic_dir(target, overwrite=overwrite, need=stamp[0]) as tmp:
        spec = read_spec(reader)
        use_ema = extract_ema and _has_ema(reader)
        if extract_ema and not use_ema:
            log.warning("%s has no EMA weights (model_ema.*); using its normal weights", checkpoint.name)
        used: set[str] = set()
        parts = spec.family.parts
        bar = tqdm(parts, desc=f"Converting {checkpoint.name}", unit="part")
        for i, part in enumerate(bar):
            progress(f"Converting {part}", i / (len(parts) + 2))
            used |= convert_part(reader, spec, part, tmp / part, use_ema=use_ema)
        progress("Writing tokenizer and configs", len(parts) / (len(parts) + 2))
        _save_extras(reader, used, tmp / EXTRAS_FILE)
        for te in spec.family.text_encoders:
            save_tokenizer(tmp / te.tokenizer, pad_token=te.pad_token)
        _save_pipeline_files(spec, tmp)
        progress("Writing the model's info", (len(parts) + 1) / (len(parts) + 2))
        info = ModelInfo(model_name=name, source_checkpoint=_display_name(models, checkpoint),
                         source_checkpoint_hash=sha256.result(), source_checkpoint_size=stamp[0],
                         source_checkpoint_mtime_ns=stamp[1], model_type=spec.model_type,
                         prediction_type=spec.prediction_type, resolution=spec.resolution,
                         revision=reader.global_step or 0, extracted_ema=use_ema)
        info.save(tmp / MODEL_INFO_FILE)
    progress("Model created", 1.0)
    log.info("Created model %s from %s (%s, %s)", name, checkpoint.name, spec.model_type, spec.prediction_type)
    return target


def _source_hash(models: ModelsDir, checkpoint: Path) -> BackgroundSha256:
    """The source's hash when it is known already; else "", computed when a job first needs it
    (`source_hash`), except for a source outside the checkpoints folder: that one cannot be found again
    by its name, so it is hashed now, while the parts are converted."""
    known = models.hash_cache.get(checkpoint)
    if known is not None:
        return BackgroundSha256.known(known)
    if not _in_checkpoints(models, checkpoint):
        return BackgroundSha256(checkpoint, models.hash_cache)
    return BackgroundSha256.known("")


def _in_checkpoints(models: ModelsDir, checkpoint: Path) -> bool:
    return checkpoint.resolve().is_relative_to(models.checkpoints.resolve())


def _display_name(models: ModelsDir, checkpoint: Path) -> str:
    if _in_checkpoints(models, checkpoint):
        return checkpoint.resolve().relative_to(models.checkpoints.resolve()).as_posix()
    return checkpoint.name


def _has_ema(reader: CheckpointReader) -> bool:
    return any(k.startswith(EMA_PREFIX) and k != EMA_PREFIX + "decay" and k != EMA_PREFIX + "num_updates" for k in reader.keys())


def convert_part(reader: CheckpointReader, spec: ModelSpec, part: str, out_dir: Path, *, use_ema: bool = False) -> set[str]:
    """Convert one part, check it strictly, write it to `out_dir`; return the original keys used.

    Raises CheckpointError naming missing, unexpected or misshapen tensors.
    """
    builder = PART_BUILDERS[part]
    model = keymap.meta_model(spec, part)  # names, shapes and config, no memory
    tensors, used = convert_part_tensors(reader, spec, part, use_ema=use_ema, model=model)
    if part == "unet" and spec.model_type == spec.family.provisional:
        spec.family.settle(spec, _materialise(builder.build(spec), tensors))
        model = keymap.meta_model(spec, part)  # the settled spec may change the config
    if is_text_part(part):
        # Canonical `text_model.` names load in every transformers version (>= 5 maps them itself).
        tensors = {canonical_clip_name(k): v for k, v in tensors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, out_dir / PART_FILES[part])
    _save_part_config(part, model, out_dir)
    return used


def convert_part_tensors(reader: CheckpointReader, spec: ModelSpec, part: str, *, use_ema: bool = False,
                         model: torch.nn.Module | None = None) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The diffusers-layout tensors of one part, checked strictly against its model (`model`: that part
    already built on the meta device), and the original keys used.

    Raises CheckpointError naming missing, unexpected or misshapen tensors.
    """
    builder = PART_BUILDERS[part]
    model = model if model is not None else keymap.meta_model(spec, part)
    expected = model.state_dict()
    links = [link for link in builder.links(spec, model) if all(k in reader for k in link.original)]

    def get(key: str) -> torch.Tensor:
        if use_ema and key.startswith(UNET_PREFIX) and ema_key(key) in reader:
            return reader.get(ema_key(key))
        return reader.get(key)

    tensors = keymap.to_diffusers(links, get)
    for key in expected:
        if key not in tensors and key.endswith("position_ids"):
            tensors[key] = torch.arange(expected[key].shape[-1]).expand(expected[key].shape).clone()
    _check_strict(reader.path, part, tensors, expected)
    return tensors, {k for link in links for k in link.original}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # transformers < 4.31 refuses safetensors files without the "format" entry.
    save_checkpoint(tensors, path, metadata={"format": "pt"}, overwrite=True)


def _materialise(model: torch.nn.Module, tensors: dict) -> torch.nn.Module:
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return model.eval()


def _check_strict(path: Path, part: str, tensors: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(tensors) & set(expected) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)})")
    if problems:
        raise CheckpointError(f"{path}: the {part} weights do not fit the detected architecture: {'; '.join(problems)}; "
                              "put the model's original .yaml config beside it with the same base name")


def _save_part_config(part: str, model, out_dir: Path) -> None:
    if is_text_part(part):
        model.config.save_pretrained(str(out_dir))
    else:
        model.save_config(str(out_dir))


def _save_extras(reader: CheckpointReader, used: set[str], path: Path) -> None:
    extras = {k: reader.get(k) for k in reader.keys() if k not in used and not k.startswith(EMA_PREFIX)}
    _save_tensors(extras, path)


def _save_pipeline_files(spec: ModelSpec, folder: Path) -> None:
    import diffusers

    (folder / ORIGINAL_CONFIG_FILE).write_text(spec.original_config, encoding="utf-8")
    scheduler = folder / "scheduler"
    scheduler.mkdir(exist_ok=True)
    config = {"_class_name": "DDIMScheduler", "_diffusers_version": diffusers.__version__, **spec.scheduler}
    (scheduler / "scheduler_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    family = spec.family
    index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
             **family.pipeline_extras, "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for te in family.text_encoders:
        index[te.part] = ["transformers", "CLIPTextModelWithProjection" if te.with_projection else "CLIPTextModel"]
        index[te.tokenizer] = ["transformers", "CLIPTokenizer"]
    index = dict(sorted(index.items()))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def load_model_spec(model_dir: Path) -> ModelSpec:
    """The spec of a working model, from the configs in its folder.

    Raises ModelError when the folder is not a complete working model.
    """
    from transformers import CLIPTextConfig

    names = set(CLIPTextConfig().to_dict())
    try:
        spec = spec_from_original_config((model_dir / ORIGINAL_CONFIG_FILE).read_text(encoding="utf-8"),
                                         source=str(model_dir / ORIGINAL_CONFIG_FILE))
        for te in spec.family.text_encoders:
            text = json.loads((model_dir / te.part / "config.json").read_text(encoding="utf-8"))
            setattr(spec, "text_2" if te.part == "text_encoder_2" else "text", {
                k: v for k, v in text.items() if k in names and not k.startswith("_") and k not in (
                    "architectures", "transformers_version", "model_type", "torch_dtype", "dtype")})
    except FileNotFoundError as e:
        raise ModelError(f"{model_dir}: not a complete model ({Path(e.filename).name} is missing); create it again") from None
    info = ModelInfo.load(model_dir / MODEL_INFO_FILE)
    spec.model_type, spec.prediction_type = info.model_type, info.prediction_type
    return spec


TensorHook = Callable[[str, str, torch.Tensor], torch.Tensor]


def export_checkpoint(model_dir: Path, out_path: Path, *, fmt: str = "safetensors", half: bool = False,
                      hook: TensorHook | None = None, metadata: dict[str, str] | None = None,
                      deferred: dict[str, Callable[[], str]] | None = None, overwrite: bool = False,
                      progress: Progress = _no_progress) -> Path:
    """Write a working model back as one original-layout checkpoint the web UI loads.

    `hook(part, diffusers_key, tensor)` may replace each diffusers tensor on the
    way (the LoRA merge uses it); a `.safetensors` file is written as the tensors
    are made, so only a few made tensors are in memory at once. `half` writes
    floating-point tensors as fp16. `deferred`: metadata entries known only once the tensors are
    written (`write_safetensors`). Raises FileExistsError when `out_path`
    exists and `overwrite` is False; a failure leaves no file at `out_path`.
    """
    spec = load_model_spec(model_dir)
    parts = spec.family.parts
    with contextlib.ExitStack() as mapped:  # the parts' files, while their tensors are written
        stored_parts = {part: _stored_part(model_dir, spec, part, mapped) for part in parts}
        links = {part: [link for link in PART_BUILDERS[part].links(spec) if all(k in stored for k in link.diffusers)]
                 for part, stored in stored_parts.items()}
        extras = load_file(str(model_dir / EXTRAS_FILE)) if (model_dir / EXTRAS_FILE).is_file() else {}

        def halved(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.half() if half and tensor.is_floating_point() else tensor

        def tensors(*, shapes_only: bool = False):
            """(original key, tensor) in the file's order; with `shapes_only`, meta tensors of its dtypes and shapes."""
            written: set[str] = set()
            for i, part in enumerate(tqdm(parts, desc=f"Writing {Path(out_path).name}", unit="part", disable=shapes_only)):
                stored = stored_parts[part]
                if shapes_only:
                    def get(key: str, stored=stored) -> torch.Tensor:
                        return torch.empty_like(stored[key], device="meta")
                else:
                    progress(f"Writing {part}", i / (len(parts) + 1))

                    def get(key: str, part=part, stored=stored) -> torch.Tensor:
                        return hook(part, key, stored[key]) if hook is not None else stored[key]
                for link in links[part]:
                    for key, tensor in keymap.to_original([link], get).items():
                        written.add(key)
                        yield key, halved(tensor)
            for key, tensor in extras.items():
                if key not in written:
                    yield key, halved(tensor.to("meta") if shapes_only else tensor)

        if fmt == "safetensors":
            layout = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors(shapes_only=True)}
            write_safetensors(out_path, layout, tensors(), metadata=metadata, overwrite=overwrite, deferred=deferred)
        else:
            tensors_made = dict(tensors())
            metadata = {**(metadata or {}), **{key: value() for key, value in (deferred or {}).items()}}
            save_checkpoint(tensors_made, out_path, fmt=fmt, metadata=metadata, overwrite=overwrite)
    progress("Saved", 1.0)
    return Path(out_path)


def _stored_part(model_dir: Path, spec: ModelSpec, part: str, mapped: contextlib.ExitStack) -> dict[str, torch.Tensor]:
    """One part of a working model, keyed as the installed transformers names it (read as needed: mapped;
    what is written unchanged is copied file to file while `mapped` is open)."""
    path = model_dir / part / PART_FILES[part]
    stored = load_file(str(path))
    mapped.enter_context(mapped_file(path, stored))
    if is_text_part(part):
        with_projection = spec.family.text_encoder(part).with_projection
        stored = {installed_clip_name(k, with_projection): v for k, v in stored.items()}
    return stored
