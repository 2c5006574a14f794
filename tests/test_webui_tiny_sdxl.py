"""The tiny SDXL (and SD 2.x) model in the web UI v1.10.1: its yaml builds there offline.

Seen in the real web UI: sgm's UNetModel refuses a `context_dim` without
`use_spatial_transformer`, and the second text encoder is built by open_clip from
the architecture name in the yaml (ViT-bigG-14 in SDXL, 2.5 GB of weights it does not
have offline): the extension registers a tiny architecture with open_clip when it loads.
"""
from __future__ import annotations

import importlib
import re
import sys

import pytest
import yaml
from safetensors import safe_open

from lora_trainer.tiny import tiny_text_config
from lora_trainer.tiny_sdxl import TINY_OPENCLIP_ARCH, tiny_xl_text_configs
from webui_env import StandinWebUI

OPENCLIP = "conditioner.embedders.1.model."


def _embedder(config: dict, target_end: str) -> dict:
    models = config["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    return next(m for m in models if m["target"].endswith(target_end))


def test_the_tiny_sdxl_yaml_builds_in_sgm(tiny_sdxl):
    config = yaml.safe_load(tiny_sdxl.with_suffix(".yaml").read_text(encoding="utf-8"))
    unet = config["model"]["params"]["network_config"]["params"]
    assert unet["context_dim"] and unet["use_spatial_transformer"] is True
    assert _embedder(config, "FrozenOpenCLIPEmbedder2")["params"]["arch"] == TINY_OPENCLIP_ARCH


@pytest.mark.parametrize("variant", ["tiny_sdxl", "tiny_sd2v"])
def test_the_extension_registers_the_tiny_text_encoder_with_open_clip(request, variant, tmp_path, monkeypatch):
    """SDXL's second text encoder and SD 2.x's are built by open_clip from the yaml's architecture name."""
    checkpoint = request.getfixturevalue(variant)
    config = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text(encoding="utf-8"))
    if variant == "tiny_sdxl":
        prefix, heads = OPENCLIP, tiny_xl_text_configs()[1]["num_attention_heads"]
        arch = _embedder(config, "FrozenOpenCLIPEmbedder2")["params"]["arch"]
    else:
        prefix, heads = "cond_stage_model.model.", tiny_text_config(v2=True)["num_attention_heads"]
        cond = config["model"]["params"]["cond_stage_config"]
        assert cond["target"].endswith(".FrozenOpenCLIPEmbedder")
        arch = cond["params"]["arch"]
    open_clip = importlib.import_module("helpers_open_clip")
    monkeypatch.setitem(sys.modules, "open_clip", open_clip)
    monkeypatch.setattr(open_clip, "added", [])
    with StandinWebUI(tmp_path / "webui") as webui:
        webui.load_extension_script()
    architecture = open_clip.get_model_config(arch)
    assert len(open_clip.added) == 1 and architecture is not None
    # What open_clip builds from it is what the checkpoint holds (the web UI loads it with strict=False,
    # so a mismatch would leave random weights silently).
    text = architecture["text_cfg"]
    with safe_open(str(checkpoint), framework="pt") as f:
        shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    width = text["width"]
    assert shapes["positional_embedding"] == (text["context_length"], width)
    assert shapes["token_embedding.weight"] == (text["vocab_size"], width)
    assert shapes["text_projection"] == (width, architecture["embed_dim"])
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    assert blocks == set(range(text["layers"]))
    assert shapes["transformer.resblocks.0.attn.in_proj_weight"] == (3 * width, width)
    assert shapes["transformer.resblocks.0.mlp.c_fc.weight"] == (int(width * text.get("mlp_ratio", 4.0)), width)
    assert text["heads"] == heads
    assert not text.get("quick_gelu", False) and not architecture.get("quick_gelu", False)  # both use GELU
