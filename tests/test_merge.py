""""Generate Ckpt": a LoRA merged into a checkpoint behaves like the base model with the LoRA applied."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from helpers_merge import (LIFETIME_STEPS, apply_lora, kohya_name, load_checkpoint_parts, load_parts, make_model,
                           random_lora, save_lora, text_output, unet_output)

from lora_trainer.architecture import shipped_config
from lora_trainer.checkpoint_io import CheckpointReader, file_sha256
from lora_trainer.cli import main
from lora_trainer.compat import canonical_clip_name
from lora_trainer.config import ModelInfo
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.merge import MergeOptions, OutputExistsError, merge_lora, model_yaml
from lora_trainer.preview import generate_picture
from lora_trainer.tiny import write_tiny_checkpoint

FP32 = dict(atol=1e-4, rtol=1e-4)
FP16 = dict(atol=2e-2, rtol=1e-2)


class Setup:
    """A working model "tiny" with lifetime steps 1000 and a random LoRA tiny_1000.safetensors."""

    def __init__(self, models, checkpoint):
        self.models, self.checkpoint = models, checkpoint
        self.folder = make_model(models, checkpoint)
        self.unet, self.text = load_parts(self.folder)
        self.lora = random_lora(self.unet, self.text)
        self.lora_path = save_lora(models.lora / f"tiny_{LIFETIME_STEPS}.safetensors", self.lora)

    def reference(self, unet_weight=1.0, text_weight=1.0, unet=None, text=None):
        """UNet and text-encoder outputs of the base with the LoRA applied (not merged)."""
        unet, text = unet or self.unet, text or self.text
        handles = apply_lora(unet, self.lora, "lora_unet", unet_weight) + apply_lora(text, self.lora, "lora_te", text_weight)
        try:
            return unet_output(unet), text_output(text)
        finally:
            for h in handles:
                h.remove()


@pytest.fixture
def sd1(models_dir, tiny_sd1):
    return Setup(models_dir, tiny_sd1)


@pytest.fixture
def sd2v(models_dir, tiny_sd2v):
    return Setup(models_dir, tiny_sd2v)


def tensors_of(path):
    with CheckpointReader(path) as reader:
        return {k: reader.get(k) for k in reader.keys()}


def assert_same_keys_and_shapes(source, merged, half=False):
    a, b = tensors_of(source), tensors_of(merged)
    assert list(a) and set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        expected = torch.float16 if half and a[key].is_floating_point() else a[key].dtype
        assert b[key].dtype == expected, key


@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
@pytest.mark.parametrize("half", [False, True])
def test_merged_checkpoint_equals_base_with_lora_applied(request, variant, half, tmp_path):
    s = request.getfixturevalue(variant)
    out = merge_lora(s.models, "tiny", half=half)
    assert out == s.models.checkpoints / f"tiny_{LIFETIME_STEPS}_lora.safetensors"
    assert_same_keys_and_shapes(s.checkpoint, out, half=half)

    base_unet, base_text = unet_output(s.unet), text_output(s.text)
    want_unet, want_text = s.reference()
    got_unet, got_text = (unet_output(m) if i == 0 else text_output(m)
                          for i, m in enumerate(load_checkpoint_parts(out, tmp_path / "back")))
    tolerance = FP16 if half else FP32
    assert (want_unet - base_unet).abs().max() > 0.1 and (want_text - base_text).abs().max() > 0.1
    torch.testing.assert_close(got_unet, want_unet, **tolerance)
    torch.testing.assert_close(got_text, want_text, **tolerance)


def test_sd2v_merge_has_its_v_prediction_yaml_beside_it(sd2v):
    out = merge_lora(sd2v.models, "tiny")
    yaml_text = out.with_suffix(".yaml").read_text()
    assert "parameterization: v" in yaml_text
    assert yaml_text == (sd2v.folder / "original_config.yaml").read_text()


def test_yaml_is_written_only_where_the_web_ui_needs_it(tmp_path):
    for model_type, config, wanted in (("sd1", shipped_config("sd1"), False), ("sd2", shipped_config("sd2"), False),
                                       ("sd2-v", shipped_config("sd2-v"), True), ("sd1", "custom: 1\n", True)):
        (tmp_path / "original_config.yaml").write_text(config)
        info = ModelInfo(model_name="m", model_type=model_type)
        assert (model_yaml(tmp_path, info) == config) is wanted, (model_type, config[:20])


@pytest.mark.parametrize("into", [False, True])
def test_weight_zero_gives_that_part_of_the_base_exactly(sd1, into):
    # Both weights 0 is refused (nothing would change): test_cli_merge.py.
    other = write_tiny_checkpoint(sd1.models.checkpoints, seed=1, name="other") if into else None
    out = merge_lora(sd1.models, "tiny", into="other" if into else None, unet_weight=0.0, text_weight=0.5)
    base, merged = tensors_of(other or sd1.checkpoint), tensors_of(out)
    assert set(base) == set(merged)
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed and all(key.startswith("cond_stage_model.") for key in changed), sorted(changed)[:3]
    for key in base:
        assert base[key].dtype == merged[key].dtype, key


def test_unet_and_text_weights_apply_separately(sd1, tmp_path):
    out = merge_lora(sd1.models, "tiny", unet_weight=0.5, text_weight=0.0)
    base, merged = tensors_of(sd1.checkpoint), tensors_of(out)
    text_keys = [k for k in base if k.startswith("cond_stage_model.")]
    assert text_keys and all(torch.equal(base[k], merged[k]) for k in text_keys)
    unet, text = load_checkpoint_parts(out, tmp_path / "back")
    want_unet, _ = sd1.reference(unet_weight=0.5, text_weight=0.0)
    torch.testing.assert_close(unet_output(unet), want_unet, **FP32)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_keys_and_shapes_are_exactly_the_sources(sd2v, fmt):
    out = merge_lora(sd2v.models, "tiny", fmt=fmt)
    assert out.suffix == f".{fmt}"
    assert_same_keys_and_shapes(sd2v.checkpoint, out)


def peft_style_lora(s, *, text_model_level: bool) -> dict[str, torch.Tensor]:
    """Our random LoRA as diffusers/peft would name it (lora_A/lora_B, module paths with dots)."""
    state = {}
    for prefix, part, model in (("lora_unet", "unet", s.unet), ("lora_te", "text_encoder", s.text)):
        for name, _ in model.named_modules():
            key = kohya_name(prefix, name)
            if f"{key}.lora_down.weight" in s.lora:
                path = canonical_clip_name(name) if prefix == "lora_te" else name
                if prefix == "lora_te" and not text_model_level:
                    path = path[len("text_model."):]
                state[f"{part}.{path}.lora_A.weight"] = s.lora[f"{key}.lora_down.weight"]
                state[f"{part}.{path}.lora_B.weight"] = s.lora[f"{key}.lora_up.weight"]
    return state


@pytest.mark.parametrize("variant,text_model_level", [("sd1", True), ("sd2v", False)])
def test_lora_written_by_diffusers_merges_the_same(request, variant, text_model_level):
    from diffusers.utils import convert_state_dict_to_kohya

    s = request.getfixturevalue(variant)
    converted = convert_state_dict_to_kohya(peft_style_lora(s, text_model_level=text_model_level))
    assert any(k.startswith("lora_te1_") for k in converted)  # diffusers' own spelling of the text encoder
    save_lora(s.models.lora / "from_diffusers.safetensors", converted)
    # The same tensors written our way; diffusers writes alpha = rank.
    ours = {k: (torch.tensor(float(s.lora[k.replace(".alpha", ".lora_down.weight")].shape[0])) if k.endswith(".alpha") else v)
            for k, v in s.lora.items()}
    save_lora(s.models.lora / "ours.safetensors", ours)
    theirs_out = merge_lora(s.models, "tiny", lora="from_diffusers", custom_name="theirs")
    ours_out = merge_lora(s.models, "tiny", lora="ours.safetensors", custom_name="ours")
    theirs, mine, base = tensors_of(theirs_out), tensors_of(ours_out), tensors_of(s.checkpoint)
    assert any(not torch.equal(mine[k], base[k]) for k in base)
    for key in base:
        assert torch.equal(theirs[key], mine[key]), key


ORIGINAL_NAMES = {
    "sd1": {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_middle_block_1_proj_in": "lora_unet_mid_block_attentions_0_proj_in",
            "lora_unet_output_blocks_1_0_in_layers_2": "lora_unet_up_blocks_0_resnets_1_conv1",
            "lora_te_transformer_text_model_encoder_layers_0_self_attn_q_proj": "lora_te_text_model_encoder_layers_0_self_attn_q_proj"},
    "sd2v": {"lora_unet_output_blocks_3_1_proj_out": "lora_unet_up_blocks_1_attentions_0_proj_out",
             "lora_te_model_transformer_resblocks_0_attn_k_proj": "lora_te_text_model_encoder_layers_0_self_attn_k_proj",
             "lora_te_model_transformer_resblocks_1_mlp_c_fc": "lora_te_text_model_encoder_layers_1_mlp_fc1",
             "lora_te_model_transformer_resblocks_1_attn_out_proj": "lora_te_text_model_encoder_layers_1_self_attn_out_proj"},
}


@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_original_layout_module_names_merge_the_same(request, variant):
    s = request.getfixturevalue(variant)
    names = ORIGINAL_NAMES[variant]
    diffusers_style = {k: v for k, v in s.lora.items() if k.split(".")[0] in names.values()}
    original_style = {k.replace(diffusers_name, original_name, 1): v for original_name, diffusers_name in names.items()
                      for k, v in s.lora.items() if k.split(".")[0] == diffusers_name}
    assert len(diffusers_style) == len(original_style) == 3 * len(names)
    save_lora(s.models.lora / "a.safetensors", diffusers_style)
    save_lora(s.models.lora / "b.safetensors", original_style)
    a = tensors_of(merge_lora(s.models, "tiny", lora="a", custom_name="a"))
    b = tensors_of(merge_lora(s.models, "tiny", lora="b", custom_name="b"))
    base = tensors_of(s.checkpoint)
    assert sum(not torch.equal(a[k], base[k]) for k in base) == len(names)
    for key in base:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_merge_into_another_checkpoint_of_the_same_family(request, variant, tmp_path):
    s = request.getfixturevalue(variant)
    other = write_tiny_checkpoint(s.models.checkpoints, v2=variant == "sd2v", seed=1, name="other")
    out = merge_lora(s.models, "tiny", into="other", half=True)
    assert out == s.models.checkpoints / f"tiny_{LIFETIME_STEPS}_lora.safetensors"
    assert_same_keys_and_shapes(other, out, half=True)
    assert out.with_suffix(".yaml").read_text() == other.with_suffix(".yaml").read_text()
    with CheckpointReader(out) as reader:
        assert reader.metadata["lora_trainer_base"] == "other.safetensors"
        assert reader.metadata["lora_trainer_base_sha256"] == file_sha256(other)
    assert s.models.hash_cache.get(other) == file_sha256(other)  # the next merge into it does not read it to hash

    other_unet, other_text = load_checkpoint_parts(other, tmp_path / "other")
    want_unet, want_text = s.reference(unet=other_unet, text=other_text)
    got_unet, got_text = load_checkpoint_parts(out, tmp_path / "back")
    torch.testing.assert_close(unet_output(got_unet), want_unet, **FP16)
    torch.testing.assert_close(text_output(got_text), want_text, **FP16)


def test_merge_into_a_checkpoint_of_another_family_is_refused(sd1, tiny_sd2v):
    with pytest.raises(ModelError, match=r"tiny-sd2-v\.safetensors is SD 2\.x, the model 'tiny' is SD 1\.x"):
        merge_lora(sd1.models, "tiny", into=str(tiny_sd2v))


def test_naming_subdirectory_and_no_silent_overwrite(sd1):
    models = sd1.models
    first = merge_lora(models, "tiny", **asdict(MergeOptions(fmt="ckpt")))  # the UI passes its settings this way
    assert first == models.checkpoints / f"tiny_{LIFETIME_STEPS}_lora.ckpt"
    sub = merge_lora(models, "tiny", subdir=True, custom_name="scs girl")
    assert sub == models.checkpoints / "scs girl" / f"scs girl_{LIFETIME_STEPS}_lora.safetensors"
    assert merge_lora(models, "tiny", subdir=True) == models.checkpoints / "tiny" / f"tiny_{LIFETIME_STEPS}_lora.safetensors"

    before = first.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        merge_lora(models, "tiny", fmt="ckpt", unet_weight=0.0)
    assert first.read_bytes() == before
    merge_lora(models, "tiny", fmt="ckpt", unet_weight=0.0, overwrite=True)
    assert first.read_bytes() != before
    with pytest.raises(ConfigError, match="Custom Model Name"):
        merge_lora(models, "tiny", custom_name="../escape")


def test_metadata_names_the_base_and_the_lora_and_progress_is_reported(sd1):
    events = []
    out = merge_lora(sd1.models, "tiny", unet_weight=0.75, progress=lambda message, fraction: events.append(fraction))
    assert len(events) > 10 and events == sorted(events) and events[0] >= 0.0 and events[-1] == 1.0
    with CheckpointReader(out) as reader:
        meta = reader.metadata
    assert meta["lora_trainer_base"] == sd1.checkpoint.name
    assert meta["lora_trainer_base_sha256"] == file_sha256(sd1.checkpoint)
    assert meta["lora_trainer_lora"] == sd1.lora_path.name
    assert meta["lora_trainer_lora_sha256"] == file_sha256(sd1.lora_path)
    assert meta["lora_trainer_unet_weight"] == "0.75"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_lora_with_foreign_keys_is_refused_with_their_count(sd1):
    state = dict(sd1.lora)
    for name in ("lora_unet_down_blocks_7_attentions_0_proj_in", "lora_te_text_model_encoder_layers_40_mlp_fc1"):
        state[f"{name}.lora_down.weight"] = torch.ones(4, 8)
        state[f"{name}.lora_up.weight"] = torch.ones(8, 4)
    save_lora(sd1.models.lora / "foreign.safetensors", state)
    with pytest.raises(ModelError, match=r"foreign\.safetensors: 4 LoRA keys match no weight of the model 'tiny' "
                                         r"\(e\.g\. lora_te_text_model_encoder_layers_40"):
        merge_lora(sd1.models, "tiny", lora="foreign")
    assert not any(sd1.models.checkpoints.glob("*_lora.*"))


def test_lora_of_the_wrong_shapes_is_refused(sd1):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    state = dict(sd1.lora, **{f"{key}.lora_down.weight": torch.ones(4, 768)})
    save_lora(sd1.models.lora / "wide.safetensors", state)
    with pytest.raises(ModelError, match=rf"1 LoRA modules do not fit the weights of the model 'tiny' \(e\.g\. {key}: \(32, 768\) vs \(32, 64\)\)"):
        merge_lora(sd1.models, "tiny", lora="wide")


def test_an_untrained_lora_is_refused_instead_of_writing_the_base_unchanged(sd1):
    state = {k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in sd1.lora.items()}
    save_lora(sd1.models.lora / "untrained.safetensors", state)
    with pytest.raises(ModelError, match=r"untrained\.safetensors: every up weight is zero, so merging it changes nothing"):
        merge_lora(sd1.models, "tiny", lora="untrained")
    assert not any(sd1.models.checkpoints.glob("*_lora.*"))


def test_sd1_lora_into_an_sd2_model_is_refused_by_name(sd2v):
    save_lora(sd2v.models.lora / "sd1.safetensors", sd2v.lora, {"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    with pytest.raises(ModelError, match=r"this LoRA is for SD 1\.x, the model 'tiny' is SD 2\.x"):
        merge_lora(sd2v.models, "tiny", lora="sd1")


def test_sd2_lora_without_metadata_is_recognised_by_its_width(sd1):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_lora(sd1.models.lora / "sd2.safetensors", {f"{key}.lora_down.weight": torch.ones(4, 1024),
                                                     f"{key}.lora_up.weight": torch.ones(32, 4)})
    with pytest.raises(ModelError, match=r"this LoRA is for SD 2\.x, the model 'tiny' is SD 1\.x"):
        merge_lora(sd1.models, "tiny", lora="sd2")


def test_non_finite_merge_is_refused_naming_the_module_and_leaves_no_file(sd1):
    key = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    state = dict(sd1.lora)
    state[f"{key}.lora_up.weight"] = state[f"{key}.lora_up.weight"].clone()
    state[f"{key}.lora_up.weight"][0, 0] = float("nan")
    save_lora(sd1.models.lora / "broken.safetensors", state)
    with pytest.raises(ModelError, match=rf"merging module {key} gives non-finite values"):
        merge_lora(sd1.models, "tiny", lora="broken")
    leftovers = [p.name for p in sd1.models.checkpoints.rglob("*") if p.name not in (sd1.checkpoint.name, sd1.checkpoint.with_suffix(".yaml").name)]
    assert leftovers == []


def test_not_a_plain_lora_is_refused(sd1):
    save_lora(sd1.models.lora / "loha.safetensors", {"lora_unet_conv_in.hada_w1_a": torch.ones(2, 2),
                                                     "lora_unet_conv_in.hada_w1_b": torch.ones(2, 2)})
    with pytest.raises(ModelError, match="LoHa and LoKr files cannot be merged"):
        merge_lora(sd1.models, "tiny", lora="loha")


def test_default_lora_is_the_models_latest(sd1):
    models = sd1.models
    lora_of = lambda out: CheckpointReader(out).metadata["lora_trainer_lora"]  # noqa: E731
    save_lora(models.lora / "tiny_20.safetensors", sd1.lora)
    save_lora(models.lora / "tiny-other_5000.safetensors", sd1.lora)
    assert lora_of(merge_lora(models, "tiny", custom_name="newest")) == f"tiny_{LIFETIME_STEPS}.safetensors"

    info_path = sd1.folder / "model_info.json"
    info = ModelInfo.load(info_path)
    info.latest_lora = "tiny_20.safetensors"
    info.save(info_path)
    assert lora_of(merge_lora(models, "tiny", custom_name="recorded")) == "tiny_20.safetensors"

    info.latest_lora = "tiny_30.safetensors"
    info.save(info_path)
    with pytest.raises(ModelError, match="latest LoRA 'tiny_30.safetensors' is missing"):
        merge_lora(models, "tiny", custom_name="missing")
    info.latest_lora = ""
    info.save(info_path)
    for path in models.lora.glob("tiny_*.safetensors"):
        path.unlink()
    with pytest.raises(ModelError, match="no LoRA for model 'tiny'"):
        merge_lora(models, "tiny", custom_name="none")


def test_command_line_prints_the_path_and_refuses_to_overwrite(sd1, capsys):
    argv = ["merge", "--models-dir", str(sd1.models.checkpoints.parent), "--model", "tiny", "--lora",
            str(sd1.lora_path), "--half", "--subdir", "--name", "cli", "--text-weight", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(sd1.models.checkpoints / "cli" / f"cli_{LIFETIME_STEPS}_lora.safetensors")
    with CheckpointReader(printed) as reader:
        assert reader.get("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert reader.metadata["lora_trainer_text_weight"] == "0.0"
    assert main(argv) == 2
    assert "pass a new --name" in capsys.readouterr().err


def test_a_picture_is_generated_from_the_merged_checkpoint(sd1, tmp_path):
    from PIL import Image

    out = merge_lora(sd1.models, "tiny")
    picture = generate_picture(out, "chibi scs girl", tmp_path / "pictures" / "merged.png", steps=2)
    with Image.open(picture) as image:
        assert image.size == (64, 64) and image.format == "PNG"
        low, high = image.convert("L").getextrema()
        assert low < high


def test_a_weight_merged_in_blocks_of_rows_equals_the_whole_weight_merged(sd2v, monkeypatch):
    """SD 2.x's OpenCLIP fused q/k/v rows, merged 3 rows at a time at width 32: blocks straddle q, k and v."""
    from lora_trainer import merge

    write_tiny_checkpoint(sd2v.models.checkpoints, v2=True, seed=1, name="other")
    whole = tensors_of(merge_lora(sd2v.models, "tiny", into="other", custom_name="whole"))
    monkeypatch.setattr(merge, "_CHUNK_ELEMENTS", 96)
    blocks = tensors_of(merge_lora(sd2v.models, "tiny", into="other", custom_name="blocks"))
    base = tensors_of(sd2v.models.checkpoints / "other.safetensors")
    fused = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert fused in whole and not torch.equal(whole[fused], base[fused])
    assert set(whole) == set(blocks)
    for key in whole:
        torch.testing.assert_close(blocks[key], whole[key], atol=1e-6, rtol=1e-6)


def test_a_half_model_beyond_fp16s_range_is_refused_and_the_same_merge_in_fp32_is_written(sd1):
    key = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    state = {k: v for k, v in sd1.lora.items() if k.startswith(key)}
    state[f"{key}.lora_up.weight"] = torch.full_like(state[f"{key}.lora_up.weight"], 300.0)
    state[f"{key}.lora_down.weight"] = torch.full_like(state[f"{key}.lora_down.weight"], 300.0)
    save_lora(sd1.models.lora / "large.safetensors", state)
    with pytest.raises(ModelError, match=rf"merging module {key} gives non-finite values .*beyond"):
        merge_lora(sd1.models, "tiny", lora="large", half=True)
    assert merge_lora(sd1.models, "tiny", lora="large").is_file()
