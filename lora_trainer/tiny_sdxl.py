"""A built-in tiny SDXL checkpoint, made on the fly in the original (sgm) layout.

The same kinds of parts as SDXL 1.0 base: a CLIP text encoder and an OpenCLIP
one with fused in_proj and text projection, the size/crop ("text_time")
additional embedding, cross-attention on the concatenated hidden states, a
transformer depth of 2 in the lowest level, the SD VAE; small channels,
randomly initialised from a fixed seed. Its sd_xl_base.yaml-shaped config is
written beside it. Tests and `demo --model-type sdxl` use it; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from . import keymap
from .architecture import spec_from_original_config
from .checkpoint_io import save_checkpoint
from .fileio import atomic_write_text
from .tiny import _random_like, tiny_text_config, write_clip_folder

TINY_XL_NAME = "tiny-sdxl.safetensors"
TEXT_WIDTH = 64      # each encoder: one CLIP head of 64
TIME_DIM = 16        # width of each size/crop number's sinusoidal embedding (256 in SDXL)
# open_clip builds the second text encoder from an architecture name (ViT-bigG-14 in SDXL); this tiny one is
# configs/open_clip/<name>.json, which the web UI integration registers with open_clip when the web UI starts.
TINY_OPENCLIP_ARCH = "lora-trainer-tiny-sdxl-text"


def tiny_xl_original_config(clip_folder: Path | None = None) -> str:
    """The tiny model's sgm yaml, shaped like the web UI's sd_xl_base.yaml.

    `clip_folder`: a local folder with the first text encoder's config and tokenizer,
    which the CLIP loader reads instead of `openai/clip-vit-large-patch14` from the hub.
    """
    clip = {"layer": "hidden", "layer_idx": 0}  # penultimate of the tiny encoder's 2 layers
    if clip_folder is not None:
        clip["version"] = str(Path(clip_folder).resolve())
    time = lambda key: {"is_trainable": False, "input_key": key,  # noqa: E731
                        "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                        "params": {"outdim": TIME_DIM}}
    params = {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": TEXT_WIDTH + 6 * TIME_DIM, "num_classes": "sequential", "use_checkpoint": False,
            "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [4, 2],
            "num_res_blocks": 1, "channel_mult": [1, 2, 2], "num_head_channels": 16,
            # sgm's UNetModel refuses a context_dim without use_spatial_transformer (seen in the web UI 1.10.1)
            "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": [1, 1, 2],
            "context_dim": 2 * TEXT_WIDTH, "spatial_transformer_attn_type": "softmax-xformers", "legacy": False}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": clip},
            {"is_trainable": False, "input_key": "txt",
             "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": TINY_OPENCLIP_ARCH, "version": "laion2b_s39b_b160k", "freeze": True,
                        "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
            time("original_size_as_tuple"), time("crop_coords_top_left"), time("target_size_as_tuple")]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 64,
                         "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
    }
    return yaml.safe_dump({"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}},
                          sort_keys=False)


def tiny_xl_text_configs() -> tuple[dict, dict]:
    """`CLIPTextConfig` values of the tiny CLIP (first) and OpenCLIP (second) encoders."""
    first = tiny_text_config(v2=False)
    second = {**tiny_text_config(v2=True), "projection_dim": TEXT_WIDTH}
    return first, second


def tiny_xl_spec():
    spec = spec_from_original_config(tiny_xl_original_config())
    spec.text, spec.text_2 = tiny_xl_text_configs()
    return spec


def tiny_xl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout tensors of the tiny SDXL model, from a fixed seed."""
    spec = tiny_xl_spec()
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    builders = [(keymap.build_unet, keymap.unet_links), (keymap.build_vae, keymap.vae_links)]
    builders += [(lambda s, device, p=te.part: keymap.build_text_encoder(s, device, part=p),
                  lambda s, m, p=te.part: keymap.text_links(s, m, part=p)) for te in spec.family.text_encoders]
    for build, links in builders:
        model = build(spec, device="cpu")
        weights = {k: _random_like(v, k, generator) for k, v in model.state_dict().items()}
        out.update(keymap.to_original(links(spec, model), weights.__getitem__))
    # What real SDXL files hold besides the converted weights.
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    out["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    return out


def write_tiny_xl_checkpoint(folder: str | Path, *, seed: int = 0, fmt: str = "safetensors", half: bool = False,
                             name: str | None = None, for_webui: bool = False) -> Path:
    """Write the tiny SDXL checkpoint and its `.yaml` into `folder`; return the checkpoint path.

    `for_webui`: also write `<name>-clip/` beside it and point the first text encoder's entry at it.
    """
    folder = Path(folder)
    stem = Path(name or TINY_XL_NAME).stem
    path = folder / f"{stem}.{fmt}"
    tensors = tiny_xl_state_dict(seed=seed)
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    clip_folder = write_clip_folder(folder / f"{stem}-clip") if for_webui else None
    atomic_write_text(path.with_suffix(".yaml"), tiny_xl_original_config(clip_folder))
    save_checkpoint(tensors, path, fmt=fmt, overwrite=True)
    return path
