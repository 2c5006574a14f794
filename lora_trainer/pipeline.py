"""Loading a working model as a diffusers pipeline, for pictures (class images, samples, demo)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelError


def load_pipeline(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  text_encoder=None, unet=None):
    """A StableDiffusionPipeline of the working model in `model_dir`, read from local files only.

    `text_encoder` / `unet` reuse models already in memory (e.g. the ones being trained).
    Raises ModelError when the folder is not a complete model.
    """
    from diffusers import StableDiffusionPipeline

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(f"{model_dir}: not a working model (no model_index.json); create it first")
    extra = {k: v for k, v in (("text_encoder", text_encoder), ("unet", unet)) if v is not None}
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   local_files_only=True, **extra)
    return _fast_quiet(pipe).to(device)


def pipeline_from_parts(*, unet, vae, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline around models already in memory (e.g. during training: samples).

    `scheduler` is any diffusers scheduler of the model (its config is reused).
    Nothing is moved or copied.
    """
    from diffusers import StableDiffusionPipeline

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
