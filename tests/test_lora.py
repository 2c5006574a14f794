"""LoRA adapters: step 0 is the base model, only adapters train, the file is kohya's and reads back everywhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers_lora import (header_of, independent_addnet_hash, independent_legacy_hash, inject_both,
                          metadata_for, peft_backend_problem, randomize)
from helpers_merge import load_checkpoint_parts, load_parts, make_model, text_output, unet_output
from lora_trainer.checkpoint import load_model_spec
from lora_trainer.checkpoint_io import file_sha256
from lora_trainer.config import ModelInfo, TrainingParams
from lora_trainer.errors import ModelError
from lora_trainer.kohya import family_from_metadata, read_kohya_lora, resolve, target_table
from lora_trainer.lora import (TEXT_TARGETS, UNET_TARGETS, LoRALinear, inject_lora, load_lora_state_dict,
                               lora_parameters, lora_state_dict, read_lora, remove_lora, save_lora)


@pytest.fixture(scope="module", params=["sd1", "sd2v"])
def model_dir(request, tmp_path_factory):
    """A working model created from the tiny SD 1.x or SD 2.x-v checkpoint (shared, do not modify)."""
    from lora_trainer.host import ModelsDir
    from lora_trainer.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    checkpoint = write_tiny_checkpoint(root / "ckpt", v2=request.param == "sd2v")
    models = ModelsDir.at(root / "models")
    models.checkpoints.mkdir(parents=True)
    return make_model(models, checkpoint)


def model_type(model_dir) -> str:
    return ModelInfo.load(model_dir / "model_info.json").model_type


def test_step_zero_is_the_base_model_exactly(model_dir):
    unet, text = load_parts(model_dir)
    base_unet, base_text = unet_output(unet), text_output(text)
    unet_lora, text_lora = inject_both(unet, text)
    assert len(unet_lora) == sum(1 for n, m in unet.named_modules() if isinstance(m, LoRALinear))
    assert all(torch.equal(a.lora_up.weight, torch.zeros_like(a.lora_up.weight)) for a in unet_lora.values())
    assert torch.equal(unet_output(unet), base_unet)
    assert torch.equal(text_output(text), base_text)


def test_names_are_the_kohya_names_that_resolve_to_the_adapted_weights(model_dir, tmp_path):
    unet, text = load_parts(model_dir)
    unet_lora, text_lora = inject_both(unet, text)
    attentions = [n for n, m in load_parts(model_dir)[0].named_modules() if type(m).__name__ == "Attention"]
    assert len(attentions) > 0 and len(unet_lora) == 4 * len(attentions)
    assert len(text_lora) == 4 * text.config.num_hidden_layers
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in text_lora)
    path = save_lora(tmp_path / "names.safetensors", lora_state_dict(unet_lora, text_lora), metadata_for(model_dir))
    table = target_table(load_model_spec(model_dir))
    lora = read_kohya_lora(path)
    family = "sd1" if model_type(model_dir) == "sd1" else "sd2"
    targets = resolve(lora, table, family=family, where="the tiny model")  # raises on any unmatched key
    assert set(targets) == set(unet_lora) | set(text_lora)
    for name, adapter in {**unet_lora, **text_lora}.items():
        target = targets[name]
        assert target.shape == tuple(adapter.base.weight.shape), name
        assert target.part == ("unet" if name.startswith("lora_unet_") else "text_encoder")
        assert target.diffusers_key.rsplit(".", 2)[-2] in {t.rsplit(".", 1)[-1] for t in UNET_TARGETS + TEXT_TARGETS}


def test_only_the_adapters_require_and_get_gradients(model_dir):
    unet, text = load_parts(model_dir)
    unet.requires_grad_(False)
    text.requires_grad_(True)  # inject freezes the wrapped weights even when they required gradients
    unet_lora, text_lora = inject_both(unet, text)
    trainable = {id(p) for p in lora_parameters(unet_lora) + lora_parameters(text_lora)}
    assert all(not a.base.weight.requires_grad for a in {**unet_lora, **text_lora}.values())
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(unet_lora)}
    text.requires_grad_(False)
    for p in lora_parameters(text_lora):
        p.requires_grad_(True)
    randomize(unet_lora)  # with up = 0 the down weights get zero gradients
    ids = torch.randint(0, text.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    cond = text(ids).last_hidden_state
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    unet(sample, torch.tensor([10, 500]), encoder_hidden_states=cond).sample.square().mean().backward()
    for model in (unet, text):
        for name, p in model.named_parameters():
            if id(p) in trainable:
                assert p.grad is not None, name
            else:
                assert p.grad is None, name
    assert all(a.lora_up.weight.grad.abs().sum() > 0 for a in {**unet_lora, **text_lora}.values())
    assert all(a.lora_down.weight.grad.abs().sum() > 0 for a in unet_lora.values())


def test_fp32_adapters_on_a_bf16_base(model_dir):
    unet, text = load_parts(model_dir)
    unet_lora, text_lora = inject_both(unet, text)
    randomize(unet_lora)
    reference = unet_output(unet)
    for adapter in unet_lora.values():
        adapter.multiplier = 0.0
    effect = (unet_output(unet) - reference).abs().max()
    for adapter in unet_lora.values():
        adapter.multiplier = 1.0
    unet.to(torch.bfloat16)
    for adapter in unet_lora.values():  # training keeps the adapters in fp32
        adapter.lora_down.to(torch.float32)
        adapter.lora_up.to(torch.float32)
    generator = torch.Generator().manual_seed(0)  # the inputs of unet_output
    sample = torch.randn((2, unet.config.in_channels, 8, 8), generator=generator)
    cond = torch.randn((2, 5, unet.config.cross_attention_dim), generator=generator)
    out = unet(sample.bfloat16(), torch.tensor([10, 700]), encoder_hidden_states=cond.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    error = (out.float() - reference).abs().max()
    assert error < effect / 5, (error, effect)  # bf16 rounding, far less than what the adapters add
    out.float().square().mean().backward()
    up = next(iter(unet_lora.values())).lora_up.weight
    assert up.dtype == torch.float32 and up.grad is not None and up.grad.dtype == torch.float32


def test_double_injection_is_refused_and_removal_restores_the_model(model_dir):
    unet, text = load_parts(model_dir)
    before = dict(unet.named_modules())
    inject_lora(unet, UNET_TARGETS, rank=2, alpha=2, prefix="lora_unet")
    with pytest.raises(RuntimeError, match="already holds LoRA"):
        inject_lora(unet, UNET_TARGETS, rank=2, alpha=2, prefix="lora_unet")
    remove_lora(unet)
    after = dict(unet.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(text, ("no_such_proj",), rank=2, alpha=2, prefix="lora_te")


def test_save_and_read_round_trip_with_metadata(model_dir, tmp_path):
    unet, text = load_parts(model_dir)
    unet_lora, text_lora = inject_both(unet, text, rank=4, alpha=3.0)
    randomize(unet_lora, 1)
    randomize(text_lora, 2)
    tensors = lora_state_dict(unet_lora, text_lora)
    metadata = metadata_for(model_dir)
    path = save_lora(tmp_path / "tiny_10.safetensors", tensors, metadata)
    back, meta = read_lora(path)
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(back[key], tensor), key
    assert float(back[next(k for k in back if k.endswith(".alpha"))]) == 3.0
    assert {k: meta[k] for k in metadata} == metadata
    assert meta["ss_v2"] == ("False" if model_type(model_dir) == "sd1" else "True")
    with safe_open(str(path), framework="pt") as f:  # the safetensors library reads it too
        assert set(f.keys()) == set(tensors) and f.metadata()["sshs_model_hash"] == meta["sshs_model_hash"]
    # Loading into fresh adapters (resume) reproduces the outputs.
    expected = unet_output(unet), text_output(text)
    unet2, text2 = load_parts(model_dir)
    unet2_lora, text2_lora = inject_both(unet2, text2, rank=4, alpha=3.0)
    load_lora_state_dict({**unet2_lora, **text2_lora}, back, source=path.name)
    assert torch.equal(unet_output(unet2), expected[0]) and torch.equal(text_output(text2), expected[1])


def test_half_save_writes_fp16(model_dir, tmp_path):
    unet, text = load_parts(model_dir)
    unet_lora, text_lora = inject_both(unet, text)
    randomize(unet_lora)
    tensors = lora_state_dict(unet_lora, text_lora)
    path = save_lora(tmp_path / "half.safetensors", tensors, metadata_for(model_dir), dtype=torch.float16)
    back, _ = read_lora(path)
    assert {v.dtype for k, v in back.items() if not k.endswith(".alpha")} == {torch.float16}
    key = next(k for k in tensors if k.endswith("lora_up.weight") and k.startswith("lora_unet"))
    torch.testing.assert_close(back[key].float(), tensors[key], atol=1e-3, rtol=1e-3)
    assert independent_addnet_hash(path) == header_of(path)["__metadata__"]["sshs_model_hash"]


def test_strict_loading_names_the_file_and_the_keys(model_dir):
    unet, text = load_parts(model_dir)
    unet_lora, _ = inject_both(unet, text, rank=4)
    tensors = lora_state_dict(unet_lora)
    first = next(iter(unet_lora))
    missing = {k: v for k, v in tensors.items() if not k.startswith(first + ".")}
    with pytest.raises(ModelError, match=rf"old\.safetensors.*3 keys missing.*{first}"):
        load_lora_state_dict(unet_lora, missing, source="old.safetensors")
    with pytest.raises(ModelError, match="1 unexpected keys.*lora_unet_extra"):
        load_lora_state_dict(unet_lora, {**tensors, "lora_unet_extra.alpha": torch.tensor(1.0)}, source="old.safetensors")
    unet8, text8 = load_parts(model_dir)
    unet8_lora, _ = inject_both(unet8, text8, rank=8)
    with pytest.raises(ModelError, match=r"old\.safetensors.*another shape.*rank changed"):
        load_lora_state_dict(unet8_lora, tensors, source="old.safetensors")
    changed = {k: (torch.tensor(7.0) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    with pytest.raises(ModelError, match="alpha 7"):
        load_lora_state_dict(unet_lora, changed, source="old.safetensors")


@pytest.mark.parametrize("size", [1000, 700_000])  # under 1 MiB: empty legacy window; over: a full one
def test_hashes_in_the_header_are_those_of_the_written_file(tmp_path, size):
    generator = torch.Generator().manual_seed(size)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(2, size // 2, generator=generator),
               "lora_unet_a.lora_up.weight": torch.randn(size // 4, 2, generator=generator).half(),
               "lora_unet_a.alpha": torch.tensor(2.0)}
    path = save_lora(tmp_path / "hashed.safetensors", tensors, {"ss_output_name": "hashed", "long": "x" * 5000})
    metadata = header_of(path)["__metadata__"]
    assert metadata["sshs_model_hash"] == independent_addnet_hash(path)
    assert metadata["sshs_legacy_hash"] == independent_legacy_hash(path)
    assert path.stat().st_size > 0x110000 if size > 500_000 else metadata["sshs_legacy_hash"] == "e3b0c442"


def test_no_overwrite_and_no_leftover_on_failure(tmp_path, monkeypatch):
    import lora_trainer.safetensors_stream as stream

    tensors = {"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
               "lora_unet_a.alpha": torch.tensor(2.0)}
    path = save_lora(tmp_path / "mine.safetensors", tensors, {"ss_output_name": "mine"})
    original = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_lora(path, {**tensors, "lora_unet_a.alpha": torch.tensor(1.0)}, {})
    assert path.read_bytes() == original

    def disk_full(tensor):
        raise OSError("No space left on device")

    monkeypatch.setattr(stream, "tensor_bytes", disk_full)
    # A full disk is one line naming the folder (errors.DiskFullError, an OSError).
    with pytest.raises(OSError, match="the disk is full: writing mine.safetensors"):
        save_lora(path, tensors, {}, overwrite=True)
    with pytest.raises(OSError, match="the disk is full: writing new.safetensors"):
        save_lora(tmp_path / "new.safetensors", tensors, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors"]
    assert path.read_bytes() == original
    monkeypatch.undo()
    save_lora(path, {**tensors, "lora_unet_a.alpha": torch.tensor(1.0)}, {}, overwrite=True)
    assert float(read_lora(path)[0]["lora_unet_a.alpha"]) == 1.0
    with pytest.raises(TypeError, match="strings"):
        save_lora(tmp_path / "bad.safetensors", tensors, {"ss_steps": 10})


def test_metadata_is_what_the_web_ui_and_kohya_tools_read(model_dir, tmp_path):
    source = model_dir.parent.parent / "Stable-diffusion" / ModelInfo.load(model_dir / "model_info.json").source_checkpoint
    model_dir = Path(shutil.copytree(model_dir, tmp_path / model_dir.name))  # the shared model is not changed
    params = TrainingParams(rank=8, lora_alpha=4, text_encoder_rank=4, text_encoder_alpha=4, resolution=64, seed=-1)

    def meta_now():
        return metadata_for(model_dir, params, steps=30, epochs=3, num_images=10, started_at=1700000000.5,
                            finished_at=1700000100.0, output_name="tiny_30", seed=1234, source_checkpoint=source)

    assert "ss_new_sd_model_hash" not in meta_now()  # Create Model left the source's hash to the first run
    info = ModelInfo.load(model_dir / "model_info.json")
    info.source_checkpoint_hash = file_sha256(source)  # as the first run's first save records it
    info.save(model_dir / "model_info.json")
    meta = meta_now()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4.0")
    assert meta["ss_base_model_version"] == info.base_model_version
    assert meta["ss_v2"] == str(info.model_type != "sd1")
    assert meta["ss_output_name"] == "tiny_30" and meta["ss_sd_model_name"] == info.source_checkpoint
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_train_images"]) == ("30", "3", "10")
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_seed"] == "1234"
    assert float(meta["ss_training_started_at"]) == 1700000000.5
    assert meta["ss_new_sd_model_hash"] == info.source_checkpoint_hash
    assert meta["ss_sd_model_hash"] == independent_legacy_hash(source)
    assert json.loads(meta["ss_network_args"]) == {"text_encoder_dim": "4", "text_encoder_alpha": "4.0"}
    assert meta["lora_trainer_model"] == info.model_name
    assert meta["lora_trainer_lifetime_steps"] == str(info.lifetime_steps)
    assert meta["lora_trainer_prediction_type"] == info.prediction_type
    # ModelSpec, as kohya writes it for a LoRA, which kohya.family_from_metadata reads back
    architecture = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                    "sd2-v": "stable-diffusion-v2-768-v"}[info.model_type]
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (architecture + "/lora", "diffusers")
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == ("tiny_30", "64x64")
    assert meta["modelspec.prediction_type"] == ("v" if info.prediction_type == "v_prediction" else "epsilon")
    assert family_from_metadata({"modelspec.architecture": meta["modelspec.architecture"]}) == \
        ("sd1" if info.model_type == "sd1" else "sd2")
    same = metadata_for(model_dir, TrainingParams(rank=4, lora_alpha=4, text_encoder_rank=4, text_encoder_alpha=4))
    assert "ss_network_args" not in same and "ss_sd_model_hash" not in same


def test_merged_checkpoint_gives_the_outputs_of_the_injected_model(tiny_sd1, tiny_sd2v, models_dir, tmp_path):
    from lora_trainer.merge import merge_lora

    for checkpoint, name in ((tiny_sd1, "tiny"), (tiny_sd2v, "tinyv")):
        folder = make_model(models_dir, checkpoint, name)
        unet, text = load_parts(folder)
        unet_lora, text_lora = inject_both(unet, text, rank=4, alpha=2.0)
        randomize(unet_lora, 3)
        randomize(text_lora, 4)
        expected = unet_output(unet), text_output(text)
        remove_lora(unet)
        remove_lora(text)
        base = unet_output(unet), text_output(text)
        lora = save_lora(models_dir.lora / f"{name}_1000.safetensors", lora_state_dict(unet_lora, text_lora),
                         metadata_for(folder))
        merged = merge_lora(models_dir, name, lora=str(lora))
        merged_unet, merged_text = load_checkpoint_parts(merged, tmp_path / name)
        got = unet_output(merged_unet), text_output(merged_text)
        for have, want, was in zip(got, expected, base):
            assert (want - was).abs().max() > 1e-2  # the LoRA changes the outputs clearly
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_diffusers_load_lora_weights_reads_the_file_the_same(model_dir, tmp_path):
    reason = peft_backend_problem()
    if reason:
        pytest.skip(reason)
    from lora_trainer.pipeline import load_pipeline

    unet, text = load_parts(model_dir)
    unet_lora, text_lora = inject_both(unet, text, rank=4, alpha=2.0)
    randomize(unet_lora, 5)
    randomize(text_lora, 6)
    path = save_lora(tmp_path / "for_diffusers.safetensors", lora_state_dict(unet_lora, text_lora), metadata_for(model_dir))
    pipe = load_pipeline(model_dir)
    base, base_text = unet_output(pipe.unet), text_output(pipe.text_encoder)
    # Folder + weight_name: diffusers 0.31 refuses a bare file path when offline.
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    for have, want, was in ((unet_output(pipe.unet), unet_output(unet), base),
                            (text_output(pipe.text_encoder), text_output(text), base_text)):
        assert (want - was).abs().max() > 1e-2
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
