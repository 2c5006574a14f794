"""Loading a working model as a diffusers pipeline, for pictures (class images, samples, demo)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .compat import dtype_argument
from .errors import ModelError

log = logging.getLogger(__name__)


def load_pipeline(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  text_encoder=None, unet=None):
    """The diffusers pipeline its model_index.json names (StableDiffusionPipeline, StableDiffusionXLPipeline)
    of the working model in `model_dir`, read from local files only.

    `text_encoder` / `unet` reuse models already in memory (e.g. the ones being trained).
    Raises ModelError when the folder is not a complete model.
    """
    import diffusers

    model_dir = Path(model_dir)
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{model_dir}: not a working model (no model_index.json); create it first")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    extra = {k: v for k, v in (("text_encoder", text_encoder), ("unet", unet)) if v is not None}
    # Optional parts the folder leaves empty are passed as None, so nothing is looked for elsewhere.
    extra.update({k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in index})
    if "requires_safety_checker" in index:
        extra["requires_safety_checker"] = False
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(
        str(model_dir), **dtype_argument("diffusers", dtype), local_files_only=True, **extra)
    return _fast_quiet(pipe).to(device)


def pipeline_from_parts(*, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline with a second text encoder) around
    models already in memory (e.g. during training: samples).

    `scheduler` is any diffusers scheduler of the model (its config is reused).
    Nothing is moved or copied.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        return _fast_quiet(StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                                     scheduler=scheduler))

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _fast_quiet(pipe)


def _fast_quiet(pipe):
    from diffusers import DPMSolverMultistepScheduler

    # A fast multistep solver: class pictures in 20 steps instead of 50.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw_pictures(pipe, **kwargs) -> list:
    """Run `pipe` with `kwargs` and return PIL pictures, never black ones from a half-precision VAE.

    The latents are decoded here: when the VAE in fp16/bf16 (or under fp16
    autocast) gives pixels that are not numbers, which a pipeline would save as
    a black picture, they are decoded again in fp32. Raises ModelError when even
    fp32 gives no numbers (the model's weights are broken).
    """
    latents = pipe(**kwargs, output_type="latent").images
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(pixels).all():
            log.warning("The VAE gave pixels that are not numbers in %s; decoding again in fp32", vae.dtype)
            pixels = _decode_in_fp32(vae, latents)
    if not torch.isfinite(pixels).all():
        raise ModelError("the model's VAE gives pixels that are not numbers even in fp32: its weights are broken")
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def _decode_in_fp32(vae, latents: torch.Tensor) -> torch.Tensor:
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return vae.decode(latents.float(), return_dict=False)[0]
    finally:
        vae.to(dtype)
