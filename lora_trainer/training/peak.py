"""The peak GPU memory a training run will reserve, predicted on any machine before anything loads.

The real UNet and text encoder of the model (built from its config files)
take one real training step, forward and backward, with the chosen options
(dtype, LoRA rank, gradient checkpointing, Train Text Encoder, batch, picture
size, prior preservation doubling the batch), on torch's fake tensors: every
operation runs as it would, but no data exists, so it takes seconds on a CPU
and needs no GPU. `LiveBytes` counts the bytes each operation allocates and
frees; the largest total is the step's activations and gradients. CUDA
autocast's float32 policy for normalisation and softmax is reproduced (the
CPU's autocast keeps them in half precision), and attention is torch's
scaled_dot_product_attention, as on the GPU.

Weights, trained values and optimizer moments come on top (they live through
the whole run), and so does what the caching allocator holds beyond what is
allocated. That last part cannot be derived and is calibrated: see
`ALLOCATOR_FACTOR` and docs/training.md for the measured runs it was fitted to
and how far the prediction is from each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TrainingParams
from ..errors import ConfigError, ModelError
from .batches import CACHE_BATCH
from .livebytes import LiveBytes
from .memory import EIGHT_BIT_MIN_VALUES, FP8_PARTS, GB
from .parts import WEIGHT_DTYPES

log = logging.getLogger(__name__)

TOKENS = 77
# The released text encoders: CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 up to its penultimate layer (SD 2.x).
STANDARD_TEXT = {
    "clip": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768},
    "openclip": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                 "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                 "projection_dim": 512}}  # CLIP's prompt length: every batch row is padded to it
# Reserved / allocated at the peak (the caching allocator's rounding and free blocks, cuBLAS and cuDNN
# workspaces): fitted to the five H100 runs of issue 13 (docs/training.md: each within 3% with it).
ALLOCATOR_FACTOR = 1.11


@dataclass(frozen=True)
class PartConfigs:
    """The configs of a model's parts: diffusers UNet / VAE config dicts and CLIPTextConfig kwargs."""

    unet: dict
    text_encoder: dict
    vae: dict

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "PartConfigs":
        """Read `unet/`, `text_encoder/` and `vae/config.json` of a working model.

        Raises ModelError when one is missing or unreadable.
        """
        configs = {}
        for part in ("unet", "text_encoder", "vae"):
            path = Path(model_dir) / part / "config.json"
            try:
                configs[part] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ModelError(f"{path}: cannot be read ({e}); create the model again") from None
        return cls(**configs)

    @classmethod
    def standard(cls, model_type: str) -> "PartConfigs":
        """The configs of the released models' architecture ("sd1": SD 1.5, "sd2", "sd2-v")."""
        from ..architecture import shipped_config, spec_from_original_config

        spec = spec_from_original_config(shipped_config(model_type))
        return cls(spec.unet, STANDARD_TEXT["clip" if model_type == "sd1" else "openclip"], spec.vae)

    def key(self) -> str:
        return json.dumps([self.unet, self.text_encoder, self.vae], sort_keys=True, default=str)


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes on the GPU at the peak of a run: what stays all run, what one step adds, and the prediction."""

    weights: int       # the parts on the GPU while training, in their dtypes, adapters included
    state: int         # the optimizer's moments
    step: int          # the most one training step holds at once above those: activations, gradients
    caching: int       # the most "Cache Latents" holds while encoding (VAE weights and activations), 0 when off
    rows: int          # pictures per step (prior preservation doubles the batch)

    @property
    def training(self) -> int:
        """Allocated at the peak of the training steps."""
        return self.weights + self.state + self.step

    @property
    def training_reserved(self) -> int:
        """The predicted peak reserved while training (without the latent-caching phase before it)."""
        return round(self.training * ALLOCATOR_FACTOR)

    @property
    def reserved(self) -> int:
        """The predicted peak of torch.cuda.max_memory_reserved over the whole run."""
        return round(max(self.training, self.caching) * ALLOCATOR_FACTOR)


def rows_per_step(params: TrainingParams, prior_preservation: bool) -> int:
    return params.train_batch_size * (2 if prior_preservation else 1)


def predicts(model_dir: Path) -> bool:
    """Whether the peak of this model's runs can be predicted: one UNet conditioned on one text encoder
    (SD 1.x / 2.x); not yet SDXL's two text encoders and extra conditioning."""
    return not (Path(model_dir) / "text_encoder_2").exists()


def estimate_peak(model_dir: Path, params: TrainingParams, *, prior_preservation: bool = True) -> PeakEstimate:
    """The predicted peak for the working model in `model_dir` (see `estimate_for_configs`)."""
    return estimate_for_configs(PartConfigs.from_model_dir(model_dir), params, prior_preservation=prior_preservation)


def estimate_for_configs(configs: PartConfigs, params: TrainingParams, *,
                         prior_preservation: bool = True) -> PeakEstimate:
    """The predicted peak of a run of `params` on a CUDA GPU, for a model of `configs`.

    `prior_preservation`: each step holds a class picture beside each instance
    picture. Runs on the CPU in seconds; nothing is loaded or allocated.
    """
    return _estimate(configs.key(), _params_key(params), prior_preservation)


def _params_key(params: TrainingParams) -> str:
    return json.dumps(params.to_dict(), sort_keys=True)


@lru_cache(maxsize=32)
def _estimate(configs_key: str, params_key: str, prior_preservation: bool) -> PeakEstimate:
    unet_config, text_config, vae_config = json.loads(configs_key)
    params = TrainingParams.from_dict(json.loads(params_key))
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows = rows_per_step(params, prior_preservation)
    with _quiet():
        parts = _meta_parts(unet_config, text_config, vae_config)
    with _ONE_AT_A_TIME, FakeTensorMode():
        _prepare(parts, params)
        weights = sum(_bytes(parts[name]) for name in ("unet", "text_encoder"))  # adapters among them
        trained = [p for name in ("unet", "text_encoder") for p in parts[name].parameters() if p.requires_grad]
        state = sum(_state_bytes(p, params) for p in trained)
        step = _step_bytes(parts, params, rows, vae_config)
        caching = 0
        if params.cache_latents:
            caching = weights + _bytes(parts["vae"]) + _encode_bytes(parts["vae"], params, CACHE_BATCH)
        else:
            weights += _bytes(parts["vae"])
    return PeakEstimate(weights=weights, state=state, step=step, caching=caching, rows=rows)


def _meta_parts(unet_config: dict, text_config: dict, vae_config: dict) -> dict:
    """The parts built on the meta device: shapes only, no initialisation to run."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(_public(unet_config)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**_public(text_config))),
                "vae": AutoencoderKL.from_config(_public(vae_config))}


def _prepare(parts: dict, params: TrainingParams) -> None:
    """The parts as a run on a GPU has them (under FakeTensorMode): dtypes, attention, checkpointing,
    adapters or unfrozen weights."""
    from .adapters import attach_lora, unfreeze_for_full_finetune
    from .parts import enable_checkpointing, part_dtypes, set_attention

    dtypes = part_dtypes(params, torch.device("cuda"))
    for name, part in parts.items():
        _fake_storage(part, dtypes[name])
    if params.base_weights == "fp8":
        from ..fp8 import store_in_fp8

        for name in (n for n in FP8_PARTS if n in parts):
            store_in_fp8(parts[name], dtypes[name])
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    set_attention(unet, "flash_attention")  # SDPA, as diffusers' default and xformers: no attention matrix kept
    from ..config import ModelInfo
    from .parts import WorkingModel

    # SD 1.x naming; the family only changes adapter names, not what they hold.
    model = WorkingModel(unet, parts["vae"], text_encoder, None, None, ModelInfo(), Path("."))
    if params.gradient_checkpointing:
        enable_checkpointing(model, text_encoder=params.train_text_encoder)
    if params.use_lora:
        attach_lora(model, params)
    else:
        unfreeze_for_full_finetune(model, params)
    unet.train()
    text_encoder.train(params.train_text_encoder)


def _fake_storage(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace every meta weight and buffer of `module` by a fake CPU tensor (frozen floating weights in `dtype`)."""
    for sub in module.modules():
        for name, weight in list(sub._parameters.items()):
            if weight is not None:
                kind = dtype if weight.is_floating_point() else weight.dtype
                sub._parameters[name] = torch.nn.Parameter(torch.empty(weight.shape, dtype=kind), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}



def _step_bytes(parts: dict, params: TrainingParams, rows: int, vae_config: dict) -> int:
    """The peak of one step's forward and backward above what lived before it (the loop's `compute_loss`)."""
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    size = params.resolution // factor
    channels = unet.config.in_channels
    tracker = LiveBytes()
    with tracker, _cuda_fp32_policy():
        latents = torch.randn(rows, channels, size, size)
        if not params.cache_latents:  # encoded every step, without gradients
            with torch.no_grad():
                pixels = torch.randn(rows, 3, params.resolution, params.resolution, dtype=_dtype(parts["vae"]))
                latents = parts["vae"].encode(pixels).latent_dist.sample().float()
                del pixels
        noise = torch.randn_like(latents)
        noisy = latents + noise
        timesteps = torch.randint(0, 1000, (rows,))
        ids = torch.zeros(rows, TOKENS, dtype=torch.long)
        with _autocast(params):
            with torch.set_grad_enabled(params.train_text_encoder):
                hidden = text_encoder(ids)[0]
            prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float())
        del prediction, hidden
        loss.backward()
    return tracker.peak


def _encode_bytes(vae: torch.nn.Module, params: TrainingParams, rows: int) -> int:
    """The peak of encoding one batch of pictures for the latent cache (batches.LatentDataset.fill_cache)."""
    tracker = LiveBytes()
    with tracker, torch.no_grad():
        pixels = torch.randn(rows, 3, params.resolution, params.resolution, dtype=_dtype(vae))
        dist = vae.encode(pixels).latent_dist
        torch.cat([dist.mean, dist.std], dim=1).float()
    return tracker.peak


def _state_bytes(parameter: torch.nn.Parameter, params: TrainingParams) -> int:
    """AdamW's two moments of a trained value (8-bit ones for large tensors with Use 8bit Adam)."""
    values = parameter.numel()
    return values * (2 if params.use_8bit_adam and values >= EIGHT_BIT_MIN_VALUES else 8)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextlib.contextmanager
def _autocast(params: TrainingParams):
    """Autocast as accelerate runs it on a GPU: matrix products in half (see `_cuda_fp32_policy`)."""
    if params.mixed_precision == "no":
        yield
        return
    with torch.autocast("cpu", dtype=WEIGHT_DTYPES[params.mixed_precision]):
        yield


_ESTIMATING = threading.local()  # set on the thread that estimates: a training in another thread is untouched
_ONE_AT_A_TIME = threading.Lock()  # estimates patch torch.nn.functional: one at a time


@contextlib.contextmanager
def _cuda_fp32_policy():
    """Under autocast, normalisation and softmax compute in fp32 as CUDA autocast has them (the CPU's keeps
    them in half). Patched for forward and backward alike: checkpointing recomputes under autocast."""
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "softmax")}

    def in_fp32(function):
        def run(x, *args, **kwargs):
            if not getattr(_ESTIMATING, "on", False) or not torch.is_autocast_enabled("cpu"):
                return function(x, *args, **kwargs)
            args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return function(x.float(), *args, **kwargs)
        return run

    try:
        _ESTIMATING.on = True
        for name, function in originals.items():
            setattr(F, name, in_fp32(function))
        yield
    finally:
        _ESTIMATING.on = False
        for name, function in originals.items():
            setattr(F, name, function)


@contextlib.contextmanager
def _quiet():
    """diffusers and transformers log at every model built from a config; not worth the console's lines."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def describe_peak(estimate: PeakEstimate) -> str:
    """The predicted peak and what makes it up, for a console or message line."""
    pictures = f"{estimate.rows} picture{'s' if estimate.rows > 1 else ''}"
    line = (f"predicted peak {_gb(estimate.reserved)}: weights {_gb(estimate.weights)}, optimizer "
            f"{_gb(estimate.state)}, a step of {pictures} {_gb(estimate.step)}")
    if estimate.caching > estimate.training:
        line += f", caching latents {_gb(estimate.caching)}"
    return line + ", plus the allocator's share"


def _gb(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= GB / 10 else f"{size / 2**20:.0f} MB"


# Changes that lower the peak, tried in this order (each on top of the ones before) to name what would fit.
LOWER_PEAK = (("gradient_checkpointing", True, "tick Gradient Checkpointing"),
              ("mixed_precision", "fp16", "Mixed Precision fp16"),
              ("use_8bit_adam", True, "tick Use 8bit Adam"),
              ("train_text_encoder", False, "untick Train Text Encoder"),
              ("train_batch_size", 1, "Batch Size 1"))


def check_peak(configs: PartConfigs, params: TrainingParams, estimate: PeakEstimate, free: int | None, gpu: str,
               *, prior_preservation: bool = True) -> None:
    """Refuse a run predicted to peak above the GPU's `free` bytes, naming changes that would fit.

    Raises ConfigError (one line). `free` None: not a GPU, nothing to check.
    """
    if free is None or estimate.reserved <= free:
        return
    changes, lowered, fitted = [], params, None
    for name, value, words in LOWER_PEAK:
        if getattr(lowered, name) == value:
            continue
        lowered = dataclasses.replace(lowered, **{name: value})
        changes.append(words)
        fitted = estimate_for_configs(configs, lowered, prior_preservation=prior_preservation)
        if fitted.reserved <= free:
            break
    head = (f"GPU memory: this run is predicted to peak at {_gb(estimate.reserved)} ({describe_peak(estimate)}), "
            f"{gpu} has {_gb(free)} free")
    if fitted is not None and fitted.reserved <= free:
        raise ConfigError(f"{head}: {', '.join(changes)} would bring it to {_gb(fitted.reserved)}")
    raise ConfigError(f"{head}: {', '.join(changes + ['lower Max Resolution (resolution)'])}")
