"""The peak GPU memory a training run will reserve, predicted on any machine before anything loads.

The real parts of the model (built from its config files) take one real
training step, forward and backward, with the chosen options, on torch's fake
tensors (`fakestep.py`): every operation runs as it would, but no data exists.
What the run keeps all along comes on top, counted from the trained tensors:
the optimizer's state (AdamW, 8-bit AdamW or Prodigy) and the EMA copy. So
does what the caching allocator holds beyond what is allocated; that part
cannot be derived and is calibrated: see `ALLOCATOR_FACTOR` and
docs/training.md for the measured runs it was fitted to and how far the
prediction is from each.

A full-size model takes tens of seconds on a CPU, so what the fake run
measured is kept, keyed by the model's configs and the settings the run reads
(`MEASURED_FIELDS`): in memory, and in the model folder (`CACHE_FILE`), so that
"Check GPU Memory" and the Train that follows it measure once. Settings that
only change what is counted (optimizer, 8-bit Adam, EMA) never run it again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MODEL_INFO_FILE, TrainingParams
from ..errors import ConfigError, ModelError
from .fakestep import StepFigures, measure_run
from .livebytes import allocated_size
from .memory import GB, optimizer_state_tensors

log = logging.getLogger(__name__)

# The released text encoders: CLIP ViT-L/14 (SD 1.x, SDXL's first), OpenCLIP ViT-H/14 up to its penultimate
# layer (SD 2.x) and OpenCLIP ViT-bigG/14 (SDXL's second, with its projection).
STANDARD_TEXT = {
    "clip": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768},
    "openclip": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                 "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                 "projection_dim": 512},
    "openclip-bigg": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                      "projection_dim": 1280}}
# Reserved / allocated at the peak (the caching allocator's rounding and free blocks, cuBLAS and cuDNN
# workspaces): fitted to the five H100 runs of issue 13 (docs/training.md: each within 3% with it).
ALLOCATOR_FACTOR = 1.11
# The TrainingParams fields the fake run reads (test_peak checks that it reads no other): what it measured is
# kept under these, and a change to any other field reuses it.
MEASURED_FIELDS = ("mixed_precision", "use_lora", "rank", "text_encoder_rank", "lora_alpha", "text_encoder_alpha",
                   "text_encoder_2_rank", "text_encoder_2_alpha",
                   "conv_rank", "conv_alpha", "use_dora", "gradient_checkpointing", "train_text_encoder",
                   "resolution", "cache_latents", "cache_text_encoder_outputs", "base_weights")
CACHE_FILE = "peak_cache.json"  # in the model folder: what the fake runs of this model measured
CACHE_ENTRIES = 64              # the most it keeps (the newest)
MEASURE_VERSION = 3             # raised when the fake run changes what it measures: older entries are not used


@dataclass(frozen=True)
class PartConfigs:
    """The configs of a model's parts: diffusers UNet / VAE config dicts and CLIPTextConfig kwargs (the
    second text encoder's for SDXL), and the model type that says how they condition each other."""

    unet: dict
    text_encoder: dict
    vae: dict
    text_encoder_2: dict | None = None
    model_type: str = "sd1"

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "PartConfigs":
        """Read the model type and `<part>/config.json` of each part of a working model.

        Raises ModelError when one is missing or unreadable.
        """
        from ..families import family_of

        def read(path: Path) -> dict:
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ModelError(f"{path}: cannot be read ({e}); create the model again") from None

        model_type = read(Path(model_dir) / MODEL_INFO_FILE).get("model_type", "sd1")
        family = family_of(model_type)
        configs = {part: read(Path(model_dir) / part / "config.json") for part in family.parts}
        return cls(model_type=model_type, **configs)

    @classmethod
    def standard(cls, model_type: str) -> "PartConfigs":
        """The configs of the released models' architecture ("sd1": SD 1.5, "sd2", "sd2-v", "sdxl": SDXL 1.0)."""
        from ..architecture import shipped_config, spec_from_original_config

        spec = spec_from_original_config(shipped_config(model_type))
        if model_type == "sdxl":
            return cls(spec.unet, STANDARD_TEXT["clip"], spec.vae, STANDARD_TEXT["openclip-bigg"], model_type)
        return cls(spec.unet, STANDARD_TEXT["clip" if model_type == "sd1" else "openclip"], spec.vae,
                   model_type=model_type)

    @property
    def parts(self) -> dict:
        return {name: value for name, value in (("unet", self.unet), ("text_encoder", self.text_encoder),
                                                ("vae", self.vae), ("text_encoder_2", self.text_encoder_2))
                if value is not None}

    def key(self) -> str:
        return json.dumps([self.model_type, self.parts], sort_keys=True, default=str)


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes on the GPU at the peak of a run: what stays all run, what one step adds, and the prediction."""

    weights: int       # the parts on the GPU while training, in their dtypes, adapters included
    state: int         # the optimizer's state
    step: int          # the most one training step holds at once above those: activations, gradients
    caching: int       # the most held while caching latents / text-encoder outputs, 0 when neither is cached
    rows: int          # pictures per step (prior preservation doubles the batch)
    ema: int = 0       # the EMA copy of the trained values ("Use EMA")

    @property
    def training(self) -> int:
        """Allocated at the peak of the training steps."""
        return self.weights + self.state + self.ema + self.step

    @property
    def training_reserved(self) -> int:
        """The predicted peak reserved while training (without the caching phases before it)."""
        return round(self.training * ALLOCATOR_FACTOR)

    @property
    def reserved(self) -> int:
        """The predicted peak of torch.cuda.max_memory_reserved over the whole run."""
        return round(max(self.training, self.caching) * ALLOCATOR_FACTOR)


def rows_per_step(params: TrainingParams, prior_preservation: bool) -> int:
    return params.train_batch_size * (2 if prior_preservation else 1)


def estimate_peak(model_dir: Path, params: TrainingParams, *, prior_preservation: bool = True) -> PeakEstimate:
    """The predicted peak for the working model in `model_dir` (see `estimate_for_configs`); what the fake
    run measures is kept in the model folder."""
    return estimate_for_configs(PartConfigs.from_model_dir(model_dir), params, prior_preservation=prior_preservation,
                                cache_dir=model_dir)


def estimate_for_configs(configs: PartConfigs, params: TrainingParams, *, prior_preservation: bool = True,
                         cache_dir: Path | None = None) -> PeakEstimate:
    """The predicted peak of a run of `params` on a CUDA GPU, for a model of `configs`.

    `prior_preservation`: each step holds a class picture beside each instance
    picture. Runs on the CPU (tens of seconds for a full-size model, nothing the
    first time a model's configs and the measured settings are seen); nothing is loaded or allocated.
    `cache_dir`: the model folder, where what was measured is also kept.
    """
    figures = measured(configs, params, rows_per_step(params, prior_preservation), cache_dir)
    state = sum(allocated_size(size) for values in figures.trained for size in optimizer_state_tensors(values, params))
    ema = sum(allocated_size(4 * values) for values in figures.trained) if params.use_ema else 0
    return PeakEstimate(weights=figures.weights, state=state, step=figures.step, caching=figures.caching,
                        rows=figures.rows, ema=ema)


_MEASURED: dict[str, StepFigures] = {}
_MEASURED_LOCK = threading.Lock()


def measured(configs: PartConfigs, params: TrainingParams, rows: int, cache_dir: Path | None = None) -> StepFigures:
    """What the fake run of `params` with `rows` pictures per step measures on a model of `configs`: kept in
    memory and, with `cache_dir`, in its CACHE_FILE, so each is measured once."""
    key = _cache_key(configs, params, rows)
    with _MEASURED_LOCK:
        figures = _MEASURED.get(key)
    if figures is None and cache_dir is not None:
        figures = _read_cache(Path(cache_dir)).get(key)
    if figures is None:
        figures = measure_run(configs.model_type, configs.parts, params, rows)
        if cache_dir is not None:
            _write_cache(Path(cache_dir), key, figures)
    with _MEASURED_LOCK:
        _MEASURED[key] = figures
        while len(_MEASURED) > CACHE_ENTRIES:
            _MEASURED.pop(next(iter(_MEASURED)))
    return figures


def _cache_key(configs: PartConfigs, params: TrainingParams, rows: int) -> str:
    """A digest of what the fake run depends on: configs, measured settings, rows, the libraries' versions."""
    import diffusers
    import transformers

    settings = {name: getattr(params, name) for name in MEASURED_FIELDS}
    text = json.dumps([MEASURE_VERSION, torch.__version__, diffusers.__version__, transformers.__version__,
                       configs.key(), settings, rows], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_cache(folder: Path) -> dict[str, StepFigures]:
    """The model folder's kept measurements; nothing when there are none or they cannot be read."""
    path = folder / CACHE_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {key: StepFigures(**{**value, "trained": tuple(value["trained"])}) for key, value in entries.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # measured again, and written anew
        log.warning("%s cannot be read (%s); the peak is measured again", path, e)
        return {}


def _write_cache(folder: Path, key: str, figures: StepFigures) -> None:
    """Keep `figures` in the folder's CACHE_FILE (the newest CACHE_ENTRIES); a folder that cannot be written
    only loses the time it saves."""
    from ..fileio import atomic_write_text

    entries = {k: v for k, v in _read_cache(folder).items() if k != key}
    entries[key] = figures
    kept = dict(list(entries.items())[-CACHE_ENTRIES:])
    text = json.dumps({k: dataclasses.asdict(v) for k, v in kept.items()}, indent=1)
    try:
        atomic_write_text(folder / CACHE_FILE, text)
    except OSError as e:
        log.warning("The peak prediction cannot be kept in %s (%s); it is measured again next time", folder, e)


def describe_peak(estimate: PeakEstimate) -> str:
    """The predicted peak and what makes it up, for a console or message line."""
    pictures = f"{estimate.rows} picture{'s' if estimate.rows > 1 else ''}"
    line = f"predicted peak {_gb(estimate.reserved)}: weights {_gb(estimate.weights)}, optimizer {_gb(estimate.state)}"
    if estimate.ema:
        line += f", EMA {_gb(estimate.ema)}"
    line += f", a step of {pictures} {_gb(estimate.step)}"
    if estimate.caching > estimate.training:
        line += f", filling the caches {_gb(estimate.caching)}"
    return line + ", plus the allocator's share"


def _gb(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= GB / 10 else f"{size / 2**20:.0f} MB"


# Changes that lower the peak, tried in this order (each on top of the ones before) to name what would fit;
# `_applies` leaves out those that change nothing or that the run could not take.
LOWER_PEAK = (("gradient_checkpointing", True, "tick Gradient Checkpointing"),
              ("mixed_precision", "fp16", "Mixed Precision fp16"),
              ("optimizer", "AdamW", "Optimizer AdamW"),
              ("use_8bit_adam", True, "tick Use 8bit Adam"),
              ("use_ema", False, "untick Use EMA"),
              ("train_text_encoder", False, "untick Train Text Encoder"),
              ("cache_text_encoder_outputs", True, "tick Cache Text Encoder Outputs"),
              ("train_batch_size", 1, "Batch Size 1"),
              ("base_weights", "fp8", "Base Weight Storage fp8"))


def _applies(name: str, params: TrainingParams, device: torch.device | None) -> bool:
    """Whether lowering `name` is worth naming for `params` (see LOWER_PEAK)."""
    if name == "mixed_precision":
        return params.mixed_precision == "no"  # bf16 holds what fp16 holds
    if name == "cache_text_encoder_outputs":
        from ..caption_augment import CaptionAugment

        return not params.train_text_encoder and not CaptionAugment.from_params(params).active
    if name == "base_weights":
        from ..fp8 import fp8_problem

        return params.use_lora and device is not None and fp8_problem(device) is None
    return True


def check_peak(configs: PartConfigs, params: TrainingParams, estimate: PeakEstimate, free: int | None, gpu: str,
               *, prior_preservation: bool = True, cache_dir: Path | None = None,
               device: torch.device | None = None) -> None:
    """Refuse a run predicted to peak above the GPU's `free` bytes, naming changes that would fit.

    `cache_dir`: the model folder (see `estimate_for_configs`); `device`: the GPU, asked whether it can keep
    fp8 base weights (None: they are not named). Raises ConfigError (one line). `free` None: not a GPU,
    nothing to check.
    """
    if free is None or estimate.reserved <= free:
        return
    changes, lowered, fitted = [], params, None
    for name, value, words in LOWER_PEAK:
        if getattr(lowered, name) == value or not _applies(name, lowered, device):
            continue
        lowered = dataclasses.replace(lowered, **{name: value})
        changes.append(words)
        fitted = estimate_for_configs(configs, lowered, prior_preservation=prior_preservation, cache_dir=cache_dir)
        if fitted.reserved <= free:
            break
    head = (f"GPU memory: this run is predicted to peak at {_gb(estimate.reserved)} ({describe_peak(estimate)}), "
            f"{gpu} has {_gb(free)} free")
    if fitted is not None and fitted.reserved <= free:
        raise ConfigError(f"{head}: {', '.join(changes)} would bring it to {_gb(fitted.reserved)}")
    raise ConfigError(f"{head}: {', '.join(changes + ['lower Max Resolution (resolution)'])}")
