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
    text_encoder_2: torch.nn.Module | None = None   # SDXL's second (OpenCLIP) encoder
    tokenizer_2: object = None

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders in the family's order."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])


def load_working_model(model_dir: Path, info: ModelInfo, dtypes: dict[str, torch.dtype] | None = None) -> WorkingModel:
    """Load UNet, VAE, text encoder, tokenizer and the DDPM noise schedule of a working model.

    `dtypes` ("unet", "vae", "text_encoder", "text_encoder_2"; see `part_dtypes`): each part is read in its
    dtype (the library's default when not named) rather than cast afterwards. Raises ModelError when a part
    is missing or cannot be read.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder, dtypes = str(model_dir), dtypes or {}

    def read(cls, part: str, library: str = "diffusers"):
        return cls.from_pretrained(folder, subfolder=part, local_files_only=True,
                                   **dtype_argument(library, dtypes.get(part)))

    try:
        unet = read(UNet2DConditionModel, "unet")
        vae = read(AutoencoderKL, "vae")
        encoders, tokenizers = [], []
        for te in info.family.text_encoders:
            encoders.append(read(CLIPTextModelWithProjection if te.with_projection else CLIPTextModel, te.part,
                                 "transformers"))
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder=te.tokenizer, local_files_only=True))
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: the model cannot be loaded ({str(e).splitlines()[0]}); create it again") from None
    # The model info is what Create Model decided from the checkpoint's config: it wins.
    scheduler.register_to_config(prediction_type=info.prediction_type)
    for part in (unet, vae, *encoders):
        part.requires_grad_(False)
    second = (encoders[1], tokenizers[1]) if len(encoders) > 1 else (None, None)
    return WorkingModel(unet, vae, encoders[0], tokenizers[0], scheduler, info, Path(model_dir), *second)


def part_dtypes(params: TrainingParams, device: torch.device, family=None) -> dict[str, torch.dtype]:
    """dtype of each part: those that do not train in half on a GPU with mixed precision (on the
    CPU they stay fp32 and autocast computes in bf16 where it helps); those a full fine-tune
    trains in fp32 (a gradient scaler needs fp32 weights). A `family` whose VAE overflows in
    fp16 (SDXL) keeps its VAE in fp32, so no latent is NaN."""
    frozen = WEIGHT_DTYPES[params.mixed_precision] if device.type == "cuda" else torch.float32
    full = not params.use_lora
    text = torch.float32 if full and params.train_text_encoder else frozen
    vae = frozen if family is None or family.vae_fp16_safe or frozen != torch.float16 else torch.float32
    encoders = [te.part for te in family.text_encoders] if family is not None else ["text_encoder"]
    return {"unet": torch.float32 if full else frozen, **{part: text for part in encoders}, "vae": vae}


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """"Memory Attention": default (diffusers' own choice, SDPA on torch 2), xformers, or
    flash_attention = torch's scaled_dot_product_attention."""
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "flash_attention":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def enable_checkpointing(model: WorkingModel, *, text_encoder: bool) -> None:
    """Gradient checkpointing of the UNet, and of the text encoders when they train."""
    model.unet.enable_gradient_checkpointing()
    if text_encoder:
        for encoder in model.text_encoders:
            enable_text_encoder_checkpointing(encoder)


def place(model: WorkingModel, device: torch.device, dtypes: dict[str, torch.dtype], *, unet_later: bool = False) -> None:
    """Move the parts to `device`, each in its dtype of `part_dtypes`. `unet_later`: the UNet gets its dtype
    but stays where it is (on the CPU) until the caches are filled (train.build_run moves it)."""
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if getattr(model, part) is not None:
            _move(getattr(model, part), torch.device("cpu") if part == "unet" and unet_later else device, dtypes[part])


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Casting only when needed: diffusers warns about every cast, also fp32 -> fp32.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def store_base_in_fp8(model: WorkingModel, dtypes: dict[str, torch.dtype], device: torch.device) -> None:
    """"Base Weight Storage" fp8: the frozen UNet's and text encoders' layers keep float8 weights (see fp8.py)."""
    from ..fp8 import store_in_fp8
    from .memory import FP8_PARTS

    layers = sum(store_in_fp8(getattr(model, part), dtypes[part]) for part in FP8_PARTS
                 if getattr(model, part) is not None)
    free_device_memory(device)
    log.info("Stored the base weights of %d layers in float8 e4m3", layers)


def free_device_memory(device: torch.device) -> None:
    """Give cached CUDA memory back (for the host's model, or the next part of the run)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
