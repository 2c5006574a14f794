"""One training step of a model's real architecture on torch's fake tensors, counted byte by byte.

The parts (UNet, VAE, the family's text encoders) are built on the meta
device from their configs, then given fake CPU storage in the dtypes a GPU run
gives them, with the run's attention, checkpointing, fp8 base weights and
adapters (`adapters.attach_lora`, LoCon and DoRA included). Under
FakeTensorMode every operation runs as it would, but no data exists, so a
full-size model takes seconds on a CPU and needs no GPU. `LiveBytes` counts
what each phase of a run allocates above what it holds already:

- caching latents: the VAE encoding one picture (`batches.CACHE_BATCH`), the
  UNet not yet on the GPU;
- caching the text encoders' outputs ("Cache Text Encoder Outputs"): the
  run's own `TextCache.fill`, one batch of prompts;
- one training step, forward and backward, conditioned as the loop conditions
  (the family's `condition`, or a `TextCache` lookup and the family's
  `added_conditioning`: SDXL's two encoders, pooled embedding and time ids).

CUDA autocast's float32 policy for normalisation and softmax is reproduced
(the CPU's autocast keeps them in half precision), and attention is torch's
scaled_dot_product_attention, as on the GPU.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelInfo, TrainingParams
from .batches import CACHE_BATCH
from .livebytes import LiveBytes, allocated_size
from .memory import FP8_PARTS
from .parts import WEIGHT_DTYPES

TOKENS = 77  # CLIP's prompt length: every batch row is padded to it
TEXT_CACHE_PROMPTS = 8  # TextCache.fill's batch: the most prompts encoded at once


@dataclass(frozen=True)
class StepFigures:
    """What the fake run measured, in bytes as the CUDA allocator hands them out."""

    weights: int                # the parts on the GPU while training, in their dtypes, adapters included
    trained: tuple[int, ...]    # values of each tensor the optimizer updates
    step: int                   # the most one training step holds at once above the weights
    caching: int                # the most held while caching latents or text-encoder outputs (0: nothing cached)
    rows: int                   # pictures per step


def measure_run(model_type: str, configs: dict, params: TrainingParams, rows: int) -> StepFigures:
    """Build the parts of `configs` (part name -> config dict: diffusers UNet / VAE configs, CLIPTextConfig
    kwargs) for a `model_type` model and measure a run of `params` with `rows` pictures per step."""
    info = ModelInfo(model_type=model_type)
    family = info.family
    with _quiet():
        parts = _meta_parts(family, configs)
    with _ONE_AT_A_TIME, _fake_mode():
        model = _prepare(parts, info, params)
        encoders = model.text_encoders
        trained = tuple(p.numel() for part in (model.unet, *encoders) for p in part.parameters() if p.requires_grad)
        unet_bytes, vae_bytes = _bytes(model.unet), _bytes(model.vae)
        text_bytes = sum(_bytes(e) for e in encoders)
        # While the caches are filled the UNet is not on the GPU yet (train.prepare_model), the VAE and
        # text encoders are, until their outputs are cached.
        caching = 0
        if params.cache_latents:
            caching = vae_bytes + text_bytes + _encode_bytes(model.vae, params)
        text_cache = None
        if params.cache_text_encoder_outputs:
            text_cache, filling = _fill_text_cache(family, encoders)
            caching = max(caching, text_bytes + (0 if params.cache_latents else vae_bytes) + filling)
        step = _step_bytes(model, params, rows, text_cache)
    weights = (unet_bytes + (0 if params.cache_latents else vae_bytes)
               + (0 if params.cache_text_encoder_outputs else text_bytes))
    return StepFigures(weights=weights, trained=trained, step=step, caching=caching, rows=rows)


def _meta_parts(family, configs: dict) -> dict:
    """The parts built on the meta device: shapes only, no initialisation to run."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(_public(configs["unet"])),
                 "vae": AutoencoderKL.from_config(_public(configs["vae"]))}
        for te in family.text_encoders:
            kind = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
            parts[te.part] = kind(CLIPTextConfig(**_public(configs[te.part])))
    return parts


def _prepare(parts: dict, info: ModelInfo, params: TrainingParams):
    """The parts as a run on a GPU has them (under FakeTensorMode): dtypes, attention, checkpointing,
    adapters or unfrozen weights; returned as the run's WorkingModel."""
    from .adapters import attach_lora, unfreeze_for_full_finetune
    from .parts import WorkingModel, enable_checkpointing, part_dtypes, set_attention

    family = info.family
    dtypes = part_dtypes(params, torch.device("cuda"), family)
    for name, part in parts.items():
        _fake_storage(part, dtypes[name])
    if params.base_weights == "fp8":
        from ..fp8 import store_in_fp8

        for name in (n for n in FP8_PARTS if n in parts):  # text_encoder_2: SDXL's only
            store_in_fp8(parts[name], dtypes[name])
    encoders = [parts[te.part] for te in family.text_encoders]
    model = WorkingModel(parts["unet"], parts["vae"], encoders[0], None, None, info, Path("."),
                         encoders[1] if len(encoders) > 1 else None)
    set_attention(model.unet, "flash_attention")  # SDPA, as diffusers' default and xformers: no attention matrix kept
    if params.gradient_checkpointing:
        enable_checkpointing(model, text_encoder=params.train_text_encoder)
    if params.use_lora:
        attach_lora(model, params)
    else:
        unfreeze_for_full_finetune(model, params)
    model.unet.train()
    for encoder in encoders:
        encoder.train(params.train_text_encoder)
    return model


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


def _conditioning_batch(family, rows: int) -> dict:
    """The prompt-side keys of a batch as the dataset makes them: token ids of each tokenizer, time ids."""
    batch = {"input_ids": torch.zeros(rows, TOKENS, dtype=torch.long)}
    if len(family.text_encoders) > 1:
        batch["input_ids_2"] = torch.zeros(rows, TOKENS, dtype=torch.long)
    if family.time_ids:
        batch["time_ids"] = torch.zeros(rows, 6)
    return batch


class _Prompts:
    """What `TextCache.fill` asks of the dataset: the token ids of a prompt."""

    def __init__(self, family):
        self.family = family

    def conditioning_of_prompt(self, prompt: str) -> dict:
        return {key: value[0] for key, value in _conditioning_batch(self.family, 1).items() if key != "time_ids"}


def _fill_text_cache(family, encoders: list):
    """The run's `TextCache` filled for one batch of prompts, and the most that filling held at once."""
    from .loop import TextCache

    cache, tracker = TextCache(), LiveBytes()
    with tracker, _quiet():
        cache.fill(family, encoders, _Prompts(family), [str(i) for i in range(TEXT_CACHE_PROMPTS)], "cpu",
                   batch_size=TEXT_CACHE_PROMPTS)
    return cache, tracker.peak


def _step_bytes(model, params: TrainingParams, rows: int, text_cache) -> int:
    """The peak of one step's forward and backward above what lived before it (the loop's `compute_loss`:
    its conditioning is the loop's own, the loss a plain mean squared error of the same shape)."""
    from .batches import batch_latents

    family, unet = model.info.family, model.unet
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    size = params.resolution // factor
    tracker = LiveBytes()
    with tracker, _cuda_fp32_policy():
        batch = _conditioning_batch(family, rows)
        if params.cache_latents:  # the cached distribution's mean and std, drawn from
            batch["latent_dist"] = torch.randn(rows, 2 * unet.config.in_channels, size, size)
        else:  # encoded every step, without gradients
            batch["pixel_values"] = torch.randn(rows, 3, params.resolution, params.resolution)
        latents = batch_latents(batch, model.vae, 1.0, "cpu")
        noise = torch.randn_like(latents)
        noisy = latents + noise
        timesteps = torch.randint(0, 1000, (rows,))
        with _autocast(params):
            if text_cache is not None:
                hidden, pooled = text_cache.lookup([str(i % TEXT_CACHE_PROMPTS) for i in range(rows)], "cpu")
                added = family.added_conditioning(pooled, batch, "cpu", hidden.dtype)
            else:
                with torch.set_grad_enabled(params.train_text_encoder):
                    hidden, added = family.condition(model.text_encoders, batch, "cpu")
            extra = {"added_cond_kwargs": added} if added is not None else {}
            prediction = unet(noisy, timesteps, hidden, return_dict=False, **extra)[0]
            loss = F.mse_loss(prediction.float(), noise.float())
        del prediction, hidden, added, batch
        loss.backward()
    return tracker.peak


def _encode_bytes(vae: torch.nn.Module, params: TrainingParams) -> int:
    """The peak of encoding one batch of pictures for the latent cache (batches.LatentDataset.fill_cache)."""
    tracker = LiveBytes()
    with tracker, torch.no_grad():
        pixels = torch.randn(CACHE_BATCH, 3, params.resolution, params.resolution, dtype=_dtype(vae))
        dist = vae.encode(pixels).latent_dist
        torch.cat([dist.mean, dist.std], dim=1).float()
    return tracker.peak


def _bytes(module: torch.nn.Module) -> int:
    return sum(allocated_size(t.numel() * t.element_size()) for t in module.state_dict().values())


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextlib.contextmanager
def _fake_mode():
    """torch's FakeTensorMode; real tensors made elsewhere (a scheduler's tables) are taken in as fake ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


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
    """diffusers and transformers log at every model built from a config, the text cache at every fill:
    not worth the console's lines."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "lora_trainer.training.loop")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
