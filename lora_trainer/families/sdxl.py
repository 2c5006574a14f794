"""SDXL 1.0 base and its fine-tunes: sgm's DiffusionEngine with two text encoders.

Original layout: `conditioner.embedders.0.transformer.*` (CLIP ViT-L, transformers
names), `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, fused in_proj,
`text_projection` used as x @ P), the UNet under `model.diffusion_model.*` with
`label_emb` (the size/crop "text_time" additional embedding) and the VAE under
`first_stage_model.*`. The refiner (one OpenCLIP embedder) and inpainting
models (9 input channels) are refused by name.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from .base import UNET_PREFIX, Family, ModelSpec, TextEncoder
from .ldm import scheduler_config, unet_config, vae_config

EMBEDDERS = "conditioner.embedders."
CLIP_L_PREFIX = EMBEDDERS + "0.transformer."
OPENCLIP_G_PREFIX = EMBEDDERS + "1.model."
NATIVE_RESOLUTION = 1024
# Channels of the released UNet; smaller ones are test models (`tiny_sdxl`) drawing at 64 px.
RELEASED_MODEL_CHANNELS = 320


class SDXL(Family):
    name, title = "sdxl", "SDXL"
    model_types = ("sdxl",)
    text_encoders = (
        TextEncoder("text_encoder", CLIP_L_PREFIX, "clip", "lora_te1"),
        TextEncoder("text_encoder_2", OPENCLIP_G_PREFIX, "openclip", "lora_te2",
                    with_projection=True, pad_token="!", tokenizer="tokenizer_2"),
    )
    context_width = 2048
    lora_versions = ("sdxl",)
    modelspec_prefix = "stable-diffusion-xl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_extras = {"feature_extractor": [None, None], "image_encoder": [None, None],
                       "force_zeros_for_empty_prompt": True}
    configs = {"sdxl": "sd_xl_base.yaml"}
    full_finetune = False  # writing both text encoders back is not wired in: LoRA only
    time_ids = True
    training_defaults = {"resolution": NATIVE_RESOLUTION, "use_buckets": True}
    vae_fp16_safe = False  # the SDXL 1.0 VAE gives inf/NaN in fp16

    def claims(self, keys: set[str]) -> bool:
        return any(k.startswith(EMBEDDERS) for k in keys)

    def detect(self, reader) -> str:
        keys = set(reader.keys())
        has_clip_l = CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight" in keys
        has_openclip_g = OPENCLIP_G_PREFIX + "token_embedding.weight" in keys
        if not has_clip_l and any(k.startswith(EMBEDDERS + "0.model.") for k in keys):
            raise CheckpointError(f"{reader.path}: an SDXL refiner (one OpenCLIP text encoder, no CLIP-L): "
                                  "it only refines pictures and cannot be trained here; use an SDXL base model")
        if not (has_clip_l and has_openclip_g):
            raise CheckpointError(f"{reader.path}: an SDXL-like checkpoint without both text encoders "
                                  "(conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*); "
                                  "use an SDXL 1.0 base model or a fine-tune of it")
        in_conv = UNET_PREFIX + "input_blocks.0.0.weight"
        channels = reader.get_slice_shape(in_conv)[1] if in_conv in keys else 4
        if channels != 4:
            raise CheckpointError(f"{reader.path}: an SDXL inpainting model ({channels} input channels): "
                                  "inpainting models cannot be trained here; use an SDXL base model")
        return "sdxl"

    def claims_config(self, root: dict) -> bool:
        try:
            params = root["model"]["params"]
            return "network_config" in params and "conditioner_config" in params
        except (KeyError, TypeError):
            return False

    def spec_from_config(self, root: dict, text: str, source: str) -> ModelSpec:
        try:
            params = root["model"]["params"]
            unet = params["network_config"]["params"]
            vae_params = params["first_stage_config"]["params"]
            dd = vae_params["ddconfig"]
            embedders = params["conditioner_config"]["params"]["emb_models"]
            denoiser = params.get("denoiser_config", {}).get("params", {})
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: not an original SDXL config ({type(e).__name__}: {e})") from None
        text_embedders = [e for e in embedders if e.get("input_key") == "txt"]
        if len(text_embedders) != 2:
            raise CheckpointError(f"{source}: an SDXL config with {len(text_embedders)} text encoders "
                                  "(the refiner has one); use an SDXL base model")
        v_pred = "VScaling" in str(denoiser.get("scaling_config", {}).get("target", ""))
        time_dims = [e.get("params", {}).get("outdim", 256) for e in embedders
                     if "ConcatTimestepEmbedderND" in str(e.get("target", ""))]
        discretization = denoiser.get("discretization_config", {}).get("params", {})
        resolution = NATIVE_RESOLUTION if unet["model_channels"] >= RELEASED_MODEL_CHANNELS else 64
        vae_factor = 2 ** (len(dd["ch_mult"]) - 1)
        config = unet_config(unet, resolution // vae_factor, False)
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_dims[0] if time_dims else 256,
                      projection_class_embeddings_input_dim=unet["adm_in_channels"])
        return ModelSpec(
            model_type="sdxl",
            prediction_type="v_prediction" if v_pred else "epsilon",
            resolution=resolution,
            unet=config,
            vae={**vae_config(dd, vae_params, params.get("scale_factor", 0.13025), resolution), "force_upcast": True},
            scheduler=scheduler_config({"timesteps": denoiser.get("num_idx", 1000), **discretization}, v_pred),
            original_config=text,
        )

    def base_model_version(self, model_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, model_type: str) -> str:
        return "stable-diffusion-xl-v1-base"

    def encode_text(self, encoders: list, batch: dict, device) -> tuple:
        """Both encoders' penultimate hidden states side by side, and the second's pooled (projected)
        embedding, as SDXL was trained."""
        first = encoders[0](batch["input_ids"].to(device), output_hidden_states=True)
        second = encoders[1](batch["input_ids_2"].to(device), output_hidden_states=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds

    def added_conditioning(self, pooled, batch: dict, device, dtype) -> dict:
        """The pooled embedding and each picture's size/crop ids."""
        return {"text_embeds": pooled.to(device, dtype), "time_ids": batch["time_ids"].to(device, dtype)}

    def unet_lora_path(self, path: str, unet_config) -> str:
        """kohya's SDXL scripts name UNet modules by their original path (`input_blocks_4_1_...`),
        which the web UI reads by replacing `lora_unet` with `diffusion_model`."""
        from ..keymap import unet_module_to_original

        return unet_module_to_original(path, unet_config)
