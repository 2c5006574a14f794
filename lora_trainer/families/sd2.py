"""SD 2.x: OpenCLIP ViT-H under `cond_stage_model.model.` (fused in_proj, penultimate layer), 512 epsilon or 768 v."""
from __future__ import annotations

import logging

import torch

from .base import ModelSpec, TextEncoder
from .sd1 import LdmFamily, refuse_extra_input_channels

log = logging.getLogger(__name__)

LDM_OPENCLIP_PREFIX = "cond_stage_model.model."


class SD2(LdmFamily):
    name, title = "sd2", "SD 2.x"
    model_types = ("sd2", "sd2-v")
    provisional = "sd2?"  # 512 epsilon or 768 v: decided by `settle` once the UNet is loaded
    text_encoders = (TextEncoder("text_encoder", LDM_OPENCLIP_PREFIX, "openclip", "lora_te", ("lora_te1",),
                                 webui_strip="cond_stage_model.", drop_last_layer=True, pad_token="!"),)
    context_width = 1024
    lora_versions = ("sd_v2",)
    modelspec_prefix = "stable-diffusion-v2"
    configs = {"sd2": "v2-inference.yaml", "sd2-v": "v2-inference-v.yaml"}

    def claims(self, keys: set[str]) -> bool:
        return LDM_OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in keys

    def detect(self, reader) -> str:
        refuse_extra_input_channels(reader)
        return self.provisional

    def claims_embedder(self, target: str) -> bool:
        return "OpenCLIP" in target

    def model_type_of(self, v_pred: bool) -> str:
        return "sd2-v" if v_pred else "sd2"

    def settle(self, spec: ModelSpec, unet) -> None:
        """Tell SD 2.x 768-v from SD 2.x 512 as the web UI does: by what the UNet predicts.

        At t=999 on a flat input an epsilon model outputs roughly the input, a
        v-prediction model roughly its negative; the web UI calls it v when
        mean(out - x) < -1.
        """
        if spec.model_type != self.provisional:
            return
        with torch.no_grad():
            dtype = next(unet.parameters()).dtype
            x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype)
            cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype)
            out = unet(x, torch.tensor([999]), encoder_hidden_states=cond).sample
            v_pred = (out.float() - x.float()).mean().item() < -1
        model_type = "sd2-v" if v_pred else "sd2"
        chosen = self.spec_from_config(_load(self.shipped_config(model_type)), self.shipped_config(model_type),
                                       self.configs[model_type])
        chosen.text = spec.text
        spec.__dict__.update(chosen.__dict__)
        log.info("Recognised %s", "SD 2.x 768 (v-prediction)" if v_pred else "SD 2.x 512 (epsilon)")

    def yaml_needed(self, model_type: str, text: str) -> bool:
        # The web UI guesses 768-v from the weights only in recent versions: the yaml makes it certain.
        return model_type == "sd2-v" or super().yaml_needed(model_type, text)

    @property
    def ss_v2(self) -> bool:
        return True

    def base_model_version(self, model_type: str) -> str:
        return "sd_v2_768_v" if model_type == "sd2-v" else "sd_v2"

    def modelspec_architecture(self, model_type: str) -> str:
        return "stable-diffusion-v2-768-v" if model_type == "sd2-v" else "stable-diffusion-v2-512"


def _load(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)
