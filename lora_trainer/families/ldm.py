"""Translating original-layout yaml entries into diffusers configs, shared by the families."""
from __future__ import annotations


def unet_config(p: dict, sample_size: int, upcast: bool) -> dict:
    """UNet2DConditionModel config of an openaimodel `UNetModel`'s params."""
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


def vae_config(dd: dict, vae_params: dict, scale_factor: float, sample_size: int) -> dict:
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
        "scaling_factor": float(scale_factor),
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
