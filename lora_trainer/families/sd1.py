"""SD 1.x: one CLIP ViT-L text encoder under `cond_stage_model.transformer.`, ldm's LatentDiffusion yaml."""
from __future__ import annotations

import yaml

from ..errors import CheckpointError
from .base import UNET_PREFIX, Family, ModelSpec, TextEncoder
from .ldm import scheduler_config, unet_config, vae_config

LDM_CLIP_PREFIX = "cond_stage_model.transformer."


def refuse_extra_input_channels(reader) -> None:
    """Inpainting and depth models take more than the 4 latent channels; they need their own yaml."""
    in_conv = UNET_PREFIX + "input_blocks.0.0.weight"
    if in_conv in reader and reader.get_slice_shape(in_conv)[1] != 4:
        raise CheckpointError(f"{reader.path}: a {reader.get_slice_shape(in_conv)[1]}-channel (inpainting or depth) model; "
                              "put its original .yaml config beside it to use it")


class LdmFamily(Family):
    """SD 1.x and SD 2.x: ldm's `LatentDiffusion` with a `cond_stage_model`."""

    def claims_config(self, root: dict) -> bool:
        try:
            target = root["model"]["params"]["cond_stage_config"]["target"]
        except (KeyError, TypeError):
            return False
        return self.claims_embedder(target)

    def claims_embedder(self, target: str) -> bool:
        raise NotImplementedError

    def spec_from_config(self, root: dict, text: str, source: str) -> ModelSpec:
        try:
            params = root["model"]["params"]
            unet = params["unet_config"]["params"]
            vae_params = params["first_stage_config"]["params"]
            dd = vae_params["ddconfig"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{source}: not an original Stable Diffusion config ({type(e).__name__}: {e})") from None
        v_pred = params.get("parameterization", "eps") == "v"
        latent_size = int(params.get("image_size", unet.get("image_size", 64)))
        resolution = latent_size * 2 ** (len(dd["ch_mult"]) - 1)
        return ModelSpec(
            model_type=self.model_type_of(v_pred),
            prediction_type="v_prediction" if v_pred else "epsilon",
            resolution=resolution,
            unet=unet_config(unet, latent_size, v_pred),
            vae=vae_config(dd, vae_params, params.get("scale_factor", 0.18215), resolution),
            scheduler=scheduler_config(params, v_pred),
            original_config=text,
        )

    def model_type_of(self, v_pred: bool) -> str:
        raise NotImplementedError


class SD1(LdmFamily):
    name, title = "sd1", "SD 1.x"
    model_types = ("sd1",)
    text_encoders = (TextEncoder("text_encoder", LDM_CLIP_PREFIX, "clip", "lora_te", ("lora_te1",),
                                 webui_strip="cond_stage_model."),)
    context_width = 768
    lora_versions = ("sd_v1",)
    modelspec_prefix = "stable-diffusion-v1"
    configs = {"sd1": "v1-inference.yaml"}

    def claims(self, keys: set[str]) -> bool:
        return LDM_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight" in keys

    def detect(self, reader) -> str:
        refuse_extra_input_channels(reader)
        return "sd1"

    def claims_embedder(self, target: str) -> bool:
        return "OpenCLIP" not in target and "CLIP" in target

    def model_type_of(self, v_pred: bool) -> str:
        return "sd1"

    def base_model_version(self, model_type: str) -> str:
        return "sd_v1"

    def modelspec_architecture(self, model_type: str) -> str:
        return "stable-diffusion-v1"


def parse_yaml(text: str, source: str) -> dict:
    """Raises CheckpointError naming `source` when the text is not a yaml mapping."""
    try:
        root = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{source}: not an original Stable Diffusion config (YAMLError: {e})") from None
    if not isinstance(root, dict):
        raise CheckpointError(f"{source}: not an original Stable Diffusion config (not a mapping)")
    return root
