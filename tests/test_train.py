"""Training on the tiny model: equivalence at step 0, learning, prior preservation, v-prediction,
saved files, resume and cancel, refused option pairs, full fine-tune, the commands."""
from __future__ import annotations

import hashlib
import json
import logging
import threading

import pytest
import torch
from helpers_train import denoising_loss, instance_pictures, private_models, unet_output

from lora_trainer import train as train_module
from lora_trainer.cli import main
from lora_trainer.checkpoint_io import file_sha256
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.lora import load_lora_state_dict, read_lora
from lora_trainer.optional import bitsandbytes_runs_on_cpu
from lora_trainer.train import train
from lora_trainer.training.adapters import attach_lora
from lora_trainer.training.hardware import Hardware, check_options
from lora_trainer.training.loss import dreambooth_loss, min_snr_weights, training_target
from lora_trainer.training.outputs import free_path, output_name
from lora_trainer.training.resume import load_optimizer_state
from lora_trainer.training.parts import load_working_model

RES = 32  # training resolution: latents of 4 x 4, fast on a CPU
FAST = dict(resolution=RES, hflip=False, seed=0)


def _model(models, name="tiny"):
    folder = models.model_dir(name)
    return load_working_model(folder, ModelInfo.load(folder / "model_info.json"))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def run(created_sd1, tmp_path_factory):
    """One LoRA run with prior preservation (class pictures generated first), saving half way.

    The loop is watched so the tests can look at the model as trained, in memory.
    """
    root = tmp_path_factory.mktemp("train")
    models = private_models(created_sd1, root / "models")
    pictures = instance_pictures(root / "pictures")
    concept = Concept(instance_data_dir=str(pictures), instance_prompt="scs thing", class_prompt="thing",
                      num_class_images=2, class_infer_steps=1)
    params = TrainingParams(max_train_steps=8, train_batch_size=3, unet_learning_rate=2e-2,
                            text_encoder_learning_rate=2e-2, save_every_n_steps=4, **FAST)
    watched = {}
    real_loop = train_module.run_loop

    def watch(loop, display):
        watched["loop"] = loop
        return real_loop(loop, display)

    records, reports = _Records(), []
    logging.getLogger("lora_trainer").addHandler(records)
    logging.getLogger("lora_trainer").setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module, "run_loop", watch)
            result = train(models, "tiny", params, [concept], report=reports.append, device="cpu")
    finally:
        logging.getLogger("lora_trainer").removeHandler(records)
    return dict(models=models, result=result, loop=watched["loop"], params=params, concept=concept,
                pictures=sorted(pictures.glob("*.png")), log=records.messages, reports=reports)


def test_step_zero_is_the_base_model(created_sd1):
    model = _model(created_sd1)
    ids = model.tokenizer(["scs thing"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before_unet, before_text = unet_output(model.unet), model.text_encoder(ids)[0]
    adapters = attach_lora(model, TrainingParams(train_text_encoder=True))
    assert adapters.unet and adapters.text
    with torch.no_grad():
        assert torch.equal(unet_output(model.unet), before_unet)
        assert torch.equal(model.text_encoder(ids)[0], before_text)


def test_class_pictures_generated_first_with_console_lines(run):
    folder = run["models"].model_dir("tiny") / "classifiers_0"
    assert "Concept requires 2 images." in run["log"]
    assert f"Class dir {folder} has 0 images." in run["log"]
    assert run["log"].index("Concept requires 2 images.") < run["log"].index("Training finished. Total lifetime steps: 8")
    assert len(list(folder.glob("*.png"))) == 2 and len(list(folder.glob("*.txt"))) == 2


def test_prior_preservation_feeds_class_pictures(run):
    loop = run["loop"]
    batch = next(iter(loop.loader))
    assert batch["is_class"].tolist() == [False] * 3 + [True] * 3
    assert batch["prompts"][3:] == ["thing"] * 3
    assert batch["latent_dist"].shape == (6, 8, RES // 8, RES // 8)


def test_training_lowers_the_denoising_loss(run):
    model = _model(run["models"])
    prompts = ["scs thing"] * len(run["pictures"])
    base = denoising_loss(model, run["pictures"], prompts, resolution=RES)
    adapters = attach_lora(model, run["params"])
    tensors, _ = read_lora(run["result"].lora_path)
    load_lora_state_dict(adapters.all, tensors, source="test")
    trained = denoising_loss(model, run["pictures"], prompts, resolution=RES)
    assert trained < 0.95 * base, (base, trained)


def test_saved_lora_reproduces_the_trained_unet(run):
    trained_unet = run["loop"].unet
    model = _model(run["models"])
    adapters = attach_lora(model, run["params"])
    tensors, metadata = read_lora(run["result"].lora_path)
    load_lora_state_dict(adapters.all, tensors, source="test")
    torch.testing.assert_close(unet_output(model.unet), unet_output(trained_unet), rtol=1e-5, atol=1e-6)
    assert not torch.equal(unet_output(model.unet), unet_output(_model(run["models"]).unet))


def test_only_adapters_change(run, created_sd1):
    trained = dict(run["loop"].unet.named_parameters())
    base = dict(_model(created_sd1).unet.named_parameters())
    lora_keys = {k for k in trained if ".lora_" in k}
    assert lora_keys and all(not trained[k].requires_grad for k in trained if k not in lora_keys)
    for key, value in trained.items():
        if key not in lora_keys:
            assert torch.equal(value.detach(), base[key.replace(".base.", ".")]), key
    assert any(trained[k].abs().sum() > 0 for k in lora_keys if "lora_up" in k)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _sha(run["models"].model_dir("tiny") / part) == _sha(created_sd1.model_dir("tiny") / part)


def test_files_names_and_model_info(run):
    models, result = run["models"], run["result"]
    folder = models.model_dir("tiny")
    assert result.lora_path == models.lora / "tiny_8.safetensors" and (models.lora / "tiny_4.safetensors").is_file()
    assert (result.steps, result.lifetime_steps, result.revision, result.cancelled) == (8, 8, 1, False)
    info = ModelInfo.load(folder / "model_info.json")
    assert (info.revision, info.lifetime_steps, info.latest_lora) == (1, 8, "tiny_8.safetensors")
    assert info.lifetime_epochs == 8  # 3 pictures, batches of 3: one step per epoch
    assert TrainingParams.load(folder / "params.json") == run["params"]
    assert json.loads((folder / "concepts_list.json").read_text())[0]["instance_prompt"] == "scs thing"
    assert json.loads((folder / "resume" / "state.json").read_text())["lifetime_steps"] == 8
    tensors, metadata = read_lora(result.lora_path)
    names = {k.rsplit(".", 2)[0] if "weight" in k else k.rsplit(".", 1)[0] for k in tensors}
    assert any(n.startswith("lora_unet_") for n in names) and any(n.startswith("lora_te_text_model_") for n in names)
    assert all(f"{n}.{leaf}" in tensors for n in names for leaf in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert metadata["ss_output_name"] == "tiny_8" and metadata["ss_steps"] == "8"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sd_v1"
    # Create Model left the source's hash to the first run, which computed it while the model loaded.
    source = models.checkpoints / info.source_checkpoint
    assert metadata["ss_new_sd_model_hash"] == info.source_checkpoint_hash == file_sha256(source)


def test_progress_reports_every_step(run):
    steps = [p for p in run["reports"] if p.job == "train" and p.loss is not None]
    assert [p.step for p in steps] == list(range(1, 9))
    assert all(p.total_steps == 8 and p.lr == pytest.approx(run["params"].unet_learning_rate) and p.it_per_s > 0 for p in steps)
    assert [p.loss for p in steps] == pytest.approx(run["result"].losses)
    assert steps[-1].lifetime_steps == 8 and steps[-1].memory_mb is None  # no CUDA here


def test_prior_loss_weight_matches_a_hand_computation():
    prediction = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]).reshape(4, 2, 1, 1)
    target = torch.zeros(4, 2, 1, 1)
    is_class = torch.tensor([False, False, True, True])
    loss = dreambooth_loss(prediction, target, is_class, prior_loss_weight=0.25)
    instance, prior = (1.0 + 2.0) / 2, (4.5 + 1.0) / 2  # per-row means of squares, then over rows
    assert loss.instance.item() == pytest.approx(instance) and loss.prior.item() == pytest.approx(prior)
    assert loss.total.item() == pytest.approx(instance + 0.25 * prior)
    alone = dreambooth_loss(prediction[:2], target[:2], is_class[:2], prior_loss_weight=0.25)
    assert alone.total.item() == pytest.approx(instance) and alone.prior.item() == 0.0


def test_v_prediction_target_and_min_snr(created_sd1, tmp_path):
    from diffusers import DDPMScheduler

    models = private_models(created_sd1, tmp_path / "models")
    info_path = models.model_dir("tiny") / "model_info.json"
    info = ModelInfo.load(info_path)
    info.prediction_type = "v_prediction"
    info.save(info_path)
    scheduler = _model(models).noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([1, 400, 999])
    alpha = scheduler.alphas_cumprod[timesteps].reshape(3, 1, 1, 1)
    expected = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    torch.testing.assert_close(training_target(scheduler, latents, noise, timesteps), expected)
    snr = alpha.flatten() / (1 - alpha.flatten())
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    epsilon = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(training_target(epsilon, latents, noise, timesteps), noise)
    torch.testing.assert_close(min_snr_weights(epsilon, timesteps, 5.0), torch.clamp(snr, max=5.0) / snr)
    assert torch.equal(min_snr_weights(epsilon, timesteps, 0.0), torch.ones(3))


CPU = Hardware(torch.device("cpu"), bf16=True, xformers=True, bitsandbytes=True, sdpa=True)
GPU = Hardware(torch.device("cuda"), bf16=True, xformers=True, bitsandbytes=True, sdpa=True, name="GPU")
NO_BITSANDBYTES_CPU = Hardware(torch.device("cpu"), bf16=True, xformers=False, bitsandbytes=False, sdpa=True,
                               bitsandbytes_cpu=False)
OLD_GPU = Hardware(torch.device("cuda"), bf16=False, xformers=False, bitsandbytes=False, sdpa=True, name="GTX 1070")


@pytest.mark.parametrize("options, hardware, names", [
    (dict(mixed_precision="fp16"), CPU, ("Mixed Precision", "--device cpu")),
    (dict(mixed_precision="bf16"), OLD_GPU, ("Mixed Precision", "GTX 1070")),
    (dict(attention="xformers"), GPU, ("Memory Attention", "Mixed Precision")),
    (dict(attention="xformers", mixed_precision="fp16"), OLD_GPU, ("Memory Attention", "xformers package")),
    (dict(attention="xformers", mixed_precision="bf16"), CPU, ("Memory Attention", "--device cpu")),
    (dict(use_8bit_adam=True), CPU, ("Use 8bit Adam", "--device cpu", "an older bitsandbytes")),
    (dict(use_8bit_adam=True, mixed_precision="fp16"), OLD_GPU, ("Use 8bit Adam", "bitsandbytes")),
    (dict(use_8bit_adam=True), NO_BITSANDBYTES_CPU, ("Use 8bit Adam", "--device cpu", "with no bitsandbytes")),
])
def test_option_pairs_refused(options, hardware, names):
    with pytest.raises(ConfigError) as refused:
        check_options(TrainingParams(**options), hardware)
    message = str(refused.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_buckets_with_batches_refused_on_several_gpus():
    from lora_trainer.training.hardware import check_parallel

    check_parallel(TrainingParams(use_buckets=True, train_batch_size=2), 1)
    check_parallel(TrainingParams(use_buckets=True, train_batch_size=1), 4)
    with pytest.raises(ConfigError, match="Aspect Ratio Bucketing.*Batch Size"):
        check_parallel(TrainingParams(use_buckets=True, train_batch_size=2), 2)


def test_good_option_sets_pass():
    check_options(TrainingParams(mixed_precision="fp16", attention="xformers", use_8bit_adam=True,
                                 gradient_checkpointing=True), GPU)
    check_options(TrainingParams(mixed_precision="bf16", attention="flash_attention"), CPU)
    new_bitsandbytes_cpu = Hardware(torch.device("cpu"), bf16=True, xformers=False, bitsandbytes=True, sdpa=True,
                                    bitsandbytes_cpu=True)  # bitsandbytes >= 0.50 runs 8-bit AdamW on the CPU
    check_options(TrainingParams(mixed_precision="bf16", use_8bit_adam=True), new_bitsandbytes_cpu)


def test_refused_before_any_weight_is_loaded(created_sd1, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded weights before checking the options")

    monkeypatch.setattr(train_module, "load_working_model", must_not_run)
    monkeypatch.setattr(train_module, "generate_class_images", must_not_run)
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs")
    cases = [(dict(mixed_precision="fp16"), ("Mixed Precision", "--device cpu")),
             (dict(attention="xformers"), ("Memory Attention", "Mixed Precision"))]
    if not bitsandbytes_runs_on_cpu():
        cases.append((dict(use_8bit_adam=True), ("Use 8bit Adam", "--device cpu", "bitsandbytes>=0.50")))
    for options, names in cases:
        with pytest.raises(ConfigError) as refused:
            train(models, "tiny", TrainingParams(**options), [concept], device="cpu")
        assert all(name in str(refused.value) for name in names)
    with pytest.raises(ConfigError, match="Dataset Directory"):
        train(models, "tiny", TrainingParams(), [Concept(instance_data_dir=str(tmp_path / "missing"))], device="cpu")
    assert not (models.model_dir("tiny") / "params.json").exists()


def test_names_never_overwrite(tmp_path):
    taken = tmp_path / "tiny_10.safetensors"
    taken.write_bytes(b"old")
    assert free_path(tmp_path / "tiny_20.safetensors") == tmp_path / "tiny_20.safetensors"
    assert free_path(taken) == tmp_path / "tiny_10-2.safetensors"
    (tmp_path / "tiny_10-2.safetensors").write_bytes(b"old")
    assert free_path(taken) == tmp_path / "tiny_10-3.safetensors" and taken.read_bytes() == b"old"
    info = ModelInfo(model_name="tiny")
    assert output_name(info, TrainingParams()) == "tiny"
    assert output_name(info, TrainingParams(custom_model_name=" mascot ")) == "mascot"
    with pytest.raises(ConfigError, match="Custom Model Name"):
        output_name(info, TrainingParams(custom_model_name="../x"))


def _loss_not_a_number_at(monkeypatch, steps):
    """Make the loss of the given micro-batches (1-based) NaN, as an fp16 overflow would."""
    from lora_trainer.training import loop as loop_module

    real, calls = loop_module.compute_loss, []

    def compute_loss(loop, batch):
        loss = real(loop, batch)
        calls.append(1)
        if len(calls) in steps:
            loss.total = loss.total * float("nan")
        return loss

    monkeypatch.setattr(loop_module, "compute_loss", compute_loss)


def test_a_step_whose_loss_is_not_a_number_changes_nothing(created_sd1, tmp_path, monkeypatch):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(max_train_steps=2, unet_learning_rate=5e-2, **FAST)
    _loss_not_a_number_at(monkeypatch, {2})
    result = train(models, "tiny", params, [concept], device="cpu")
    assert result.steps == 2 and torch.isnan(torch.tensor(result.losses[1]))
    after_one, _ = read_lora(result.lora_path)
    assert all(torch.isfinite(t).all() for t in after_one.values())

    # The same run without the NaN step but stopped after step 1 has exactly these adapters.
    monkeypatch.undo()
    again = private_models(created_sd1, tmp_path / "again")
    one = train(again, "tiny", TrainingParams(max_train_steps=1, unet_learning_rate=5e-2, **FAST), [concept],
                device="cpu")
    reference, _ = read_lora(one.lora_path)
    assert all(torch.equal(after_one[k], reference[k]) for k in reference)


def test_a_loss_that_stays_not_a_number_stops_the_run_and_saves_nothing(created_sd1, tmp_path, monkeypatch):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    _loss_not_a_number_at(monkeypatch, set(range(1, 100)))
    with pytest.raises(ConfigError, match=r"not a number .* for 3 steps in a row at step 3 .*'mixed_precision'"):
        train(models, "tiny", TrainingParams(max_train_steps=10, **FAST), [concept], device="cpu")
    assert not models.lora.exists() or not list(models.lora.iterdir())
    assert ModelInfo.load(models.model_dir("tiny") / "model_info.json").lifetime_steps == 0


def test_cancel_saves_and_the_command_resumes(created_sd1, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lora_trainer")
    models = private_models(created_sd1, tmp_path / "models")
    pictures = instance_pictures(tmp_path / "pictures")
    concept = Concept(instance_data_dir=str(pictures), instance_prompt="scs thing")
    params = TrainingParams(max_train_steps=5, train_batch_size=2, use_lifetime_steps=True, **FAST)
    cancel = threading.Event()

    def press_cancel_at_step_2(progress):
        if progress.job == "train" and progress.step == 2 and progress.loss is not None:
            cancel.set()

    result = train(models, "tiny", params, [concept], report=press_cancel_at_step_2, cancel=cancel, device="cpu")
    assert result.cancelled and (result.steps, result.lifetime_steps, result.revision) == (2, 2, 1)
    assert result.lora_path == models.lora / "tiny_2.safetensors" and result.lora_path.is_file()
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training ")]
    assert closing == [f"Training cancelled after 2 steps; saved {result.lora_path}"]  # once, and not "finished"
    folder = models.model_dir("tiny")
    assert load_optimizer_state(folder / "resume" / "optimizer.safetensors")["state"][0]["step"] == 2
    assert not list((folder / "resume").glob("*.pt"))  # no pickle: the web UI's checked torch.load refuses newer ones

    capsys.readouterr()
    code = main(["train", "--models-dir", str(models.working.parent), "--model", "tiny", "--max_train_steps", "3",
                 "--device", "cpu"])  # concepts and parameters: those the model folder saved
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(models.lora / "tiny_5.safetensors")
    info = ModelInfo.load(folder / "model_info.json")
    assert (info.revision, info.lifetime_steps, info.latest_lora) == (2, 5, "tiny_5.safetensors")
    assert load_optimizer_state(folder / "resume" / "optimizer.safetensors")["state"][0]["step"] == 5
    first, _ = read_lora(models.lora / "tiny_2.safetensors")
    second, _ = read_lora(models.lora / "tiny_5.safetensors")
    up = next(k for k in first if k.endswith("lora_up.weight"))
    assert first[up].abs().sum() > 0 and not torch.equal(first[up], second[up])

    base = ["train", "--models-dir", str(models.working.parent), "--model", "tiny", "--device", "cpu"]
    for flags, names in ((["--rank", "8"], ("Lora UNET Rank", "trained with 4")),
                         (["--no-train_text_encoder"], ("Train Text Encoder", "was on")),
                         (["--text_encoder_alpha", "2"], ("Lora Text Encoder Alpha", "trained with 4"))):
        capsys.readouterr()
        assert main(base + flags) == 2
        error = capsys.readouterr().err
        assert all(name in error for name in names) and "create a new model" in error, error
    assert ModelInfo.load(folder / "model_info.json").lifetime_steps == 5  # nothing ran


def test_full_finetune_writes_a_model_create_exports(created_sd1, tmp_path):
    from safetensors import safe_open

    from lora_trainer.checkpoint import export_checkpoint

    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(use_lora=False, max_train_steps=2, train_batch_size=3, learning_rate=1e-3, **FAST)
    result = train(models, "tiny", params, [concept], device="cpu")
    assert result.lora_path is None and (result.lifetime_steps, result.revision) == (2, 1)
    assert not models.lora.exists() or not list(models.lora.iterdir())
    out = export_checkpoint(models.model_dir("tiny"), tmp_path / "out.safetensors")
    source = next(models.checkpoints.glob("*.safetensors"))
    with safe_open(str(out), "pt") as new, safe_open(str(source), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        text_key = next(k for k in old.keys() if k.endswith("self_attn.q_proj.weight"))
        assert not torch.equal(new.get_tensor(unet_key), old.get_tensor(unet_key))
        assert not torch.equal(new.get_tensor(text_key), old.get_tensor(text_key))
        vae_key = next(k for k in old.keys() if k.startswith("first_stage_model."))
        assert torch.equal(new.get_tensor(vae_key), old.get_tensor(vae_key))


@pytest.mark.parametrize("model_type, model", [
    (None, "tiny-demo"),
    pytest.param("sd2-v", "tiny-demo-sd2v", marks=pytest.mark.one_env),  # the SD 2.x family, v-prediction
])
def test_demo_runs_the_whole_path(tmp_path, capsys, model_type, model):
    family = ["--model-type", model_type] if model_type else []
    assert main(["demo", "--models-dir", str(tmp_path / "models"), "--steps", "2", *family]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    lora = next(line for line in printed if "/Lora/" in line)
    merged = next(line for line in printed if line.endswith("_lora.safetensors"))
    picture = printed[-1]
    assert lora.endswith(f"{model}_2.safetensors") and merged.endswith(f"{model}_2_lora.safetensors")
    assert all(p and __import__("pathlib").Path(p).is_file() for p in (lora, merged, picture))
    classes = tmp_path / "models" / "lora_trainer" / model / "classifiers_0"
    assert len(list(classes.glob("*.png"))) == 4
    info = ModelInfo.load(tmp_path / "models" / "lora_trainer" / model / "model_info.json")
    assert (info.model_type, info.prediction_type) == (("sd2-v", "v_prediction") if model_type else ("sd1", "epsilon"))


def test_memory_options_together_on_the_cpu(created_sd1, tmp_path):
    """bf16 autocast, SDPA, gradient checkpointing, buckets, accumulation, a schedule, min-SNR and noise offset."""
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(mixed_precision="bf16", attention="flash_attention", gradient_checkpointing=True,
                            use_buckets=True, cache_latents=False, gradient_accumulation_steps=2,
                            lr_scheduler="cosine_with_restarts", lr_warmup_steps=1, snr_gamma=5.0, noise_offset=0.1,
                            max_train_steps=2, train_batch_size=1, resolution=RES, seed=3)
    result = train(models, "tiny", params, [concept], device="cpu")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors, _ = read_lora(result.lora_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    for prefix in ("lora_unet_", "lora_te_"):  # gradients reach the adapters through checkpointed blocks
        ups = [t for k, t in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and all(t.abs().sum() > 0 for t in ups), prefix


def test_the_fp16_recipe_of_a_gpu_on_the_cpus_half_kernels(created_sd1, tmp_path):
    """What the 8 GB preset does on a GPU, with the CPU's fp16 kernels (no GPU in CI): the frozen parts read
    in fp16 (not cast after loading), fp32 adapters on them, fp16 autocast, a gradient scaler, SDPA and
    checkpointing; 8-bit AdamW where bitsandbytes runs on the CPU. The adapters learn; the base stays."""
    from lora_trainer.presets import apply_preset
    from lora_trainer.train import prepare_model
    from lora_trainer.training.adapters import trainable_groups
    from lora_trainer.training.loss import sample_noise, sample_timesteps
    from lora_trainer.training.optim import make_optimizer
    from lora_trainer.training.parts import part_dtypes

    params = apply_preset(TrainingParams(), "8 GB GPU", cuda=True)
    params.use_8bit_adam = bitsandbytes_runs_on_cpu()
    dtypes = part_dtypes(params, torch.device("cuda"))
    assert set(dtypes.values()) == {torch.float16}
    folder = created_sd1.model_dir("tiny")
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"), dtypes)
    assert {next(getattr(model, p).parameters()).dtype for p in dtypes} == {torch.float16}  # read as fp16
    base_key, base = next((k, v.clone()) for k, v in model.unet.state_dict().items() if k.endswith("to_q.weight"))
    adapters = prepare_model(model, params, torch.device("cpu"), dtypes)
    groups = trainable_groups(model, adapters, params)
    assert all(p.dtype == torch.float32 for group in groups for p in group["params"])
    optimizer, scaler = make_optimizer(groups, params), torch.amp.GradScaler("cpu")
    pictures = torch.rand(2, 3, RES, RES, dtype=torch.float16) * 2 - 1
    with torch.no_grad():
        latents = model.vae.encode(pictures).latent_dist.sample().float() * model.latent_scale
    ids = model.tokenizer(["scs thing"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    model.unet.train()
    model.text_encoder.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            noise = sample_noise(latents)
            timesteps = sample_timesteps(model.noise_scheduler, 2, latents.device)
            noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = model.unet(noisy, timesteps, model.text_encoder(ids)[0], return_dict=False)[0]
            loss = dreambooth_loss(prediction, training_target(model.noise_scheduler, latents, noise, timesteps),
                                   torch.zeros(2, dtype=torch.bool), prior_loss_weight=1.0).total
        assert prediction.dtype == torch.float16
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and scaler.get_scale() > 1
    ups = [t for k, t in adapters.state_dict().items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in ups)
    assert any(k.startswith("lora_te_") for k in adapters.state_dict())
    assert torch.equal(model.unet.state_dict()[base_key.replace("to_q.weight", "to_q.base.weight")], base)


def test_cached_flips_and_buckets_with_class_pictures_and_run_step_names(created_sd1, tmp_path):
    from helpers_data import BLUE, solid

    models = private_models(created_sd1, tmp_path / "models")
    classes = tmp_path / "classes"
    for i in range(3):
        solid(classes / f"c{i}.png", BLUE, size=(64, 40), caption="thing")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing",
                      class_data_dir=str(classes), class_prompt="thing", num_class_images=3)
    params = TrainingParams(use_buckets=True, hflip=True, cache_latents=True, use_lifetime_steps=False,
                            max_train_steps=2, train_batch_size=2, resolution=RES, seed=1, train_text_encoder=False)
    first = train(models, "tiny", params, [concept], device="cpu")
    second = train(models, "tiny", params, [concept], device="cpu")
    assert first.lora_path.name == "tiny_2.safetensors" and second.lora_path.name == "tiny_2-2.safetensors"
    assert (second.lifetime_steps, second.revision) == (4, 2)
    tensors, metadata = read_lora(second.lora_path)
    assert not any(k.startswith("lora_te") for k in tensors) and metadata["ss_network_train_unet_only"] == "True"


def test_sd2_v_model_trains_with_its_own_target(tiny_sd2v, tmp_path, monkeypatch):
    import shutil

    from lora_trainer.checkpoint import create_model
    from lora_trainer.host import ModelsDir
    from lora_trainer.training import loop as loop_module

    models = ModelsDir.at(tmp_path / "models")
    models.checkpoints.mkdir(parents=True)
    for path in (tiny_sd2v, tiny_sd2v.with_suffix(".yaml")):
        shutil.copy(path, models.checkpoints / path.name)
    create_model(models, tiny_sd2v.name, "tinyv")
    kinds = []
    real_target = loop_module.training_target

    def watch(scheduler, latents, noise, timesteps):
        kinds.append(scheduler.config.prediction_type)
        return real_target(scheduler, latents, noise, timesteps)

    monkeypatch.setattr(loop_module, "training_target", watch)
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    result = train(models, "tinyv", TrainingParams(max_train_steps=2, train_batch_size=3, **FAST), [concept],
                   device="cpu")
    assert kinds == ["v_prediction", "v_prediction"]
    tensors, metadata = read_lora(result.lora_path)
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2_768_v"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)


def test_two_processes_under_torchrun_train_as_one(created_sd1, tmp_path):
    """Data parallel on two CPU processes (gloo), as `accelerate launch` runs it: one result, saved once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    models = private_models(created_sd1, tmp_path / "models")
    pictures = instance_pictures(tmp_path / "pictures")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lora_trainer",
         "train", "--models-dir", str(models.working.parent), "--model", "tiny", "--instance_data_dir", str(pictures),
         "--instance_prompt", "scs thing", "--max_train_steps", "3", "--train_batch_size", "1",
         "--resolution", str(RES), "--seed", "-1", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [str(models.lora / "tiny_3.safetensors")]
    assert done.stderr.count("Training finished. Total lifetime steps: 3") == 1
    info = ModelInfo.load(models.model_dir("tiny") / "model_info.json")
    assert (info.revision, info.lifetime_steps) == (1, 3)
    assert sorted(p.name for p in models.lora.iterdir()) == ["tiny_3.safetensors"]


def test_optimizer_state_with_nested_and_shared_tensors_round_trips(tmp_path):
    """8-bit AdamW's state as bitsandbytes writes it: moments nested in a dict, one quantile map shared by
    every entry, a step count that is a plain int (checked here without bitsandbytes)."""
    from lora_trainer.training.resume import save_optimizer_state

    qmap = torch.linspace(-1, 1, 256)
    state = {"state": {i: {"step": 3, "__bnb_optimizer_quant_state__": {
                 "state1": torch.randint(0, 255, (64, 64), dtype=torch.uint8), "qmap1": qmap,
                 "absmax1": torch.rand(16)}} for i in range(2)},
             "param_groups": [{"lr": 1e-4, "betas": [0.9, 0.999], "t_alpha": None, "params": [0, 1]}]}
    save_optimizer_state(state, tmp_path / "optimizer.safetensors")
    loaded = load_optimizer_state(tmp_path / "optimizer.safetensors")
    assert loaded["param_groups"] == state["param_groups"]
    for index, entry in state["state"].items():
        again = loaded["state"][index]
        assert again["step"] == 3 and set(again) == set(entry)
        for name, tensor in entry["__bnb_optimizer_quant_state__"].items():
            assert torch.equal(again["__bnb_optimizer_quant_state__"][name], tensor), name


def _moments(entry: dict) -> dict:
    """An 8-bit AdamW state entry's moments (bitsandbytes >= 0.49 nests them; older ones do not)."""
    return entry.get("__bnb_optimizer_quant_state__", entry)


@pytest.mark.skipif(not bitsandbytes_runs_on_cpu(), reason="needs bitsandbytes >= 0.50 (CI's latest environment has it)")
def test_8gb_preset_with_8bit_adam_on_the_cpu_resumes_its_8bit_state(created_sd1, tmp_path):
    """The 8 GB preset as the CPU runs it: fp32, bitsandbytes' 8-bit AdamW, SDPA, no checkpointing, cached latents.

    Ranks are high enough that bitsandbytes keeps 8-bit moments (it does for tensors of 4096 values or more);
    the second run continues from the saved 8-bit state (uint8 moments with their quantile maps and scales).
    """
    import dataclasses

    from lora_trainer.presets import apply_preset

    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = dataclasses.replace(apply_preset(TrainingParams(), "8 GB GPU", cuda=False), max_train_steps=2,
                                 rank=64, lora_alpha=64.0, text_encoder_rank=64, text_encoder_alpha=64.0,
                                 save_preview_every_n_steps=0, **FAST)
    assert (params.mixed_precision, params.use_8bit_adam, params.attention) == ("no", True, "flash_attention")
    first = train(models, "tiny", params, [concept], device="cpu")
    saved = load_optimizer_state(models.model_dir("tiny") / "resume" / "optimizer.safetensors")["state"]
    eight_bit = [index for index, entry in saved.items() if _moments(entry)["state1"].dtype == torch.uint8]
    assert eight_bit and all(saved[i]["step"] == 2 and {"qmap1", "absmax1", "state2"} <= set(_moments(saved[i]))
                             for i in eight_bit)

    second = train(models, "tiny", params, [concept], device="cpu")
    assert (first.lifetime_steps, second.lifetime_steps) == (2, 4)
    assert all(torch.isfinite(torch.tensor(first.losses + second.losses)))
    resumed = load_optimizer_state(models.model_dir("tiny") / "resume" / "optimizer.safetensors")["state"]
    assert all(resumed[i]["step"] == 4 and _moments(resumed[i])["state1"].dtype == torch.uint8 for i in eight_bit)
    tensors, _ = read_lora(second.lora_path)
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in ups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the 8 GB options are GPU-only)")
def test_8gb_preset_on_cuda(created_sd1, tmp_path):
    """fp16 with a gradient scaler, 8-bit AdamW (when bitsandbytes is installed), SDPA, checkpointing, cached latents."""
    import dataclasses
    import importlib.util

    from lora_trainer.presets import apply_preset

    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = dataclasses.replace(apply_preset(TrainingParams(), "8 GB GPU"), max_train_steps=4,
                                 save_preview_every_n_steps=4, use_8bit_adam=importlib.util.find_spec("bitsandbytes") is not None,
                                 **FAST)
    assert (params.mixed_precision, params.attention, params.gradient_checkpointing) == ("fp16", "flash_attention", True)
    reports = []
    result = train(models, "tiny", params, [concept], report=reports.append, device="cuda")
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors, _ = read_lora(result.lora_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(t.abs().sum() > 0 for t in ups)
    assert all(p.memory_mb > 0 for p in reports if p.job == "train" and p.loss is not None)
    assert len(result.samples) == 1 and result.samples[0].is_file()
