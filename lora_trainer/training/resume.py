"""The state a later run of the same model continues from, kept in the model folder.

`<model>/resume/` holds the adapters in full precision (`lora.safetensors`,
kohya keys), the optimizer's state (`optimizer.safetensors`: AdamW moments
and step counts, or 8-bit AdamW's moments with their quantile maps and scales,
as tensors, the rest as JSON in its metadata; a pickle would
be refused by the web UI's checked `torch.load` when written by a newer torch) and `state.json` (lifetime steps and the LoRA file it belongs to). It
is rewritten, as a whole and atomically, whenever a LoRA is saved, so a crash
or a Cancel loses at most the steps since the last save. Without it (deleted,
or an older model) the model's latest LoRA file is the starting point, with
fresh optimizer moments. A full fine-tune continues from the weights saved in
the model folder; its optimizer state (twice the UNet's size) is not kept.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint_io import save_checkpoint
from ..config import ModelInfo, TrainingParams
from ..errors import ModelError
from ..fileio import atomic_dir
from ..lora import read_lora
from ..safetensors_stream import read_layout

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
ADAPTERS_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


@dataclass
class ResumeState:
    adapters: dict[str, torch.Tensor]
    optimizer: dict | None
    source: str            # where the adapters came from, for messages
    lifetime_steps: int


def save_resume_state(model_dir: Path, adapters: dict[str, torch.Tensor], optimizer_state: dict | None, *,
                      lifetime_steps: int, lora_file: str) -> None:
    """Replace `<model>/resume/` with the current adapters and optimizer state, atomically."""
    with atomic_dir(Path(model_dir) / RESUME_DIR, overwrite=True) as tmp:
        save_checkpoint({k: v.float() if v.is_floating_point() else v for k, v in adapters.items()},
                        tmp / ADAPTERS_FILE, overwrite=True)
        if optimizer_state is not None:
            save_optimizer_state(optimizer_state, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"lifetime_steps": lifetime_steps, "lora": lora_file}, indent=2),
                                      encoding="utf-8")


def previous_adapters(model_dir: Path, lora_dir: Path, info: ModelInfo) -> Path | None:
    """The file a new run of the model takes its adapters from: the resume state's, else the latest LoRA."""
    saved = Path(model_dir) / RESUME_DIR / ADAPTERS_FILE
    if saved.is_file():
        return saved
    latest = Path(lora_dir) / info.latest_lora if info.latest_lora else None
    return latest if latest is not None and latest.is_file() else None


def check_resume_fits(model_dir: Path, lora_dir: Path, info: ModelInfo, params: TrainingParams) -> None:
    """Before any weight is loaded: the previous run's adapters fit this run's rank, alpha and Train
    Text Encoder. Raises ModelError naming the option and the value the model was trained with."""
    source = previous_adapters(model_dir, lora_dir, info) if params.use_lora else None
    if source is None:
        return
    found = {prefix: _ranks_and_alphas(source, prefix) for prefix in ("lora_unet_", "lora_te_")}
    fix = f"set it back, or create a new model to start afresh (the last run's adapters are in {source})"
    unet_ranks, unet_alphas = found["lora_unet_"]
    text_ranks, text_alphas = found["lora_te_"]
    if unet_ranks and unet_ranks != {params.rank}:
        raise ModelError(f"Lora UNET Rank ('rank') is {params.rank}, the model was trained with {_one(unet_ranks)}; {fix}")
    if unet_alphas and unet_alphas != {float(params.lora_alpha)}:
        raise ModelError(f"Lora UNET Alpha ('lora_alpha') is {params.lora_alpha:g}, the model was trained with "
                         f"{_one(unet_alphas):g}; {fix}")
    if bool(text_ranks) != params.train_text_encoder:
        was = "on" if text_ranks else "off"
        raise ModelError(f"Train Text Encoder ('train_text_encoder') was {was} when the model was trained; {fix}")
    if text_ranks and text_ranks != {params.text_encoder_rank}:
        raise ModelError(f"Lora Text Encoder Rank ('text_encoder_rank') is {params.text_encoder_rank}, the model was "
                         f"trained with {_one(text_ranks)}; {fix}")
    if text_alphas and text_alphas != {float(params.text_encoder_alpha)}:
        raise ModelError(f"Lora Text Encoder Alpha ('text_encoder_alpha') is {params.text_encoder_alpha:g}, the model "
                         f"was trained with {_one(text_alphas):g}; {fix}")


def _ranks_and_alphas(path: Path, prefix: str) -> tuple[set[int], set[float]]:
    """Ranks (from shapes: no weight is read) and alphas of the adapters under `prefix` in a LoRA file."""
    from safetensors import safe_open

    layout = read_layout(path)
    ranks = {shape[0] for key, (_, shape) in layout.items()
             if key.startswith(prefix) and key.endswith(".lora_down.weight")}
    with safe_open(str(path), framework="pt") as f:
        alphas = {round(float(f.get_tensor(key).float().reshape(-1)[0]), 6) for key in layout
                  if key.startswith(prefix) and key.endswith(".alpha")}
    return ranks, alphas


def _one(values: set):
    return sorted(values)[0]


def load_resume_state(model_dir: Path, lora_dir: Path, info: ModelInfo) -> ResumeState | None:
    """What the previous run left: the resume folder, else the model's latest LoRA; None for a new model."""
    folder = Path(model_dir) / RESUME_DIR
    if (folder / ADAPTERS_FILE).is_file():
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8")) if (folder / STATE_FILE).is_file() else {}
        if state.get("lifetime_steps", info.lifetime_steps) != info.lifetime_steps:
            log.warning("The resume state in %s is from lifetime step %s, the model is at %d; continuing from it",
                        folder, state.get("lifetime_steps"), info.lifetime_steps)
        return ResumeState(load_file(str(folder / ADAPTERS_FILE)), _load_optimizer(folder / OPTIMIZER_FILE),
                           str(folder / ADAPTERS_FILE), int(state.get("lifetime_steps", info.lifetime_steps)))
    latest = Path(lora_dir) / info.latest_lora if info.latest_lora else None
    if latest is not None and latest.is_file():
        log.info("No resume state in %s; continuing from the LoRA %s with new optimizer state", model_dir, latest.name)
        tensors, _ = read_lora(latest)
        return ResumeState(tensors, None, str(latest), info.lifetime_steps)
    return None


def save_optimizer_state(state: dict, path: Path) -> None:
    """An optimizer's `state_dict()` as safetensors: its tensors by their path (`state.<index>.<name>`, and
    deeper for nested dicts such as bitsandbytes' `__bnb_optimizer_quant_state__`), the rest as JSON."""
    tensors = {}

    def without_tensors(entry: dict, key: str) -> dict:
        plain = {}
        for name, value in entry.items():
            if torch.is_tensor(value):  # a copy each: bitsandbytes' entries share their quantile maps
                tensors[f"{key}.{name}"] = value.detach().cpu().clone()
            else:
                plain[name] = without_tensors(value, f"{key}.{name}") if isinstance(value, dict) else value
        return plain

    plain = {"param_groups": state["param_groups"],
             "state": {str(index): without_tensors(entry, f"state.{index}") for index, entry in state["state"].items()}}
    # Through our own writer, as every other file: safetensors' save_file gives its file mode 0600.
    save_checkpoint(tensors, path, metadata={"optimizer": json.dumps(plain)}, overwrite=True)


def load_optimizer_state(path: Path) -> dict:
    """The `state_dict()` that `save_optimizer_state` wrote."""
    with safe_open(str(path), framework="pt") as f:
        plain = json.loads(f.metadata()["optimizer"])
        state = {int(index): entry for index, entry in plain["state"].items()}
        for key in f.keys():
            _, index, *names = key.split(".")
            entry = state[int(index)]
            for name in names[:-1]:
                entry = entry.setdefault(name, {})
            entry[names[-1]] = f.get_tensor(key)
    return {"state": state, "param_groups": plain["param_groups"]}


def _load_optimizer(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return load_optimizer_state(path)
    except Exception as e:  # a damaged or foreign file: the adapters still resume, the moments start again
        log.warning("Ignoring the optimizer state %s (%s); starting with new optimizer moments", path, e)
        return None


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict | None, groups: list[dict]) -> bool:
    """Load a previous run's optimizer state when it fits; this run's learning rates stay. Returns whether it did."""
    if state is None:
        return False
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        log.warning("The saved optimizer state does not fit (%s); starting with new optimizer moments", e)
        return False
    for group, wanted in zip(optimizer.param_groups, groups):
        group["lr"] = wanted["lr"]
        group.pop("initial_lr", None)
    return True
