"""Create Model: conversion against diffusers' own loader, EMA, revision, names, failures."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer import checkpoint as checkpoint_module
from lora_trainer.checkpoint import create_model
from lora_trainer.checkpoint_io import CheckpointReader, save_checkpoint
from lora_trainer.config import ModelInfo
from lora_trainer.errors import CheckpointError, ConfigError, ModelError
from lora_trainer.host import validate_model_name
from lora_trainer.tiny import tiny_original_config, tiny_state_dict


def _place(models, source, name=None):
    """Copy a tiny checkpoint and its yaml into the models folder."""
    name = name or source.name
    shutil.copy(source, models.checkpoints / name)
    shutil.copy(source.with_suffix(".yaml"), (models.checkpoints / name).with_suffix(".yaml"))
    return models.checkpoints / name


def _write(models, tensors, name, fmt="safetensors", v2=False, wrap=None):
    path = models.checkpoints / f"{name}.{fmt}"
    path.with_suffix(".yaml").write_text(tiny_original_config(v2))
    if wrap is not None:
        torch.save(wrap(tensors), path)
    else:
        save_checkpoint(tensors, path, fmt=fmt)
    return path


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2v"])
def test_parts_match_diffusers_single_file_loader(request, variant, models_dir):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    source = _place(models_dir, request.getfixturevalue(variant))
    folder = create_model(models_dir, source.name, "m")
    common = dict(config=str(folder), local_files_only=True)
    theirs = StableDiffusionPipeline.from_single_file(str(source), original_config=str(source.with_suffix(".yaml")),
                                                      safety_checker=None, **common)
    ours_unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    ours_vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    ours_text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    for ours, their in ((ours_unet, theirs.unet), (ours_vae, theirs.vae), (ours_text, theirs.text_encoder)):
        a, b = ours.state_dict(), their.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        assert torch.allclose(ours_unet(x, 500, ctx).sample, theirs.unet(x, 500, ctx).sample, atol=1e-5)
        img = torch.randn(1, 3, 64, 64, generator=g)
        assert torch.allclose(ours_vae(img).sample, theirs.vae(img).sample, atol=1e-5)
        ids = torch.randint(0, 49408, (1, 77), generator=g)
        assert torch.allclose(ours_text(ids)[0], theirs.text_encoder(ids)[0], atol=1e-5)
    # And the separately built tokenizer is CLIP's.
    assert theirs.tokenizer is not None
    info = ModelInfo.load(folder / "model_info.json")
    assert info.prediction_type == ("v_prediction" if variant == "tiny_sd2v" else "epsilon")


def test_model_info_records_source(models_dir, tiny_sd1):
    (models_dir.checkpoints / "sub").mkdir()
    source = _place(models_dir, tiny_sd1, "sub/my model.safetensors")
    folder = create_model(models_dir, "my model", "m")
    info = json.loads((folder / "model_info.json").read_text())
    assert info["source_checkpoint"] == "sub/my model.safetensors"
    # Never hashed before: its hash is left to the first job that needs it (tests/test_source_hash.py).
    assert info["source_checkpoint_hash"] == ""
    assert (info["source_checkpoint_size"], info["source_checkpoint_mtime_ns"]) == (source.stat().st_size,
                                                                                   source.stat().st_mtime_ns)
    assert (info["model_type"], info["resolution"], info["revision"], info["lifetime_steps"]) == ("sd1", 64, 0, 0)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir()
    # Old `tokenizers` (the web UI's 0.13) cannot read a tokenizer.json written by a new one.
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    assert not (folder / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_fp16_with_and_without_state_dict_wrapper_and_step_count(models_dir, wrapped):
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict().items()}
    wrap = (lambda t: {"state_dict": t, "global_step": 1234, "epoch": 3}) if wrapped else (lambda t: t)
    path = _write(models_dir, tensors, "half", fmt="ckpt", wrap=wrap)
    folder = create_model(models_dir, path.name, "m")
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in unet.values())
    assert ModelInfo.load(folder / "model_info.json").revision == (1234 if wrapped else 0)


def test_extract_ema_uses_ema_weights(models_dir):
    tensors = tiny_state_dict()
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    ema = {checkpoint_module.ema_key(k): tensors[k] + 1.0 for k in unet_keys}
    path = _write(models_dir, {**tensors, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(10, dtype=torch.int32)}, "ema")
    plain = create_model(models_dir, path.name, "plain")
    with_ema = create_model(models_dir, path.name, "ema", extract_ema=True)
    a = load_file(str(plain / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(with_ema / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k] + 1.0, b[k]) for k in a)
    assert ModelInfo.load(with_ema / "model_info.json").extracted_ema
    extras = load_file(str(with_ema / "original_extras.safetensors"))
    assert not any(k.startswith("model_ema.") for k in extras)


def test_extract_ema_without_ema_weights_warns_and_uses_normal_weights(models_dir, tiny_sd1, caplog):
    source = _place(models_dir, tiny_sd1)
    folder = create_model(models_dir, source.name, "m", extract_ema=True)
    assert "has no EMA weights" in caplog.text
    assert not ModelInfo.load(folder / "model_info.json").extracted_ema


def test_malicious_ckpt_is_refused_and_its_payload_never_runs(models_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = models_dir.checkpoints / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        create_model(models_dir, "evil.ckpt", "m")
    message = str(err.value)
    assert "evil.ckpt" in message and "refused" in message and "system" in message
    assert "\n" not in message
    assert not marker.exists()
    assert not models_dir.model_dir("m").exists()


def test_real_lightning_ckpt_records_load_as_inert_data(models_dir):
    # Real SD .ckpt files store a Lightning ModelCheckpoint record beside the weights.
    import sys
    import types

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        sys.modules.setdefault(name, types.ModuleType(name) if name != module.__name__ else module)
    try:
        tensors = tiny_state_dict()
        path = _write(models_dir, tensors, "lightning", fmt="ckpt",
                      wrap=lambda t: {"state_dict": t, "global_step": 7, "callbacks": {ModelCheckpoint: {"best_model_score": 1.0}}})
    finally:
        for name in (module.__name__, "pytorch_lightning.callbacks", "pytorch_lightning"):
            sys.modules.pop(name, None)
    folder = create_model(models_dir, path.name, "m")
    assert ModelInfo.load(folder / "model_info.json").revision == 7


@pytest.mark.parametrize("kind", ["empty", "truncated_safetensors", "truncated_ckpt", "text", "wrong_suffix", "no_unet"])
def test_broken_files_give_one_line_errors(models_dir, tiny_sd1, kind):
    target = models_dir.checkpoints / "broken.safetensors"
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated_safetensors":
        target.write_bytes(tiny_sd1.read_bytes()[: tiny_sd1.stat().st_size // 2])
    elif kind == "truncated_ckpt":
        full = models_dir.checkpoints / "full.ckpt"
        torch.save({"state_dict": tiny_state_dict()}, full)
        target = models_dir.checkpoints / "broken.ckpt"
        target.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        full.unlink()
    elif kind == "text":
        target = models_dir.checkpoints / "broken.ckpt"
        target.write_text("this is not a checkpoint\n")
    elif kind == "wrong_suffix":
        target = models_dir.checkpoints / "notes.txt"
        target.write_text("hello")
    elif kind == "no_unet":
        save_file({"something.else": torch.zeros(2)}, str(target))
    with pytest.raises(CheckpointError) as err:
        create_model(models_dir, str(target), "m")
    message = str(err.value)
    assert target.name in message and "\n" not in message
    assert not models_dir.model_dir("m").exists()


@pytest.mark.parametrize("name,ok", [
    ("my-model_1", True), ("chibi scs", True), ("", False), ("  ", False), ("a/b", False), ("a\\b", False),
    ("..", False), ("../x", False), ("x..y", False), (".hidden", False), ("a:b", False), ("a*b", False),
])
def test_name_validation(name, ok):
    if ok:
        assert validate_model_name(name) == name.strip()
    else:
        with pytest.raises(ConfigError, match="Name"):
            validate_model_name(name)


def test_existing_model_is_not_overwritten_without_permission(models_dir, tiny_sd1):
    source = _place(models_dir, tiny_sd1)
    folder = create_model(models_dir, source.name, "m")
    marker = folder / "user-notes.txt"
    marker.write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        create_model(models_dir, source.name, "m")
    assert marker.read_text() == "mine"
    create_model(models_dir, source.name, "m", overwrite=True)
    assert not marker.exists() and (folder / "model_info.json").is_file()


def test_failure_halfway_leaves_nothing_behind_and_keeps_the_old_model(models_dir, tiny_sd1, monkeypatch):
    source = _place(models_dir, tiny_sd1)
    old = create_model(models_dir, source.name, "m")
    old_info = (old / "model_info.json").read_text()
    real = checkpoint_module.convert_part

    def fail_on_vae(reader, spec, part, out_dir, **kw):
        if part == "vae":
            raise RuntimeError("disk full")
        return real(reader, spec, part, out_dir, **kw)

    monkeypatch.setattr(checkpoint_module, "convert_part", fail_on_vae)
    for name, overwrite in (("new", False), ("m", True)):
        with pytest.raises(RuntimeError, match="disk full"):
            create_model(models_dir, source.name, name, overwrite=overwrite)
    assert sorted(p.name for p in models_dir.working.iterdir()) == ["m"]
    assert (old / "model_info.json").read_text() == old_info


def test_weights_that_do_not_fit_the_config_are_refused_by_name(models_dir):
    tensors = tiny_state_dict()
    tensors.pop("model.diffusion_model.out.2.weight")
    path = _write(models_dir, tensors, "missing")
    with pytest.raises(CheckpointError, match=r"unet weights do not fit.*1 missing.*conv_out.weight"):
        create_model(models_dir, path.name, "m")


def test_unknown_source_lists_what_is_there(models_dir, tiny_sd1):
    _place(models_dir, tiny_sd1)
    with pytest.raises(ModelError, match=r"'nope' not found.*tiny-sd1.safetensors"):
        create_model(models_dir, "nope", "m")


def test_source_found_by_web_ui_title(models_dir, tiny_sd1):
    _place(models_dir, tiny_sd1)
    folder = create_model(models_dir, "tiny-sd1.safetensors [c9a36bdc67]", "m")
    assert folder.is_dir()


def test_reader_streams_safetensors_lazily(tiny_sd1):
    with CheckpointReader(tiny_sd1) as reader:
        assert reader._tensors is None  # nothing read up front
        key = "model.diffusion_model.out.2.weight"
        assert reader.get_slice_shape(key) == tuple(reader.get(key).shape)


def test_create_opens_no_socket_at_all(models_dir, tiny_sd1, monkeypatch):
    import socket

    attempts = []

    def record(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setattr(socket.socket, "connect_ex", record)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: record(None, address))
    source = _place(models_dir, tiny_sd1)
    create_model(models_dir, source.name, "m")
    assert attempts == []


def test_network_guard_itself_fails_outbound_connections():
    import socket

    from conftest import NetworkAccessError

    with socket.socket() as s, pytest.raises(NetworkAccessError):
        s.connect(("192.0.2.1", 80))


def test_cli_create_prints_the_folder_and_errors_in_one_line(models_dir, tiny_sd1, capsys):
    from lora_trainer.cli import main

    _place(models_dir, tiny_sd1)
    root = str(models_dir.checkpoints.parent)
    assert main(["create", "--models-dir", root, "--source", "tiny-sd1", "--name", "cli"]) == 0
    assert capsys.readouterr().out.strip() == str(models_dir.model_dir("cli"))
    assert main(["create", "--models-dir", root, "--source", "tiny-sd1", "--name", "cli"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Name:") and "\n" not in err


def test_stored_parts_load_in_every_transformers_version(models_dir, tiny_sd1):
    # transformers < 4.31 needs the "format" entry; its CLIPTextModel needs the `text_model.` level.
    from safetensors import safe_open

    source = _place(models_dir, tiny_sd1)
    folder = create_model(models_dir, source.name, "m")
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        with safe_open(str(folder / part / f"{name}.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            if part == "text_encoder":
                assert all(k.startswith("text_model.") for k in f.keys())


def test_written_files_get_normal_permissions(models_dir, tiny_sd1):
    import os
    import stat

    source = _place(models_dir, tiny_sd1)
    folder = create_model(models_dir, source.name, "m")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((folder / "model_info.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask


def test_tiny_checkpoint_for_the_web_ui_names_a_local_clip_folder(models_dir):
    """The web UI builds SD 1.x's text encoder from `cond_stage_config.params.version` (a hub name by default):
    the folder it names here holds a config and tokenizer that fit the checkpoint's text weights."""
    import yaml
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_trainer.checkpoint_io import CheckpointReader
    from lora_trainer.compat import installed_clip_name
    from lora_trainer.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(models_dir.checkpoints, for_webui=True)
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    folder = Path(config["model"]["params"]["cond_stage_config"]["params"]["version"])
    assert folder == (models_dir.checkpoints / "tiny-sd1-clip").resolve()
    assert len(CLIPTokenizer.from_pretrained(str(folder))) == 49408
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)))  # the folder has no weights: the file brings them
    prefix = "cond_stage_model.transformer."
    with CheckpointReader(path) as reader:
        weights = {installed_clip_name(k[len(prefix):]): reader.get(k) for k in reader.keys() if k.startswith(prefix)}
    missing, unexpected = text.load_state_dict(weights, strict=False)
    # position_ids is a stored buffer in transformers < 5 only
    assert [k for k in missing + unexpected if not k.endswith("position_ids")] == []
    assert create_model(models_dir, path.name, "m").is_dir()  # our own loader is not disturbed by the folder
    assert models_dir.list_checkpoints() == ["tiny-sd1.safetensors"]


def test_sdxl_parts_match_diffusers_single_file_loader(tiny_sdxl, models_dir):
    # diffusers' own converter is the reference for the UNet (label_emb), VAE and CLIP-L; it converts
    # OpenCLIP bigG only at its real size, so the second encoder is checked against OpenCLIP's own maths below.
    from diffusers import StableDiffusionXLPipeline

    source = _place(models_dir, tiny_sdxl)
    folder = create_model(models_dir, source.name, "xl")
    ours = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    # The component configs come from our folder (diffusers tells SDXL from the real context width only).
    theirs = StableDiffusionXLPipeline.from_single_file(str(source), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, part).state_dict(), getattr(theirs, part).state_dict()
        assert set(a) == set(b), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    with CheckpointReader(source) as reader:
        ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
        expected_hidden, expected_pooled = _openclip_text(reader, "conditioner.embedders.1.model.", ids)
    with torch.no_grad():
        out = ours.text_encoder_2(ids)
    assert torch.allclose(out.last_hidden_state, expected_hidden, atol=1e-5)
    assert torch.allclose(out.text_embeds, expected_pooled, atol=1e-5)
    info = ModelInfo.load(folder / "model_info.json")
    assert (info.model_type, info.prediction_type, info.resolution) == ("sdxl", "epsilon", 64)
    # The pipeline draws with both encoders and the size/crop embedding.
    picture = ours(prompt="a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert picture.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(picture)).all()


def _openclip_text(reader, prefix, ids):
    """OpenCLIP's text tower written out from its original tensors: (ln_final output, pooled @ text_projection)."""
    get = lambda k: reader.get(prefix + k).float()  # noqa: E731
    x = get("token_embedding.weight")[ids] + get("positional_embedding")[: ids.shape[1]]
    width = x.shape[-1]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    layer = 0
    with torch.no_grad():
        while prefix + f"transformer.resblocks.{layer}.ln_1.weight" in reader:
            p = f"transformer.resblocks.{layer}."
            attention = torch.nn.MultiheadAttention(width, width // 64, batch_first=True)
            attention.load_state_dict({"in_proj_weight": get(p + "attn.in_proj_weight"),
                                       "in_proj_bias": get(p + "attn.in_proj_bias"),
                                       "out_proj.weight": get(p + "attn.out_proj.weight"),
                                       "out_proj.bias": get(p + "attn.out_proj.bias")})
            h = torch.nn.functional.layer_norm(x, (width,), get(p + "ln_1.weight"), get(p + "ln_1.bias"))
            x = x + attention(h, h, h, attn_mask=mask, need_weights=False)[0]
            h = torch.nn.functional.layer_norm(x, (width,), get(p + "ln_2.weight"), get(p + "ln_2.bias"))
            h = torch.nn.functional.gelu(h @ get(p + "mlp.c_fc.weight").t() + get(p + "mlp.c_fc.bias"))
            x = x + h @ get(p + "mlp.c_proj.weight").t() + get(p + "mlp.c_proj.bias")
            layer += 1
        x = torch.nn.functional.layer_norm(x, (width,), get("ln_final.weight"), get("ln_final.bias"))
    assert layer > 1
    return x, x[torch.arange(x.shape[0]), ids.argmax(-1)] @ get("text_projection")


def test_sdxl_weights_only_fp16_ckpt_converts_and_is_recognised_without_yaml(models_dir):
    from lora_trainer.tiny_sdxl import tiny_xl_original_config, tiny_xl_state_dict

    path = models_dir.checkpoints / "xl.ckpt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in tiny_xl_state_dict().items()}},
               path)
    path.with_suffix(".yaml").write_text(tiny_xl_original_config())
    folder = create_model(models_dir, "xl.ckpt", "xl")
    assert ModelInfo.load(folder / "model_info.json").model_type == "sdxl"
    assert (folder / "text_encoder_2" / "model.safetensors").is_file() and (folder / "tokenizer_2").is_dir()
    path.with_suffix(".yaml").unlink()
    # Without its yaml the file is taken for SDXL 1.0 base: the tiny shapes are then refused by part.
    with pytest.raises(CheckpointError, match="the unet weights do not fit"):
        create_model(models_dir, "xl.ckpt", "xl2")


def test_the_background_hash_leaves_torch_one_thread_fewer_and_gives_it_back(tmp_path):
    import threading

    from lora_trainer.checkpoint_io import BackgroundSha256, file_sha256

    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 4096)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with BackgroundSha256(path) as first:
            assert torch.get_num_threads() == 2
            with BackgroundSha256(path) as second:  # two jobs at once: one thread left for the two hashes
                assert torch.get_num_threads() == 2 and second.result() == file_sha256(path)
            assert torch.get_num_threads() == 2 and first.result() == file_sha256(path)
        assert torch.get_num_threads() == 3
        # Each thread has its own count (a job's worker thread): another thread's hash leaves this one's as it is.
        seen = []

        def job():
            torch.set_num_threads(2)
            with BackgroundSha256(path) as hashing:
                seen.append((torch.get_num_threads(), hashing.result()))
            seen.append(torch.get_num_threads())

        worker = threading.Thread(target=job)
        worker.start()
        worker.join()
        assert seen == [(1, file_sha256(path)), 2] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_meta_device_build_skips_initialisers_in_its_own_thread_only():
    """Models are built on the meta device without running torch.nn.init (nothing to fill there); a model
    built meanwhile in another thread is initialised as always, and the initialisers are put back after."""
    import threading

    from lora_trainer.keymap import _no_init_on_meta

    original = torch.nn.init.kaiming_uniform_
    torch.manual_seed(0)
    expected = torch.nn.Linear(8, 8).weight.detach().clone()
    inside, built = threading.Event(), threading.Event()
    other: dict[str, torch.Tensor] = {}

    def build_elsewhere():
        inside.wait(10)
        torch.manual_seed(0)
        other["weight"] = torch.nn.Linear(8, 8).weight.detach().clone()
        built.set()

    thread = threading.Thread(target=build_elsewhere)
    thread.start()
    with _no_init_on_meta("meta"):
        assert torch.nn.init.kaiming_uniform_ is not original
        weight = torch.zeros(4, 4)
        torch.nn.init.normal_(weight)  # skipped in this thread
        assert torch.equal(weight, torch.zeros(4, 4))
        inside.set()
        assert built.wait(10)
    thread.join()
    assert torch.equal(other["weight"], expected)
    assert torch.nn.init.kaiming_uniform_ is original
    with _no_init_on_meta("cpu"):  # a real build: initialised
        assert torch.nn.init.kaiming_uniform_ is original
