"""A built-in tiny Stable Diffusion checkpoint, made on the fly in the original layout.

Same architecture family as SD 1.x (or SD 2.x-v), a few hundred thousand UNet
weights, randomly initialised from a fixed seed: the same bytes every time on
the same installation, made in seconds on a CPU. Its original `.yaml` is written
beside it, as the web UI expects for non-standard models. The demo and the
tests use it; nothing is downloaded.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from . import keymap
from .architecture import spec_from_original_config
from .checkpoint_io import save_checkpoint
from .fileio import atomic_dir, atomic_write_text

TINY_NAME = "tiny-sd1.safetensors"
TINY_V_NAME = "tiny-sd2-v.safetensors"
TEXT_WIDTH = 64  # one CLIP head of 64
TEXT_LAYERS = 2
# The web UI builds SD 2.x's OpenCLIP text encoder from an architecture name (ViT-H-14 in SD 2.x); this tiny one
# (its TEXT_LAYERS blocks and the unused last one) is configs/open_clip/<name>.json, which the web UI integration
# registers with open_clip when the web UI starts.
TINY_SD2_OPENCLIP_ARCH = "lora-trainer-tiny-sd2-text"


def tiny_original_config(v2: bool = False, clip_folder: Path | None = None) -> str:
    """The original-layout yaml of the tiny model.

    `clip_folder` (SD 1.x): a local folder with the tiny text encoder's config and tokenizer,
    which the web UI's CLIP loader reads instead of `openai/clip-vit-large-patch14` from the hub.
    """
    unet = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [1], "num_res_blocks": 2, "channel_mult": [1, 2],
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": TEXT_WIDTH,
            "use_checkpoint": False, "legacy": False}
    if v2:
        unet.update(num_head_channels=16, use_linear_in_transformer=True)
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": TINY_SD2_OPENCLIP_ARCH, "freeze": True, "layer": "penultimate"}}
    else:
        unet.update(num_heads=2)
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
        if clip_folder is not None:
            cond["params"] = {"version": str(Path(clip_folder).resolve())}
    params = {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "timesteps": 1000,
              "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4,
              "cond_stage_trainable": False, "conditioning_key": "crossattn", "scale_factor": 0.18215,
              "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                  "embed_dim": 4, "monitor": "val/rec_loss",
                  "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                               "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                               "dropout": 0.0},
                  "lossconfig": {"target": "torch.nn.Identity"}}},
              "cond_stage_config": cond}
    if v2:
        params = {"parameterization": "v", **params}
    root = {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
    return yaml.safe_dump(root, sort_keys=False)


def tiny_state_dict(v2: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout tensors of the tiny model, from a fixed seed."""
    spec = spec_from_original_config(tiny_original_config(v2))
    spec.text = tiny_text_config(v2)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for build, links in ((keymap.build_unet, keymap.unet_links), (keymap.build_vae, keymap.vae_links),
                         (keymap.build_text_encoder, keymap.text_links)):
        model = build(spec, device="cpu")
        weights = {k: _random_like(v, k, generator) for k, v in model.state_dict().items()}
        out.update(keymap.to_original(links(spec, model), weights.__getitem__))
    if v2:
        out.update(_unused_openclip_tail(generator))
    else:
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    out.update(_ddpm_buffers())
    return out


def tiny_text_config(v2: bool = False) -> dict:
    """The tiny CLIP text encoder's `CLIPTextConfig` values."""
    return {"vocab_size": 49408, "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
            "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": 1, "max_position_embeddings": 77,
            "hidden_act": "gelu" if v2 else "quick_gelu", "projection_dim": TEXT_WIDTH}


def write_clip_folder(folder: Path) -> Path:
    """The tiny text encoder's config.json and the CLIP tokenizer files, for the web UI's CLIP loader."""
    from transformers import CLIPTextConfig

    from .tokenizer import save_tokenizer

    with atomic_dir(folder, overwrite=True) as tmp:
        CLIPTextConfig(**tiny_text_config()).save_pretrained(str(tmp))
        save_tokenizer(tmp)
    return folder


def _random_like(tensor: torch.Tensor, key: str, generator: torch.Generator) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.clone()
    if key.endswith("position_ids"):
        return tensor.clone()
    if "norm" in key and key.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
    fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
    return torch.randn(tensor.shape, generator=generator) / math.sqrt(max(fan_in, 1)) * (0.1 if tensor.dim() == 1 else 1.0)


def _unused_openclip_tail(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The last OpenCLIP block and projections: in real SD 2.x files, never used (penultimate layer)."""
    w, p = TEXT_WIDTH, f"cond_stage_model.model.transformer.resblocks.{TEXT_LAYERS}."
    shapes = {"ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
              "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
              "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,), "mlp.c_proj.weight": (w, 4 * w),
              "mlp.c_proj.bias": (w,)}
    out = {p + k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    out["cond_stage_model.model.text_projection"] = torch.randn((w, w), generator=generator) * 0.02
    out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return out


def _ddpm_buffers(timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers ldm stores in every checkpoint."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    buffers = {"betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
               "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
               "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt()}
    variance = betas * (1 - prev) / (1 - alphas_cumprod)
    buffers.update(posterior_variance=variance, posterior_log_variance_clipped=variance.clamp(min=1e-20).log(),
                   posterior_mean_coef1=betas * prev.sqrt() / (1 - alphas_cumprod),
                   posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod))
    return {k: v.float() for k, v in buffers.items()}


def write_tiny_checkpoint(folder: str | Path, *, v2: bool = False, seed: int = 0, fmt: str = "safetensors",
                          half: bool = False, name: str | None = None, for_webui: bool = False) -> Path:
    """Write the tiny checkpoint and its `.yaml` into `folder`; return the checkpoint path.

    `for_webui` (SD 1.x): also write `<name>-clip/` beside it and point the yaml at it, so
    the web UI loads the checkpoint (and what is merged from it) offline.
    """
    folder = Path(folder)
    stem = Path(name or (TINY_V_NAME if v2 else TINY_NAME)).stem
    path = folder / f"{stem}.{fmt}"
    tensors = tiny_state_dict(v2=v2, seed=seed)
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    clip_folder = write_clip_folder(folder / f"{stem}-clip") if for_webui and not v2 else None
    atomic_write_text(path.with_suffix(".yaml"), tiny_original_config(v2, clip_folder))
    save_checkpoint(tensors, path, fmt=fmt, overwrite=True)
    return path
