"""What a run leaves behind: LoRA files named by steps, the full fine-tune's weights, the model's info.

LoRA files go to the models' `Lora/` folder as `<Custom Model Name or model
name>_<steps>.safetensors`, steps being the model's lifetime steps or, with
"Use Lifetime Steps/Epochs When Saving" off, this run's. An existing file is
never replaced: the new one gets `-2`, `-3`, ... and a warning says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import PART_FILES
from ..checkpoint_io import save_checkpoint
from ..compat import canonical_clip_name
from ..config import MODEL_INFO_FILE, ModelInfo, TrainingParams
from ..errors import ConfigError
from ..host import validate_model_name
from ..lora import lora_metadata, save_lora
from ..safetensors_stream import read_layout

log = logging.getLogger(__name__)


def output_name(info: ModelInfo, params: TrainingParams) -> str:
    """"Custom Model Name", or the model's name. Raises ConfigError when it cannot be a file name."""
    if not params.custom_model_name.strip():
        return info.model_name
    try:
        return validate_model_name(params.custom_model_name)
    except ConfigError:
        raise ConfigError(f"Custom Model Name ('custom_model_name'): {params.custom_model_name!r} is not allowed; "
                          "use letters, digits, spaces, '-' or '_'") from None


def file_steps(params: TrainingParams, lifetime_steps: int, run_steps: int) -> int:
    """The step count a file name carries."""
    return lifetime_steps if params.use_lifetime_steps else run_steps


def free_path(path: Path) -> Path:
    """`path`, or `<stem>-2<suffix>`, `-3`, ... when it is taken (with a warning: nothing is replaced)."""
    if not path.exists():
        return path
    number = 2
    while (candidate := path.with_name(f"{path.stem}-{number}{path.suffix}")).exists():
        number += 1
    log.warning("%s exists already; writing %s instead", path.name, candidate.name)
    return candidate


def lora_file_path(lora_dir: Path, name: str, steps: int) -> Path:
    """`<lora_dir>/<name>_<steps>.safetensors`, or a free variant of it."""
    return free_path(Path(lora_dir) / f"{name}_{steps}.safetensors")


def write_lora(lora_dir: Path, tensors: dict[str, torch.Tensor], info: ModelInfo, params: TrainingParams, *,
               name: str, steps: int, run_steps: int, run_epochs: int, num_images: int, started_at: float,
               finished_at: float, seed: int, source_checkpoint: Path | None) -> Path:
    """Save the adapters as a kohya LoRA with `ss_*` metadata (`info` already updated); return its path."""
    path = lora_file_path(lora_dir, name, steps)
    metadata = lora_metadata(info, params, steps=run_steps, epochs=run_epochs, num_images=num_images,
                             started_at=started_at, finished_at=finished_at, output_name=path.stem, seed=seed,
                             source_checkpoint=source_checkpoint)
    save_lora(path, tensors, metadata, overwrite=False)
    log.info("Saved the LoRA %s", path)
    return path


def info_after(start: ModelInfo, *, run_steps: int, run_epochs: int) -> ModelInfo:
    """The model's info after (part of) a run: revision +1 over the run's start, lifetime
    steps and epochs grown by what the run did so far."""
    info = ModelInfo.from_dict(start.to_dict())
    info.revision = start.revision + 1
    info.lifetime_steps = start.lifetime_steps + run_steps
    info.lifetime_epochs = start.lifetime_epochs + run_epochs
    return info


def save_info(model_dir: Path, info: ModelInfo) -> None:
    """Write model_info.json atomically."""
    info.save(Path(model_dir) / MODEL_INFO_FILE)


def save_full_model(model_dir: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """"Use LORA" off: write the trained UNet (and text encoder) back into the working model.

    Each file is replaced atomically and keeps its keys and dtypes, so Create
    Model's export turns the folder into a checkpoint as before.
    """
    parts = [("unet", unet.state_dict(), str)]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder.state_dict(), canonical_clip_name))
    for part, state, stored_name in parts:
        path = Path(model_dir) / part / PART_FILES[part]
        layout = read_layout(path)
        trained = {stored_name(k): v for k, v in state.items()}
        missing = sorted(set(layout) - set(trained))
        if missing:  # buffers the installed library does not keep (e.g. position_ids): keep the stored ones
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                trained.update({k: f.get_tensor(k) for k in missing})
        tensors = {k: trained[k].detach().to("cpu", dtype=layout[k][0]).contiguous() for k in layout}
        save_checkpoint(tensors, path, metadata={"format": "pt"}, overwrite=True)
    log.info("Saved the fine-tuned weights into %s", model_dir)
