"""Which model a checkpoint holds, and the diffusers configs that fit it.

The web UI's convention is followed: an original-layout `.yaml` beside the
checkpoint with the same base name decides the architecture; without one,
SD 1.x and SD 2.x are recognised from the weights (SD 2.x 768-v from the
UNet's behaviour, exactly as the web UI tells them apart) and the matching
original config shipped with this package is used. Text-encoder sizes always
come from the weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import yaml

from .checkpoint_io import CheckpointReader
from .errors import CheckpointError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
CLIP_HEAD_SIZE = 64
SHIPPED_CONFIGS = {"sd1": "v1-inference.yaml", "sd2": "v2-inference.yaml", "sd2-v": "v2-inference-v.yaml"}


@dataclass
class ModelSpec:
    """Everything needed to convert a checkpoint and to write it back."""

    model_type: str                 # sd1 | sd2 | sd2-v
    prediction_type: str            # epsilon | v_prediction
    resolution: int                 # native picture size in pixels
    text_family: str                # clip (SD 1.x) | openclip (SD 2.x)
    unet: dict                      # UNet2DConditionModel config
    vae: dict                       # AutoencoderKL config
    scheduler: dict                 # DDPM-family scheduler config
    original_config: str            # the original-layout yaml text
    text: dict = field(default_factory=dict)  # CLIPTextConfig kwargs, from the weights


def shipped_config(model_type: str) -> str:
    return resources.files("lora_trainer.configs").joinpath(SHIPPED_CONFIGS[model_type]).read_text()


def config_beside(checkpoint: Path) -> Path | None:
    """The web UI's convention: `model.yaml` beside `model.safetensors`."""
    for suffix in (".yaml", ".yml"):
        candidate = checkpoint.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def detect_family(reader: CheckpointReader) -> str:
    """'sd1' or 'sd2' from the weights' names and shapes; CheckpointError for anything else."""
    keys = reader.keys()
    has = set(keys).__contains__
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{reader.path}: this is an SDXL checkpoint; only SD 1.x and SD 2.x are supported")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(f"{reader.path}: no Stable Diffusion UNet weights (model.diffusion_model.*) in this file")
    in_conv = UNET_PREFIX + "input_blocks.0.0.weight"
    if has(in_conv) and reader.get_slice_shape(in_conv)[1] != 4:
        raise CheckpointError(f"{reader.path}: a {reader.get_slice_shape(in_conv)[1]}-channel (inpainting or depth) model; "
                              "put its original .yaml config beside it to use it")
    if has(OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"):
        return "sd2"
    if has(CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"):
        return "sd1"
    raise CheckpointError(f"{reader.path}: not a recognised SD 1.x or SD 2.x checkpoint; "
                          "put its original .yaml config beside it with the same base name")


def read_spec(reader: CheckpointReader) -> ModelSpec:
    """The model spec of a checkpoint: from the .yaml beside it, else recognised from the weights.

    Raises CheckpointError when the architecture cannot be told.
    """
    yaml_path = config_beside(reader.path)
    if yaml_path is not None:
        log.info("Using the config %s", yaml_path)
        text = yaml_path.read_text(encoding="utf-8")
        spec = spec_from_original_config(text, source=str(yaml_path))
    else:
        family = detect_family(reader)
        spec = spec_from_original_config(shipped_config(family), source=SHIPPED_CONFIGS[family])
        if family == "sd2":
            spec.model_type = "sd2?"  # decided by `decide_sd2_prediction` once the UNet is loaded
    spec.text = text_config_from_weights(reader, spec.text_family)
    return spec


def spec_from_original_config(text: str, source: str = "config") -> ModelSpec:
    """Translate an original-layout (ldm) yaml into diffusers configs.

    Raises CheckpointError naming `source` when a needed entry is missing.
    """
    try:
        root = yaml.safe_load(text)
        params = root["model"]["params"]
        unet = params["unet_config"]["params"]
        vae_params = params["first_stage_config"]["params"]
        dd = vae_params["ddconfig"]
        cond_target = params["cond_stage_config"]["target"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: not an original Stable Diffusion config ({type(e).__name__}: {e})") from None

    v_pred = params.get("parameterization", "eps") == "v"
    text_family = "openclip" if "OpenCLIP" in cond_target else "clip"
    latent_size = int(params.get("image_size", unet.get("image_size", 64)))
    vae_factor = 2 ** (len(dd["ch_mult"]) - 1)
    if text_family == "openclip":
        model_type = "sd2-v" if v_pred else "sd2"
    else:
        model_type = "sd1"

    return ModelSpec(
        model_type=model_type,
        prediction_type="v_prediction" if v_pred else "epsilon",
        resolution=latent_size * vae_factor,
        text_family=text_family,
        unet=unet_config(unet, latent_size, v_pred),
        vae=vae_config(dd, vae_params, params, latent_size * vae_factor),
        scheduler=scheduler_config(params, v_pred),
        original_config=text,
    )


def unet_config(p: dict, sample_size: int, upcast: bool) -> dict:
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    attention_at = set(p.get("attention_resolutions", []))
    with_attention = [2 ** i in attention_at for i in range(len(channels))]
    if p.get("num_head_channels", -1) not in (-1, None):
        heads = [c // p["num_head_channels"] for c in channels]
    else:
        heads = p["num_heads"]
    depth = p.get("transformer_depth", 1)
    return {
        "sample_size": sample_size,
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        "block_out_channels": channels,
        "layers_per_block": p["num_res_blocks"],
        "cross_attention_dim": p["context_dim"],
        "attention_head_dim": heads,  # diffusers' historical name: the number of heads
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        "upcast_attention": bool(upcast),
    }


def vae_config(dd: dict, vae_params: dict, params: dict, sample_size: int) -> dict:
    n = len(dd["ch_mult"])
    return {
        "sample_size": sample_size,
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": vae_params.get("embed_dim", dd["z_channels"]),
        "scaling_factor": float(params.get("scale_factor", 0.18215)),
    }


def scheduler_config(params: dict, v_pred: bool) -> dict:
    return {
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 0.00085)),
        "beta_end": float(params.get("linear_end", 0.012)),
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v_pred else "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def text_config_from_weights(reader: CheckpointReader, family: str) -> dict:
    """CLIPTextConfig kwargs read off the weights' shapes (head size 64)."""
    shape = reader.get_slice_shape
    keys = reader.keys()
    if family == "clip":
        base = CLIP_PREFIX + "text_model."
        vocab, hidden = shape(base + "embeddings.token_embedding.weight")
        positions = shape(base + "embeddings.position_embedding.weight")[0]
        layers = _count_indexed(keys, base + "encoder.layers.")
        intermediate = shape(base + "encoder.layers.0.mlp.fc1.weight")[0]
        projection, act = 768, "quick_gelu"
    else:
        base = OPENCLIP_PREFIX
        vocab, hidden = shape(base + "token_embedding.weight")
        positions = shape(base + "positional_embedding")[0]
        # SD 2.x conditions on the penultimate layer: the last block is kept aside, unused.
        layers = _count_indexed(keys, base + "transformer.resblocks.") - 1
        intermediate = shape(base + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection, act = 512, "gelu"
        if base + "text_projection" in reader:
            projection = shape(base + "text_projection")[1]
    if hidden % CLIP_HEAD_SIZE:
        raise CheckpointError(f"{reader.path}: text encoder width {hidden} is not a multiple of the CLIP head size 64")
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": hidden // CLIP_HEAD_SIZE,
        "max_position_embeddings": positions, "hidden_act": act, "projection_dim": projection,
        "bos_token_id": 49406 if vocab == 49408 else 0, "eos_token_id": 49407 if vocab == 49408 else 2,
        "pad_token_id": 1,
    }


def _count_indexed(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def decide_sd2_prediction(spec: ModelSpec, unet: torch.nn.Module) -> None:
    """Tell SD 2.x 768-v from SD 2.x 512 as the web UI does: by what the UNet predicts.

    At t=999 on a flat input an epsilon model outputs roughly the input, a
    v-prediction model roughly its negative; the web UI calls it v when
    mean(out - x) < -1.
    """
    if spec.model_type != "sd2?":
        return
    with torch.no_grad():
        dtype = next(unet.parameters()).dtype
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype)
        cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype)
        out = unet(x, torch.tensor([999]), encoder_hidden_states=cond).sample
        v_pred = (out.float() - x.float()).mean().item() < -1
    chosen = spec_from_original_config(shipped_config("sd2-v" if v_pred else "sd2"))
    chosen.text = spec.text
    spec.__dict__.update(chosen.__dict__)
    log.info("Recognised %s", "SD 2.x 768 (v-prediction)" if v_pred else "SD 2.x 512 (epsilon)")
