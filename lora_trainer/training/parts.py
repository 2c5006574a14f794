"""The working model's parts, loaded with diffusers and transformers from local files only,
and set up for training: frozen, in the right dtype, with the chosen attention and checkpointing."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compat import dtype_argument, enable_text_encoder_checkpointing
from ..config import ModelInfo, TrainingParams
from ..errors import ModelError

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class WorkingModel:
    """The pieces of a model made by "Create Model"."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    info: ModelInfo
    folder: Path

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def load_working_model(model_dir: Path, info: ModelInfo, dtypes: dict[str, torch.dtype] | None = None) -> WorkingModel:
    """Load UNet, VAE, text encoder, tokenizer and the DDPM noise schedule of a working model.

    `dtypes` ("unet", "vae", "text_encoder"; see `part_dtypes`): each part is read in its
    dtype (the library's default when not named) rather than cast afterwards. Raises ModelError when a part
    is missing or cannot be read.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, dtypes = str(model_dir), dtypes or {}

    def read(cls, part: str, library: str = "diffusers"):
        return cls.from_pretrained(folder, subfolder=part, local_files_only=True,
                                   **dtype_argument(library, dtypes.get(part)))

    try:
        unet = read(UNet2DConditionModel, "unet")
        vae = read(AutoencoderKL, "vae")
        text_encoder = read(CLIPTextModel, "text_encoder", "transformers")
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: the model cannot be loaded ({str(e).splitlines()[0]}); create it again") from None
    # The model info is what Create Model decided from the checkpoint's config: it wins.
    scheduler.register_to_config(prediction_type=info.prediction_type)
    for part in (unet, vae, text_encoder):
        part.requires_grad_(False)
    return WorkingModel(unet, vae, text_encoder, tokenizer, scheduler, info, Path(model_dir))


def part_dtypes(params: TrainingParams, device: torch.device) -> dict[str, torch.dtype]:
    """dtype of each part: those that do not train in half on a GPU with mixed precision (on the
    CPU they stay fp32 and autocast computes in bf16 where it helps); those a full fine-tune
    trains in fp32 (a gradient scaler needs fp32 weights)."""
    frozen = WEIGHT_DTYPES[params.mixed_precision] if device.type == "cuda" else torch.float32
    full = not params.use_lora
    return {"unet": torch.float32 if full else frozen,
            "text_encoder": torch.float32 if full and params.train_text_encoder else frozen,
            "vae": frozen}


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """"Memory Attention": default (diffusers' own choice, SDPA on torch 2), xformers, or
    flash_attention = torch's scaled_dot_product_attention."""
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "flash_attention":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def enable_checkpointing(model: WorkingModel, *, text_encoder: bool) -> None:
    """Gradient checkpointing of the UNet, and of the text encoder when it trains."""
    model.unet.enable_gradient_checkpointing()
    if text_encoder:
        enable_text_encoder_checkpointing(model.text_encoder)


def place(model: WorkingModel, device: torch.device, dtypes: dict[str, torch.dtype]) -> None:
    """Move the parts to `device`, each in its dtype of `part_dtypes`."""
    for part in ("unet", "text_encoder", "vae"):
        _move(getattr(model, part), device, dtypes[part])


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Casting only when needed: diffusers warns about every cast, also fp32 -> fp32.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def store_base_in_fp8(model: WorkingModel, dtypes: dict[str, torch.dtype], device: torch.device) -> None:
    """"Base Weight Storage" fp8: the frozen UNet and text encoder's layers keep float8 weights (see fp8.py)."""
    from ..fp8 import store_in_fp8

    layers = sum(store_in_fp8(getattr(model, part), dtypes[part]) for part in ("unet", "text_encoder"))
    free_device_memory(device)
    log.info("Stored the base weights of %d layers in float8 e4m3", layers)


def free_device_memory(device: torch.device) -> None:
    """Give cached CUDA memory back (for the host's model, or the next part of the run)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
