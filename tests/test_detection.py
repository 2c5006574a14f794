"""Model-type detection on the real SD 1.5 / SD 2.1 key sets and shapes, built on the meta device.

The key sets are made by the key map, so they are cross-checked here against
facts about the real files (tensor counts and a few well-known shapes) that do
not come from our code.
"""
from pathlib import Path

import pytest
import torch

from lora_trainer import keymap
from lora_trainer.architecture import (ModelSpec, decide_sd2_prediction, detect_family, read_spec,
                                       shipped_config, spec_from_original_config)
from lora_trainer.checkpoint import convert_part_tensors
from lora_trainer.errors import CheckpointError

REAL_TEXT = {
    "sd1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    "sd2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
}


class ShapeReader:
    """A checkpoint of meta tensors: keys and shapes like a real file, no memory."""

    def __init__(self, shapes: dict[str, tuple], name="real.safetensors"):
        self.shapes = shapes
        self.path = Path("/nonexistent") / name

    def keys(self):
        return list(self.shapes)

    def __contains__(self, key):
        return key in self.shapes

    def get_slice_shape(self, key):
        return tuple(self.shapes[key])

    def get(self, key):
        return torch.empty(self.shapes[key], device="meta")


def real_shapes(family: str) -> dict[str, tuple]:
    spec = spec_from_original_config(shipped_config(family))
    spec.text = REAL_TEXT[family]
    shapes = {}
    for build, links in ((keymap.build_unet, keymap.unet_links), (keymap.build_vae, keymap.vae_links),
                         (keymap.build_text_encoder, keymap.text_links)):
        model = build(spec)
        sd = model.state_dict()
        original = keymap.to_original(links(spec, model), lambda k: torch.empty(sd[k].shape, device="meta"))
        shapes.update({k: tuple(v.shape) for k, v in original.items()})
    if family == "sd1":
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    else:  # the unused 24th OpenCLIP block and the projections
        p = "cond_stage_model.model.transformer.resblocks.23."
        for name, shape in {"ln_1.weight": (1024,), "ln_1.bias": (1024,), "attn.in_proj_weight": (3072, 1024),
                            "attn.in_proj_bias": (3072,), "attn.out_proj.weight": (1024, 1024),
                            "attn.out_proj.bias": (1024,), "ln_2.weight": (1024,), "ln_2.bias": (1024,),
                            "mlp.c_fc.weight": (4096, 1024), "mlp.c_fc.bias": (4096,),
                            "mlp.c_proj.weight": (1024, 4096), "mlp.c_proj.bias": (1024,)}.items():
            shapes[p + name] = shape
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
        shapes["cond_stage_model.model.logit_scale"] = ()
    shapes["alphas_cumprod"] = (1000,)
    return shapes


def _count(shapes, prefix):
    return sum(k.startswith(prefix) for k in shapes)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_key_sets_match_known_facts(family):
    shapes = real_shapes(family)
    # Tensor counts of the released SD 1.5 / SD 2.1 files.
    assert _count(shapes, "model.diffusion_model.") == 686
    assert _count(shapes, "first_stage_model.") == 248
    if family == "sd1":
        assert _count(shapes, "cond_stage_model.transformer.") == 197
        assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
        assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
        assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    else:
        assert _count(shapes, "cond_stage_model.model.") == 294
        assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
        assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 1024)
        assert shapes["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] == (3072, 1024)
    for key, shape in {"model.diffusion_model.time_embed.0.weight": (1280, 320),
                       "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                       "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                       "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
                       "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
                       "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                       "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
                       "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1)}.items():
        assert shapes[key] == shape, key


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_detection_and_strict_conversion_of_real_shapes(family):
    reader = ShapeReader(real_shapes(family))
    assert detect_family(reader) == family
    spec = read_spec(reader)
    assert spec.text["hidden_size"] == REAL_TEXT[family]["hidden_size"]
    assert spec.text["num_hidden_layers"] == REAL_TEXT[family]["num_hidden_layers"]
    assert spec.text["num_attention_heads"] == REAL_TEXT[family]["num_attention_heads"]
    assert spec.model_type == ("sd1" if family == "sd1" else "sd2?")  # SD 2.x: 512 or 768-v decided by the UNet
    spec.model_type = family
    used = set()
    for part in ("unet", "vae", "text_encoder"):
        tensors, keys = convert_part_tensors(reader, spec, part)
        assert tensors
        used |= keys
    unused = set(reader.keys()) - used
    expected_unused = {"alphas_cumprod"} | ({"cond_stage_model.transformer.text_model.embeddings.position_ids"}
                                             if family == "sd1" else
                                             {k for k in reader.keys() if "resblocks.23." in k or "text_projection" in k or "logit_scale" in k})
    # position_ids is linked where the installed CLIPTextModel keeps it as a weight (transformers < 4.31).
    assert unused - expected_unused == set()


def test_inpainting_and_foreign_files_are_refused_by_name():
    inpaint = real_shapes("sd1")
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    with pytest.raises(CheckpointError, match="9-channel"):
        detect_family(ShapeReader(inpaint))
    with pytest.raises(CheckpointError, match="no Stable Diffusion UNet"):
        detect_family(ShapeReader({"encoder.weight": (2, 2)}))


REAL_XL_TEXT = (dict(REAL_TEXT["sd1"]),
                dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))


def real_xl_shapes() -> dict[str, tuple]:
    spec = spec_from_original_config(shipped_config("sdxl"))
    spec.text, spec.text_2 = REAL_XL_TEXT
    shapes = {}
    parts = [(keymap.build_unet, keymap.unet_links), (keymap.build_vae, keymap.vae_links)]
    parts += [(lambda s, p=p: keymap.build_text_encoder(s, part=p), lambda s, m, p=p: keymap.text_links(s, m, part=p))
              for p in ("text_encoder", "text_encoder_2")]
    for build, links in parts:
        model = build(spec)
        sd = model.state_dict()
        original = keymap.to_original(links(spec, model), lambda k: torch.empty(sd[k].shape, device="meta"))
        shapes.update({k: tuple(v.shape) for k, v in original.items()})
    shapes["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (1, 77)
    shapes["conditioner.embedders.1.model.logit_scale"] = ()
    return shapes


def test_sdxl_base_key_set_matches_the_released_file_and_converts_strictly():
    shapes = real_xl_shapes()
    # sd_xl_base_1.0.safetensors holds 2515 tensors: 1680 UNet, 248 VAE, 197 CLIP-L, 390 OpenCLIP bigG.
    assert (_count(shapes, "model.diffusion_model."), _count(shapes, "first_stage_model."),
            _count(shapes, "conditioner.embedders.0."), _count(shapes, "conditioner.embedders.1.")) == (1680, 248, 197, 390)
    for key, shape in {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                       "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                       "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
                       "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                       "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                       "conditioner.embedders.1.model.text_projection": (1280, 1280)}.items():
        assert shapes[key] == shape, key
    reader = ShapeReader(shapes)
    assert detect_family(reader) == "sdxl"
    spec = read_spec(reader)
    assert (spec.model_type, spec.resolution, spec.prediction_type) == ("sdxl", 1024, "epsilon")
    assert spec.text_2["num_hidden_layers"] == 32 and spec.text_2["hidden_size"] == 1280
    used = set()
    for part in spec.family.parts:
        used |= convert_part_tensors(reader, spec, part)[1]
    assert set(reader.keys()) - used <= {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                         "conditioner.embedders.1.model.logit_scale"}


def test_sdxl_refiner_and_inpainting_are_refused_by_name():
    base = real_xl_shapes()
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in base.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        detect_family(ShapeReader(refiner))
    inpaint = dict(base, **{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(CheckpointError, match="SDXL inpainting model .9 input channels"):
        detect_family(ShapeReader(inpaint))


@pytest.mark.parametrize("bias,expected", [(-3.0, "sd2-v"), (0.5, "sd2")])
def test_sd2_768_v_told_apart_by_the_unet_like_the_web_ui(bias, expected):
    # The web UI calls a SD 2.x model v-prediction when mean(unet(x) - x) < -1 at t=999 on a flat x.
    from lora_trainer.tiny import tiny_original_config

    spec = spec_from_original_config(tiny_original_config(v2=True))
    spec.text = REAL_TEXT["sd2"]
    spec.model_type = "sd2?"
    unet = keymap.build_unet(spec, device="cpu")
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(bias)
    decide_sd2_prediction(spec, unet)
    assert spec.model_type == expected
    assert spec.prediction_type == ("v_prediction" if expected == "sd2-v" else "epsilon")
    assert spec.text == REAL_TEXT["sd2"]
