""""Generate Ckpt": merge a LoRA into a checkpoint the web UI's txt2img loads.

Each adapted weight becomes `W + weight * (alpha / rank) * up @ down`, computed
in fp32 and cast to the output dtype. The merge goes either into the working
model's own weights (streamed tensor by tensor through `export_checkpoint`) or into
any other original-layout checkpoint of the same family (`into`), whose keys,
shapes and other tensors are kept exactly. The file is written under a
temporary name and renamed at the end, so a failure leaves nothing under the
final name, and an existing file is never replaced unless asked.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .architecture import config_beside, read_spec
from .compat import installed_clip_name
from .checkpoint import MODEL_INFO_FILE, ORIGINAL_CONFIG_FILE, PART_FILES, export_checkpoint, is_text_part, load_model_spec
from .checkpoint_io import FORMATS, BackgroundSha256, CheckpointReader, file_sha256, save_checkpoint
from .config import ModelInfo, param
from .errors import ConfigError, ModelError
from .fileio import atomic_write_text
from .hash_cache import HashCache
from .host import ModelsDir, validate_model_name
from .kohya import KohyaLora, Target, read_kohya_lora, resolve, target_table
from .leftovers import clean_leftovers
from .modellock import model_lock
from .modelspec import modelspec
from .safetensors_stream import Layout, data_section_start, read_layout, write_safetensors
from .source_hash import source_sha256

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass
class MergeOptions:
    """The "Generate Ckpt" settings, with the labels the UI and the command line show."""

    lora: str = param("", "Lora Model", "LoRA file to merge: a path or a name in the Lora folder. Blank: the model's latest LoRA.")
    into: str = param("", "Merge Into", "Checkpoint of the same family to merge into (path or name in Stable-diffusion). Blank: the model's own weights.")
    unet_weight: float = param(1.0, "Lora Weight", "Strength of the UNet part of the LoRA; 0 leaves the UNet as it was.")
    text_weight: float = param(1.0, "Lora Text Weight", "Strength of the text-encoder part of the LoRA; 0 leaves the text encoder as it was.")
    half: bool = param(False, "Half Model", "Write the weights as fp16: half the file size.")
    subdir: bool = param(False, "Save Checkpoint to Subdirectory", "Put the checkpoint in a folder named after the model inside Stable-diffusion.")
    fmt: str = param("safetensors", "Checkpoint Format", "safetensors (safe to share) or ckpt (for old tools).", choices=FORMATS)
    custom_name: str = param("", "Custom Model Name", "Name of the checkpoint file; blank: the model's name.")


def _no_progress(message: str, fraction: float) -> None:
    pass


def merge_lora(models: ModelsDir, model_name: str, *, lora: str | None = None, into: str | None = None,
               unet_weight: float = 1.0, text_weight: float = 1.0, half: bool = False, subdir: bool = False,
               fmt: str = "safetensors", custom_name: str | None = None, overwrite: bool = False,
               progress: Progress | None = None) -> Path:
    """"Generate Ckpt": merge a LoRA into the model (or into `into`) and write the checkpoint; return its path.

    The file is `models.checkpoints/[<name>/]<name>_<lifetime steps>_lora.<fmt>`
    where <name> is `custom_name` or the model's name; SD 2.x-v models and
    non-standard configs get their `.yaml` beside it.
    Raises ModelError for a missing model or LoRA and for a LoRA that does not
    fit (another family, unmatched keys, wrong shapes, non-finite result),
    ConfigError for a bad option, CheckpointError for an unreadable file and
    OutputExistsError (a FileExistsError) when the output exists and `overwrite` is False, ModelBusy
    while another job (training) is writing the model.
    """
    with model_lock(models.existing_model_dir(model_name), "merge"):
        return _merge_lora(models, model_name, lora=lora, into=into, unet_weight=unet_weight,
                           text_weight=text_weight, half=half, subdir=subdir, fmt=fmt, custom_name=custom_name,
                           overwrite=overwrite, progress=progress)


def _merge_lora(models: ModelsDir, model_name: str, *, lora, into, unet_weight, text_weight, half, subdir, fmt,
                custom_name, overwrite, progress) -> Path:
    progress = progress or _no_progress
    model_dir = models.existing_model_dir(model_name)
    info = ModelInfo.load(model_dir / MODEL_INFO_FILE)
    _check_options(fmt, unet_weight, text_weight)
    lora_path = find_lora(models, info, lora)
    out_path = output_path(models, info, custom_name=custom_name, subdir=subdir, fmt=fmt)
    clean_leftovers(out_path.parent)  # what a killed merge left
    source = _find_into(models, into) if into else None
    if source is not None and source.resolve() == out_path.resolve():
        raise ConfigError(f"Merge Into: {source} is the file the merge would write; choose another Custom Model Name")
    yaml_text = source_yaml(source) if source is not None else model_yaml(model_dir, info)
    _refuse_existing(out_path, yaml_text, overwrite)

    progress(f"Reading {lora_path.name}", 0.0)
    kohya = read_kohya_lora(lora_path)
    _refuse_no_op(kohya)
    log.info("Merging %s (%d modules) into %s", lora_path.name, len(kohya.modules), source.name if source else model_name)
    metadata = {"lora_trainer_model": info.model_name, "lora_trainer_lifetime_steps": str(info.lifetime_steps),
                "lora_trainer_lora": lora_path.name, "lora_trainer_lora_sha256": file_sha256(lora_path),
                "lora_trainer_unet_weight": repr(float(unet_weight)), "lora_trainer_text_weight": repr(float(text_weight))}
    weights = {"unet": float(unet_weight), **{te.part: float(text_weight) for te in info.family.text_encoders}}
    if source is None:
        _merge_into_model(models, model_dir, info, kohya, out_path, weights, half=half, fmt=fmt, metadata=metadata,
                          overwrite=overwrite, progress=progress)
    else:
        _merge_into_checkpoint(source, info, kohya, out_path, weights, half=half, fmt=fmt, metadata=metadata,
                               overwrite=overwrite, progress=progress, hash_cache=models.hash_cache)
    if yaml_text is not None:
        atomic_write_text(out_path.with_suffix(".yaml"), yaml_text)
    progress("Checkpoint written", 1.0)
    log.info("Wrote %s", out_path)
    return out_path


def _refuse_no_op(lora: KohyaLora) -> None:
    """A LoRA whose every up matrix is zero (never trained) would give back the base model unchanged."""
    if lora.modules and all(not module.up.any() for module in lora.modules.values()):
        raise ModelError(f"{lora.path.name}: every up weight is zero, so merging it changes nothing "
                         "(a LoRA saved before any training step?); choose a trained Lora Model")


def _check_options(fmt: str, unet_weight: float, text_weight: float) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"Checkpoint Format ('fmt') must be one of {', '.join(FORMATS)}; got {fmt!r}")
    for label, value in (("Lora Weight ('unet_weight')", unet_weight), ("Lora Text Weight ('text_weight')", text_weight)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number; got {value!r}")
    if unet_weight == 0 and text_weight == 0:
        raise ConfigError("Lora Weight ('unet_weight') and Lora Text Weight ('text_weight') are both 0, so the "
                          "merge would change nothing; set either above 0")


def output_path(models: ModelsDir, info: ModelInfo, *, custom_name: str | None = None, subdir: bool = False,
                fmt: str = "safetensors") -> Path:
    """Where the merged checkpoint goes: `[<name>/]<name>_<lifetime steps>_lora.<fmt>` under the checkpoints folder.

    Raises ConfigError when `custom_name` cannot be a file name.
    """
    name = info.model_name
    if custom_name and custom_name.strip():
        try:
            name = validate_model_name(custom_name)
        except ConfigError:
            raise ConfigError(f"Custom Model Name: {custom_name!r} is not allowed; use letters, digits, spaces, '-' or '_'") from None
    folder = models.checkpoints / name if subdir else models.checkpoints
    return folder / f"{name}_{info.lifetime_steps}_lora.{fmt}"


class OutputExistsError(FileExistsError):
    """The merged checkpoint (or its .yaml) exists already; `path` is the file."""

    def __init__(self, path: Path, why: str = "already exists"):
        super().__init__(f"{path} {why}; choose another Custom Model Name or allow overwriting")
        self.path = path
        self.why = why


def _refuse_existing(out_path: Path, yaml_text: str | None, overwrite: bool) -> None:
    if overwrite:
        return
    if out_path.exists():
        raise OutputExistsError(out_path)
    yaml_path = out_path.with_suffix(".yaml")
    if yaml_text is not None and yaml_path.exists() and yaml_path.read_text(encoding="utf-8") != yaml_text:
        raise OutputExistsError(yaml_path, "already exists with another config")


def find_lora(models: ModelsDir, info: ModelInfo, lora: str | None = None) -> Path:
    """The LoRA to merge: `lora` (a path or a name in the Lora folder), else the model's latest LoRA.

    The latest is `info.latest_lora`, else the file `<model name>_<steps>.safetensors`
    with the most steps. Raises ModelError when it cannot be found; never
    falls back silently from a recorded LoRA that is missing.
    """
    if lora and lora.strip():
        text = lora.strip()
        direct = Path(text).expanduser()
        if direct.is_file():
            return direct
        for candidate in models.list_loras():
            if text in (candidate, candidate.rsplit(".", 1)[0], Path(candidate).name, Path(candidate).stem):
                return models.lora / candidate
        found = ", ".join(models.list_loras()[:5]) or "none"
        raise ModelError(f"Lora Model: {lora!r} not found as a file nor under {models.lora} (found: {found})")
    if info.latest_lora:
        recorded = models.lora / info.latest_lora
        if recorded.is_file():
            return recorded
        raise ModelError(f"Lora Model: the model's latest LoRA {info.latest_lora!r} is missing from {models.lora}; "
                         "choose a LoRA file")
    pattern = re.compile(rf"{re.escape(info.model_name)}_(\d+)\.safetensors")
    steps = {p: int(m.group(1)) for p in models.lora.rglob("*.safetensors") if (m := pattern.fullmatch(p.name))} \
        if models.lora.is_dir() else {}
    if not steps:
        raise ModelError(f"Lora Model: no LoRA for model {info.model_name!r} in {models.lora}; train the model first or choose a LoRA file")
    newest = max(steps, key=lambda p: (steps[p], p.stat().st_mtime))
    log.info("Using the model's newest LoRA %s", newest.name)
    return newest


def _find_into(models: ModelsDir, into: str) -> Path:
    try:
        return models.find_checkpoint(into)
    except ModelError as e:
        raise ModelError(str(e).replace("Source Checkpoint", "Merge Into", 1)) from None


def model_yaml(model_dir: Path, info: ModelInfo) -> str | None:
    """The config to write beside a merge of the model: needed for v-prediction and non-standard configs."""
    path = model_dir / ORIGINAL_CONFIG_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return text if info.family.yaml_needed(info.model_type, text) else None


def source_yaml(source: Path) -> str | None:
    """The source's own config beside it, if any: without one the web UI recognises the merge as it did the source."""
    path = config_beside(source)
    return path.read_text(encoding="utf-8") if path is not None else None


class Merger:
    """Adds the resolved LoRA modules to weights as they stream past, one tensor at a time."""

    def __init__(self, lora: KohyaLora, targets: dict[str, Target], weights: dict[str, float], *, half: bool,
                 progress: Progress, span: tuple[float, float]):
        self.lora, self.targets, self.weights, self.half = lora, targets, weights, half
        self.active = [n for n, t in targets.items() if weights[t.part] != 0]
        self.by_diffusers: dict[tuple[str, str], list[str]] = {}
        self.by_original: dict[str, list[str]] = {}
        for name in self.active:
            target = targets[name]
            self.by_diffusers.setdefault((target.part, target.diffusers_key), []).append(name)
            self.by_original.setdefault(target.original_key, []).append(name)
        self.done: set[str] = set()
        self.progress, self.span = progress, span
        self.bar = tqdm(total=len(self.active), desc=f"Merging {lora.path.name}", unit="module")

    def diffusers_hook(self, part: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """For `export_checkpoint`: the merged tensor of one diffusers weight."""
        names = self.by_diffusers.get((part, key))
        return self._merge(tensor, names, whole=True) if names else tensor

    def original_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merged (and, for Half Model, halved) tensor of one original-layout key."""
        names = self.by_original.get(key)
        if names:
            return self._merge(tensor, names, whole=False)
        return tensor.half() if self.half and tensor.is_floating_point() else tensor

    def _merge(self, tensor: torch.Tensor, names: list[str], *, whole: bool) -> torch.Tensor:
        out_dtype = torch.float16 if self.half else tensor.dtype
        if any(self.lora.modules[name].dora_scale is not None for name in names):
            result = self._merge_whole(tensor, names, whole=whole).to(out_dtype)
            if not _all_finite(result):
                self._refuse_non_finite(names[0])
        else:
            result = self._merge_in_chunks(tensor, names, whole=whole, out_dtype=out_dtype)
        self.done.update(names)
        self.bar.update(len(names))
        start, end = self.span
        self.progress(f"Merged {names[0]}", start + (end - start) * len(self.done) / max(len(self.active), 1))
        return result

    def _updates(self, names: list[str], rows: int, *, whole: bool) -> list[tuple[str, int, int, torch.Tensor, torch.Tensor, float]]:
        """(name, first row, end row, up [rows, rank] fp32, down [rank, in] fp32, scale) of each plain module."""
        updates = []
        for name in names:
            target, module = self.targets[name], self.lora.modules[name]
            first, end = (0, rows) if whole or target.rows is None else target.rows
            updates.append((name, first, end, module.up.flatten(1).float(), module.down.flatten(1).float(),
                            self._scale(name)))
        return updates

    def _scale(self, name: str) -> float:
        """The factor of module `name`'s up @ down: its part's Lora Weight times alpha / rank."""
        module = self.lora.modules[name]
        return self.weights[self.targets[name].part] * module.alpha / module.rank

    def _merge_in_chunks(self, tensor: torch.Tensor, names: list[str], *, whole: bool,
                         out_dtype: torch.dtype) -> torch.Tensor:
        """W + scale * up @ down for plain LoRA modules, a block of rows at a time.

        Each block is cast to fp32 into one reused buffer small enough to stay in the CPU's cache, gets
        every module's rows added in one fused product (`addmm_`), is checked (NaN, inf, or beyond the
        output dtype's range) and is cast into the output. Per element that is the arithmetic of the whole
        tensor in fp32, without a full fp32 copy of the weight to allocate and walk three times.
        """
        source = tensor.reshape(tensor.shape[0], -1)
        result = torch.empty(source.shape, dtype=out_dtype)
        updates = self._updates(names, source.shape[0], whole=whole)
        step = max(1, _CHUNK_ELEMENTS // max(source.shape[1], 1))
        buffer = torch.empty(min(step, source.shape[0]), source.shape[1], dtype=torch.float32)
        limit = torch.finfo(out_dtype).max
        for first in range(0, source.shape[0], step):
            end = min(first + step, source.shape[0])
            block = buffer[:end - first]
            block.copy_(source[first:end])
            for _, lo, hi, up, down, scale in updates:
                a, b = max(lo, first), min(hi, end)
                if a < b:
                    block[a - first:b - first].addmm_(up[a - lo:b - lo], down, alpha=scale)
            low, high = torch.aminmax(block)
            if not (-limit <= float(low) and float(high) <= limit):  # NaN fails both comparisons
                self._refuse_non_finite(next((u[0] for u in updates if u[1] < end and u[2] > first), names[0]))
            result[first:end].copy_(block)
        return result.reshape(tensor.shape)

    def _merge_whole(self, tensor: torch.Tensor, names: list[str], *, whole: bool) -> torch.Tensor:
        """The merged weight in fp32, for modules (DoRA) whose delta depends on the whole merged weight."""
        merged = tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        for name in names:
            target = self.targets[name]
            rows = None if whole else target.rows
            view = merged if rows is None else merged[rows[0]:rows[1]]
            module = self.lora.modules[name]
            if module.dora_scale is None:
                view.view(view.shape[0], -1).addmm_(module.up.flatten(1).float(), module.down.flatten(1).float(),
                                                    alpha=self._scale(name))
            else:
                view += self.weights[target.part] * module.delta(view).reshape(view.shape)
        return merged

    def _refuse_non_finite(self, name: str) -> None:
        raise ModelError(f"{self.lora.path.name}: merging module {name} gives non-finite values (NaN or inf, or "
                         "beyond the output's number range); the LoRA is broken (e.g. NaN from fp16 training) or "
                         "the Lora Weight is too large")

    def close(self) -> None:
        self.bar.close()


# fp32 elements per block of rows in `Merger._merge_in_chunks`: 512 KB, within a core's L2 cache.
_CHUNK_ELEMENTS = 1 << 17


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is a number (no NaN or inf), in one pass without a mask tensor.

    A NaN or inf element makes the fp32 sum non-finite; only when the sum is not finite (which finite
    values can also give, by overflowing) are the elements looked at one by one.
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def _merge_into_model(models: ModelsDir, model_dir: Path, info: ModelInfo, lora: KohyaLora, out_path: Path,
                      weights: dict[str, float], *, half: bool, fmt: str, metadata: dict[str, str], overwrite: bool,
                      progress: Progress) -> None:
    spec = load_model_spec(model_dir)
    targets = resolve(lora, target_table(spec), family=info.family.name,
                      where=f"the model {info.model_name!r}")
    merger = Merger(lora, targets, weights, half=half, progress=progress, span=(0.05, 0.9))
    metadata = {**modelspec(info.model_type, info.resolution, info.prediction_type, out_path.stem),
                "lora_trainer_base": info.source_checkpoint, **metadata}

    def export_progress(message: str, fraction: float) -> None:
        if fraction >= 0.75:  # export's last step is saving the file
            progress(message, 0.9 + 0.1 * fraction)

    _check_targets_stored(model_dir, spec, targets)
    # The source's hash, when no job has needed it yet, is computed while the checkpoint is written.
    with source_sha256(models, info) as sha256:
        base_hash = {"lora_trainer_base_sha256": sha256.result}
        if not sha256.pending:
            metadata, base_hash = {**metadata, "lora_trainer_base_sha256": sha256.result()}, {}
        try:
            export_checkpoint(model_dir, out_path, fmt=fmt, half=half, hook=merger.diffusers_hook, metadata=metadata,
                              deferred=base_hash, overwrite=overwrite, progress=export_progress)
        finally:
            merger.close()


def _merge_into_checkpoint(source: Path, info: ModelInfo, lora: KohyaLora, out_path: Path, weights: dict[str, float], *,
                           half: bool, fmt: str, metadata: dict[str, str], overwrite: bool, progress: Progress,
                           hash_cache: HashCache) -> None:
    with CheckpointReader(source) as reader:
        spec = read_spec(reader)
        family = spec.family
        if family is not info.family:
            raise ModelError(f"Merge Into: {source.name} is {family.title}, the model {info.model_name!r} is "
                             f"{info.family.title}; choose a checkpoint of the same family")
        targets = resolve(lora, target_table(spec), family=family.name, where=source.name)
        _check_targets_in(reader, targets)
        metadata = {**modelspec(spec.model_type, spec.resolution, spec.prediction_type, out_path.stem),
                    "lora_trainer_base": source.name, **metadata}
        merger = Merger(lora, targets, weights, half=half, progress=progress, span=(0.05, 0.95))
        layout = _output_layout(reader, half)
        merged = ((key, merger.original_tensor(key, reader.get(key))) for key in layout)
        # The source's hash is computed while the tensors are merged and written (a whole pass over the file
        # before them cost as much as the merge itself); a .safetensors header gets it filled in at the end.
        with BackgroundSha256(source, hash_cache) as sha256:
            try:
                if fmt == "safetensors":
                    # Tensors are written as they are merged: peak memory is one tensor, not the checkpoint. In the
                    # source's order, with its data at the same offsets within a page: the kernel copies the
                    # unchanged ones fastest so.
                    write_safetensors(out_path, layout, merged, metadata=metadata,
                                      overwrite=overwrite, deferred={"lora_trainer_base_sha256": sha256.result},
                                      data_start=_data_start(reader))
                else:
                    tensors = dict(merged)
                    metadata["lora_trainer_base_sha256"] = sha256.result()
                    save_checkpoint(tensors, out_path, fmt=fmt, metadata=metadata, overwrite=overwrite)
            finally:
                merger.close()


def _data_start(reader: CheckpointReader) -> int | None:
    """Where the source's tensor data starts, for a `.safetensors` source (a `.ckpt`'s is not copied)."""
    return data_section_start(reader.path) if reader.path.suffix.lower() == ".safetensors" else None


def _output_layout(reader: CheckpointReader, half: bool) -> Layout:
    """Dtype and shape of every output tensor, in the source's order (Half Model: floats become fp16)."""
    if reader.path.suffix.lower() == ".safetensors":
        layout = read_layout(reader.path)  # in the order of the data in the file
    else:  # a .ckpt is memory-mapped: looking at its tensors reads nothing
        layout = {key: (reader.get(key).dtype, tuple(reader.get(key).shape)) for key in reader.keys()}
    return {key: (torch.float16 if half and dtype.is_floating_point else dtype, shape)
            for key, (dtype, shape) in layout.items()}


def _check_targets_stored(model_dir: Path, spec, targets: dict[str, Target]) -> None:
    """Raises ModelError when the working model's files lack a weight the LoRA adapts (a damaged model)."""
    from safetensors import safe_open

    for part in {t.part for t in targets.values()}:
        path = model_dir / part / PART_FILES[part]
        try:
            with safe_open(str(path), framework="pt") as f:
                # The text encoder is stored with canonical `text_model.` names.
                stored = {installed_clip_name(k, spec.family.text_encoder(part).with_projection) if is_text_part(part)
                          else k for k in f.keys()}
        except Exception as e:  # missing or damaged file: safetensors has its own error types
            raise ModelError(f"{path}: cannot be read ({type(e).__name__}); create the model again") from None
        missing = sorted(t.diffusers_key for t in targets.values() if t.part == part and t.diffusers_key not in stored)
        if missing:
            raise ModelError(f"{path}: lacks {len(missing)} weights the LoRA adapts (e.g. {missing[0]}); create the model again")


def _check_targets_in(reader: CheckpointReader, targets: dict[str, Target]) -> None:
    """Raises ModelError when the checkpoint lacks a weight the LoRA adapts, or holds it in another shape."""
    for name, target in targets.items():
        if target.original_key not in reader:
            raise ModelError(f"{reader.path.name}: has no {target.original_key}, which LoRA module {name} adapts")
        shape = reader.get_slice_shape(target.original_key)
        rows = target.rows or (0, shape[0])
        if (rows[1] - rows[0], *shape[1:]) != target.shape:
            raise ModelError(f"{reader.path.name}: {target.original_key} has shape {shape}, "
                             f"LoRA module {name} expects {target.shape}")
