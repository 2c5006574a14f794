"""The state a later run of the same model continues from, kept in the model folder.

`<model>/resume/` holds the adapters in full precision (`lora.safetensors`,
kohya keys), the optimizer's state (`optimizer.safetensors`: AdamW moments
and step counts, or 8-bit AdamW's moments with their quantile maps and scales,
as tensors, the rest as JSON in its metadata; a pickle would
be refused by the web UI's checked `torch.load` when written by a newer torch) and `state.json` (lifetime steps and the LoRA file it belongs to). It
is rewritten, as a whole and atomically, whenever a LoRA is saved, so a crash
or a Cancel loses at most the steps since the last save. `state.json` also
holds the run's plan (its settings, concepts, pictures, seed, step count and
the model info it started from) and `position.safetensors` where it stood
(see `position.py`): a run that stopped before its planned end is finished by
the next run with the same settings, exactly as if it had never stopped. Without it (deleted,
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
from ..config import Concept, ModelInfo, TrainingParams
from ..errors import ModelError
from ..fileio import atomic_dir
from ..lora import read_lora
from ..safetensors_stream import read_layout
from .position import POSITION_FILE, RunPosition, load_position, save_position

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
ADAPTERS_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
# Settings that change neither what a step computes nor how many steps a run has: changing them
# between a cancel and the next start still finishes the interrupted run.
NOT_PART_OF_THE_RUN = ("new_run", "save_every_n_steps", "save_preview_every_n_steps")
EMA_FILE = "ema.safetensors"


@dataclass
class ResumeState:
    adapters: dict[str, torch.Tensor]
    optimizer: dict | None
    source: str            # where the adapters came from, for messages
    lifetime_steps: int


@dataclass
class InterruptedRun:
    """A run that stopped before its planned end, to be finished: its plan and where it stood."""

    plan: dict
    position: RunPosition

    @property
    def start_info(self) -> ModelInfo:
        return ModelInfo.from_dict(self.plan["start_info"])

    @property
    def seed(self) -> int:
        return int(self.plan["seed"])

    @property
    def total_steps(self) -> int:
        return int(self.plan["total_steps"])


def run_plan(params: TrainingParams, concepts: list[Concept], pictures: list[str], *, seed: int, total_steps: int,
             start_info: ModelInfo, started_at: float) -> dict:
    """What defines a run (compared when it is started again) and what it started from."""
    return {"settings": run_settings(params), "concepts": [c.to_dict() for c in concepts], "pictures": pictures,
            "seed": seed, "total_steps": total_steps, "start_info": start_info.to_dict(), "started_at": started_at}


def run_settings(params: TrainingParams) -> dict:
    return {k: v for k, v in params.to_dict().items() if k not in NOT_PART_OF_THE_RUN}


def save_resume_state(model_dir: Path, adapters: dict[str, torch.Tensor], optimizer_state: dict | None, *,
                      lifetime_steps: int, lora_file: str, plan: dict | None = None,
                      position: RunPosition | None = None, ema: dict[str, torch.Tensor] | None = None) -> None:
    """Replace `<model>/resume/` with the current adapters, optimizer state (and the EMA averages) and the
    run's plan and position (after `position.step` steps of it), atomically."""
    state = {"lifetime_steps": lifetime_steps, "lora": lora_file}
    if plan is not None and position is not None:
        state["run"] = {**plan, "steps": position.step}
    moments = [v for entry in (optimizer_state or {}).get("state", {}).values() for v in entry.values()
               if torch.is_tensor(v)]
    need = sum(v.numel() * 4 for v in adapters.values()) + sum(v.numel() * v.element_size()
                                                             for v in [*moments, *(ema or {}).values()])
    with atomic_dir(Path(model_dir) / RESUME_DIR, overwrite=True, need=need) as tmp:
        save_checkpoint({k: v.float() if v.is_floating_point() else v for k, v in adapters.items()},
                        tmp / ADAPTERS_FILE, overwrite=True)
        if optimizer_state is not None:
            save_optimizer_state(optimizer_state, tmp / OPTIMIZER_FILE)
        if ema is not None:
            save_checkpoint(ema, tmp / EMA_FILE, overwrite=True)
        if "run" in state:
            save_position(position, tmp / POSITION_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def interrupted_run(model_dir: Path, info: ModelInfo, params: TrainingParams, concepts: list[Concept],
                    pictures: list[str]) -> InterruptedRun | None:
    """The model's last run when it stopped before its planned end and this run is the same one started
    again (same settings, concepts and pictures; "Start a New Run" off); None otherwise, saying why
    when a run was left unfinished."""
    folder = Path(model_dir) / RESUME_DIR
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        run = state["run"]
        done, total = int(run["steps"]), int(run["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no run recorded (an older model, a full fine-tune, or never trained)
    if done >= total or int(state.get("lifetime_steps", -1)) != info.lifetime_steps:
        return None
    stopped = f"The last run of {info.model_name} stopped at step {done} of {total}"
    if params.new_run:
        log.info("%s; starting a new run from what it learned, as Start a New Run ('new_run') asks", stopped)
        return None
    # A setting added since the interrupted run was planned (e.g. Lora Text Encoder 2 Rank) counts as its default.
    defaults = TrainingParams().to_dict()
    changed = sorted(k for k, v in run_settings(params).items() if run["settings"].get(k, defaults[k]) != v)
    if run["concepts"] != [c.to_dict() for c in concepts]:
        changed.append("concepts")
    if run["pictures"] != pictures:
        changed.append("the pictures")
    if changed:
        log.warning("%s; its settings differ (%s), so a new run starts from what it learned: set them back to "
                    "finish the interrupted run", stopped, ", ".join(changed))
        return None
    try:
        position = load_position(folder / POSITION_FILE)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s, but its position in %s cannot be read (%s); a new run starts from what it learned",
                    stopped, folder, e)
        return None
    return InterruptedRun(run, position)


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
    _check_kinds_fit(source, params)
    fix = f"set it back, or create a new model to start afresh (the last run's adapters are in {source})"
    unet_ranks, unet_alphas = _ranks_and_alphas(source, "lora_unet_")
    if unet_ranks and unet_ranks != {params.rank}:
        raise ModelError(f"Lora UNET Rank ('rank') is {params.rank}, the model was trained with {_one(unet_ranks)}; {fix}")
    if unet_alphas and unet_alphas != {float(params.lora_alpha)}:
        raise ModelError(f"Lora UNET Alpha ('lora_alpha') is {params.lora_alpha:g}, the model was trained with "
                         f"{_one(unet_alphas):g}; {fix}")
    encoders = info.family.text_encoders
    found = [_ranks_and_alphas(source, te.kohya_prefix + "_") for te in encoders]
    if any(ranks for ranks, _ in found) != params.train_text_encoder:
        was = "off" if params.train_text_encoder else "on"
        raise ModelError(f"Train Text Encoder ('train_text_encoder') was {was} when the model was trained; {fix}")
    for index, (ranks, alphas) in enumerate(found):
        rank, alpha, _ = params.text_encoder_lora(index)
        label, suffix = ("Lora Text Encoder", "") if index == 0 else ("Lora Text Encoder 2", "_2")
        if ranks and ranks != {rank}:
            raise ModelError(f"{label} Rank ('text_encoder{suffix}_rank') {_gives(params, f'text_encoder{suffix}_rank', rank)}, "
                             f"the model was trained with {_one(ranks)}; {fix}")
        if alphas and alphas != {float(alpha)}:
            raise ModelError(f"{label} Alpha ('text_encoder{suffix}_alpha') "
                             f"{_gives(params, f'text_encoder{suffix}_alpha', alpha)}, the model was trained with "
                             f"{_one(alphas):g}; {fix}")


def _gives(params: TrainingParams, name: str, value) -> str:
    """"is 8", or for a Text Encoder 2 field left at 0 "is 0 (the first text encoder's: 8)"."""
    own = getattr(params, name)
    return f"is {own:g}" if own else f"is 0 (the first text encoder's: {value:g})"


def _ranks_and_alphas(path: Path, prefix: str, *, conv: bool = False) -> tuple[set[int], set[float]]:
    """Ranks (from shapes: no weight is read) and alphas of the adapters under `prefix` in a LoRA file:
    those of LoCon's larger-than-1x1 convolutions with `conv`, the others without."""
    from safetensors import safe_open

    layout = read_layout(path)
    names = {key[:-len(".lora_down.weight")]: shape for key, (_, shape) in layout.items()
             if key.startswith(prefix) and key.endswith(".lora_down.weight")
             and (len(shape) == 4 and tuple(shape[2:]) != (1, 1)) == conv}
    with safe_open(str(path), framework="pt") as f:
        alphas = {round(float(f.get_tensor(f"{name}.alpha").float().reshape(-1)[0]), 6) for name in names
                  if f"{name}.alpha" in layout}
    return {shape[0] for shape in names.values()}, alphas


def _check_kinds_fit(source: Path, params: TrainingParams) -> None:
    """LoCon Conv Rank / Alpha and Use DoRA as the previous run's adapters were trained. Raises ModelError."""
    fix = f"set it back, or create a new model to start afresh (the last run's adapters are in {source})"
    ranks, alphas = _ranks_and_alphas(source, "lora_unet_", conv=True)
    trained = _one(ranks) if ranks else 0
    if trained != params.conv_rank:
        raise ModelError(f"LoCon Conv Rank ('conv_rank') is {params.conv_rank}, the model was trained with {trained}; {fix}")
    if alphas and alphas != {float(params.conv_alpha)}:
        raise ModelError(f"LoCon Conv Alpha ('conv_alpha') is {params.conv_alpha:g}, the model was trained with "
                         f"{_one(alphas):g}; {fix}")
    dora = any(key.endswith(".dora_scale") for key in read_layout(source))
    if dora != params.use_dora:
        raise ModelError(f"Use DoRA ('use_dora') was {'on' if dora else 'off'} when the model was trained; {fix}")


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


def load_ema_state(model_dir: Path) -> dict[str, torch.Tensor] | None:
    """The EMA averages kept with the resume state; None when there are none (or they cannot be read)."""
    path = Path(model_dir) / RESUME_DIR / EMA_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # a damaged file: the average starts again from the resumed weights
        log.warning("Ignoring the EMA state %s (%s); the average starts again", path, e)
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
    # Through our own writer, as every other file: safetensors' save_file gives its file mode 0600,
    # and a full disk then gives its one line.
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
