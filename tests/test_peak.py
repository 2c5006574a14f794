"""The predicted peak GPU memory of a run: one fake training step of the real architecture, counted
byte by byte, checked against peaks measured on a GPU, every trained or stored thing counted by its size,
SDXL's conditioning, what was measured kept, and a run predicted not to fit refused."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from helpers_train import instance_pictures, private_models

from lora_trainer import train as train_module
from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.fp8 import is_fp8_candidate
from lora_trainer.lora import lora_parameters
from lora_trainer.training import fakestep, peak
from lora_trainer.training.adapters import attach_lora
from lora_trainer.training.livebytes import LiveBytes
from lora_trainer.training.memory import GB, memory_report
from lora_trainer.training.parts import load_working_model, part_dtypes
from lora_trainer.training.peak import CACHE_FILE, MEASURED_FIELDS, PartConfigs, check_peak, estimate_for_configs

# Issue 13's measurements on one H100 (SD 1.5 architecture, 512 px, 1 instance + 1 class picture per step,
# latents cached, SDPA, fp16 weights, fp32 LoRA on UNet and text-encoder attention, autocast, AdamW):
# the options of each run and its torch.cuda.max_memory_reserved in GiB.
H100_RUNS = [
    (dict(rank=4, text_encoder_rank=4, gradient_checkpointing=True), 2.64),
    (dict(rank=32, text_encoder_rank=32, gradient_checkpointing=True), 2.77),
    (dict(rank=4, gradient_checkpointing=True, train_text_encoder=False), 2.63),
    (dict(rank=4, text_encoder_rank=4, gradient_checkpointing=False), 4.38),
    (dict(rank=4, text_encoder_rank=4, gradient_checkpointing=True, train_batch_size=4), 4.36),
]


@pytest.mark.one_env
def test_predicted_peak_is_within_15_percent_of_each_measured_h100_run():
    """Computed on the CPU, without a GPU, in reasonable time (seconds on an idle machine)."""
    configs = PartConfigs.standard("sd1")
    errors = []
    for options, measured_gib in H100_RUNS:
        params = TrainingParams(mixed_precision="fp16", attention="flash_attention", cache_latents=True, **options)
        start = time.perf_counter()
        estimate = estimate_for_configs(configs, params, prior_preservation=True)
        assert time.perf_counter() - start < 180
        assert estimate.rows == 2 * params.train_batch_size
        errors.append((options, estimate.training_reserved / GB / measured_gib - 1))
    assert all(abs(error) <= 0.15 for _, error in errors), errors


def test_live_bytes_counts_allocations_and_frees_as_the_cuda_allocator_rounds_them():
    weights = torch.ones(1000)  # made before: never counted
    with LiveBytes() as tracker:
        a = torch.empty(1000, dtype=torch.float16)          # 2000 bytes -> 2048
        b = a.view(10, 100)                                    # a view: the same storage
        c = weights * 2                                        # 4000 -> 4096
        weights.add_(1)                                        # in place on an old storage
        assert tracker.live == 2048 + 4096
        del a, b
        assert tracker.live == 4096
        d = torch.empty(512, dtype=torch.uint8)                # exactly one block
    assert (tracker.live, tracker.peak) == (4096 + 512, 2048 + 4096)
    del c, d


@pytest.mark.one_env
def test_the_estimate_follows_each_option(created_sd1):
    configs = PartConfigs.from_model_dir(created_sd1.model_dir("tiny"))
    base = TrainingParams(mixed_precision="fp16", resolution=64, rank=4, gradient_checkpointing=False)

    def estimate(prior: bool = True, **changes):
        return estimate_for_configs(configs, dataclasses.replace(base, **changes), prior_preservation=prior)

    plain, single = estimate(), estimate(prior=False)
    assert (plain.rows, single.rows) == (2, 1) and single.step < plain.step
    assert estimate(resolution=128).step > plain.step
    assert estimate(gradient_checkpointing=True).step < plain.step
    wide, wide_8bit = estimate(rank=64), estimate(rank=64, use_8bit_adam=True)
    assert wide.state > plain.state and wide.weights > plain.weights and wide_8bit.state < wide.state
    assert estimate(train_text_encoder=False).state < plain.state
    uncached = estimate(cache_latents=False)
    assert uncached.caching == 0 < plain.caching and uncached.weights > plain.weights  # the VAE stays on the GPU


@pytest.mark.one_env
def test_a_run_predicted_not_to_fit_is_refused_naming_what_would_fit(created_sd1):
    configs = PartConfigs.from_model_dir(created_sd1.model_dir("tiny"))
    params = TrainingParams(mixed_precision="no", resolution=128, train_batch_size=4, rank=8)
    estimate = estimate_for_configs(configs, params)
    check_peak(configs, params, estimate, None, "CPU")            # not a GPU: nothing to check
    check_peak(configs, params, estimate, estimate.reserved, "RTX 3050")
    lowered = estimate_for_configs(configs, dataclasses.replace(params, gradient_checkpointing=True))
    with pytest.raises(ConfigError) as refused:
        check_peak(configs, params, estimate, lowered.reserved, "RTX 3050")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("GPU memory: this run is predicted to peak at")
    assert "RTX 3050 has" in message and "tick Gradient Checkpointing would bring it to" in message, message
    with pytest.raises(ConfigError, match="lower Max Resolution"):
        check_peak(configs, params, estimate, 1 << 20, "RTX 3050")


def test_check_gpu_memory_says_the_predicted_peak(created_sd1):
    report = memory_report(created_sd1.model_dir("tiny"), TrainingParams(mixed_precision="fp16"))
    assert report.startswith("GPU memory before activations:")
    assert "predicted peak" in report and "a step of 2 pictures" in report, report


def test_a_prediction_that_fails_leaves_the_count_and_says_why(created_sd1, monkeypatch):
    import lora_trainer.training.peak as peak

    def broken(*args, **kwargs):
        raise RuntimeError("no fake kernel for this op")

    monkeypatch.setattr(peak, "estimate_for_configs", broken)
    report = memory_report(created_sd1.model_dir("tiny"), TrainingParams(mixed_precision="fp16"))
    assert report.startswith("GPU memory before activations:"), report
    assert report.endswith("(no peak prediction: RuntimeError: no fake kernel for this op)"), report


@pytest.mark.parametrize("name", ["tiny", "xl"])
def test_train_refuses_a_run_predicted_not_to_fit_before_anything_is_loaded(created_sd1, created_xl, name, tmp_path,
                                                                            monkeypatch):
    """The weights and training state fit; the predicted peak does not (free memory as a small GPU would say)."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded weights before checking the memory")

    created = created_sd1 if name == "tiny" else created_xl
    params = TrainingParams(resolution=64, gradient_checkpointing=True, train_text_encoder=False)
    estimate = estimate_for_configs(PartConfigs.from_model_dir(created.model_dir(name)), params,
                                    prior_preservation=False)
    monkeypatch.setattr(train_module, "free_gpu_memory", lambda device: estimate.reserved - 1)
    monkeypatch.setattr(train_module, "load_working_model", must_not_run)
    monkeypatch.setattr(train_module, "generate_class_images", must_not_run)
    models = private_models(created, tmp_path / "models", name)
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs")
    with pytest.raises(ConfigError, match="predicted to peak at"):
        train_module.train(models, name, params, [concept], device="cpu")
    assert not (models.model_dir(name) / "params.json").exists()


# --- every trained or stored thing, by its size --------------------------------------------------------

BASE = TrainingParams(mixed_precision="fp16", resolution=64, rank=4, text_encoder_rank=4, gradient_checkpointing=False)
ROUNDING = 1024  # bytes the allocator's 512-byte rounding may add to (or take from) one tensor's share


def _trained_values(created, name: str, params: TrainingParams) -> list[int]:
    """Values of each tensor the optimizer updates, from the real adapters on the loaded model."""
    folder = created.model_dir(name)
    info = ModelInfo.load(folder / "model_info.json")
    model = load_working_model(folder, info, part_dtypes(params, torch.device("cuda"), info.family))
    return [p.numel() for p in lora_parameters(attach_lora(model, params).all)]


def _close(actual: int, expected: int, tensors: int) -> bool:
    return abs(actual - expected) <= ROUNDING * tensors


@pytest.mark.parametrize("option", ["8bit", "prodigy", "ema"])
def test_optimizer_state_and_ema_change_the_prediction_by_their_bytes_without_measuring_again(created_sd1, option,
                                                                                           monkeypatch):
    configs = PartConfigs.from_model_dir(created_sd1.model_dir("tiny"))
    params = dataclasses.replace(BASE, rank=64, text_encoder_rank=8)  # adapters of both 8-bit kinds: see below
    base = estimate_for_configs(configs, params)
    values = _trained_values(created_sd1, "tiny", params)
    monkeypatch.setattr(peak, "measure_run", lambda *a, **k: pytest.fail("measured again for a counted setting"))
    changes = {"8bit": {"use_8bit_adam": True}, "prodigy": {"optimizer": "Prodigy"}, "ema": {"use_ema": True}}[option]
    changed = estimate_for_configs(configs, dataclasses.replace(params, **changes))
    assert (changed.weights, changed.step, changed.caching) == (base.weights, base.step, base.caching)
    if option == "8bit":  # bitsandbytes: tensors of 4096+ values keep uint8 moments and an fp32 absmax per 256
        large = [n for n in values if n >= 4096]
        assert large and len(large) < len(values)
        expected = sum(2 * 4 * n - 2 * (n + 4 * math.ceil(n / 256)) for n in large)
        assert _close(base.state - changed.state, expected, 4 * len(large)), (base.state - changed.state, expected)
    elif option == "prodigy":  # s and p0 beside AdamW's two moments, fp32 each
        assert _close(changed.state - base.state, 2 * 4 * sum(values), 4 * len(values))
    else:  # one fp32 copy of every trained value
        assert _close(changed.ema, 4 * sum(values), len(values)) and changed.training > base.training
    assert changed.reserved != base.reserved


@pytest.mark.one_env
def test_locon_dora_and_fp8_change_the_prediction_by_their_bytes(created_sd1):
    configs = PartConfigs.from_model_dir(created_sd1.model_dir("tiny"))
    base = estimate_for_configs(configs, BASE)
    plain = _trained_values(created_sd1, "tiny", BASE)
    for option in ({"conv_rank": 4}, {"use_dora": True}):
        params = dataclasses.replace(BASE, **option)
        added = sum(_trained_values(created_sd1, "tiny", params)) - sum(plain)  # the conv adapters / magnitudes
        tensors = len(_trained_values(created_sd1, "tiny", params))
        assert added > 0
        changed = estimate_for_configs(configs, params)
        assert _close(changed.weights - base.weights, 4 * added, tensors), option          # fp32 values
        assert _close(changed.state - base.state, 8 * added, 2 * tensors), option         # two fp32 moments
        assert changed.step - base.step >= 4 * added - ROUNDING * tensors, option          # at least their gradients
    # DoRA computes each adapted layer's whole weight in fp32 every step, and keeps some for the backward pass.
    folder = created_sd1.model_dir("tiny")
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"),
                               part_dtypes(BASE, torch.device("cuda")))
    adapted = sum(a.base.weight.numel() for a in attach_lora(model, BASE).all.values())
    dora = estimate_for_configs(configs, dataclasses.replace(BASE, use_dora=True))
    assert 4 * adapted <= dora.step - base.step <= 40 * adapted, (dora.step - base.step, adapted)
    # fp8: the frozen layers' weights one byte per value instead of two, each with a 4-byte scale.
    model = load_working_model(folder, ModelInfo.load(folder / "model_info.json"),
                               part_dtypes(BASE, torch.device("cuda")))
    layers = [m for part in (model.unet, model.text_encoder) for m in part.modules() if is_fp8_candidate(m)]
    saved = sum(m.weight.numel() - 4 for m in layers)
    fp8 = estimate_for_configs(configs, dataclasses.replace(BASE, base_weights="fp8"))
    assert _close(base.weights - fp8.weights, saved, 2 * len(layers)), (base.weights - fp8.weights, saved)
    assert fp8.reserved < base.reserved


# --- SDXL ----------------------------------------------------------------------------------------------

def test_sdxl_prediction_runs_its_conditioning_and_frees_cached_encoders(created_xl):
    """Two text encoders, the pooled embedding and time ids; with their outputs cached the encoders leave
    the GPU before training, but are there (with the VAE unless its latents are cached) while caching."""
    folder = created_xl.model_dir("xl")
    configs = PartConfigs.from_model_dir(folder)
    assert configs.model_type == "sdxl" and configs.text_encoder_2 is not None
    frozen = dataclasses.replace(BASE, train_text_encoder=False, gradient_checkpointing=True, cache_latents=True)
    encoded = estimate_for_configs(configs, frozen, prior_preservation=False)
    cached = estimate_for_configs(configs, dataclasses.replace(frozen, cache_text_encoder_outputs=True),
                                  prior_preservation=False)
    info = ModelInfo.load(folder / "model_info.json")
    model = load_working_model(folder, info, part_dtypes(frozen, torch.device("cuda"), info.family))
    encoder_bytes = [t.numel() * t.element_size() for e in model.text_encoders for t in e.state_dict().values()]
    assert _close(encoded.weights - cached.weights, sum(encoder_bytes), len(encoder_bytes))
    assert cached.caching >= sum(encoder_bytes)  # the encoders while encoding the prompts ...
    assert cached.caching < cached.weights + sum(encoder_bytes)  # ... and the UNet not yet on the GPU
    assert cached.rows == 1 and cached.step <= encoded.step  # the looked-up outputs are what the encoders give
    trained = estimate_for_configs(configs, dataclasses.replace(frozen, train_text_encoder=True),
                                   prior_preservation=False)
    values = [p.numel() for e in model.text_encoders for p in e.parameters()]
    assert trained.state > encoded.state and trained.step > encoded.step and len(values) > 0


@pytest.mark.one_env
def test_an_sdxl_run_that_does_not_fit_is_refused_naming_the_text_cache(created_xl):
    configs = PartConfigs.from_model_dir(created_xl.model_dir("xl"))
    # Pictures encoded every step: the step's peak, with both encoders on the GPU, is the run's.
    params = dataclasses.replace(BASE, train_text_encoder=False, gradient_checkpointing=True, use_8bit_adam=True,
                                 cache_latents=False, resolution=128, train_batch_size=1)
    estimate = estimate_for_configs(configs, params)
    lowered = estimate_for_configs(configs, dataclasses.replace(params, cache_text_encoder_outputs=True))
    assert lowered.reserved < estimate.reserved
    with pytest.raises(ConfigError, match="tick Cache Text Encoder Outputs would bring it to"):
        check_peak(configs, params, estimate, lowered.reserved, "RTX 4060")


def test_check_gpu_memory_predicts_an_sdxl_run(created_xl, tmp_path):
    models = private_models(created_xl, tmp_path / "models", "xl")
    report = memory_report(models.model_dir("xl"), dataclasses.replace(BASE, cache_text_encoder_outputs=True,
                                                                        train_text_encoder=False))
    assert report.startswith("GPU memory before activations:") and "predicted peak" in report, report
    assert "no peak prediction" not in report


# --- what was measured is kept ---------------------------------------------------------------------------

@pytest.mark.one_env
def test_what_was_measured_is_kept_in_memory_and_in_the_model_folder(created_sd1, tmp_path, monkeypatch):
    configs = PartConfigs.from_model_dir(created_sd1.model_dir("tiny"))
    params = dataclasses.replace(BASE, rank=3)
    calls = []
    measure = peak.measure_run
    monkeypatch.setattr(peak, "measure_run", lambda *a, **k: calls.append(a) or measure(*a, **k))
    monkeypatch.setattr(peak, "_MEASURED", {})
    first = estimate_for_configs(configs, params, cache_dir=tmp_path)
    assert len(calls) == 1 and (tmp_path / CACHE_FILE).is_file()
    assert estimate_for_configs(configs, params) == first and len(calls) == 1              # in memory
    monkeypatch.setattr(peak, "_MEASURED", {})                                             # a new process
    assert estimate_for_configs(configs, params, cache_dir=tmp_path) == first and len(calls) == 1
    # Settings the fake run does not read reuse it; one it reads is measured anew.
    other = dataclasses.replace(params, unet_learning_rate=3e-4, max_train_steps=7, seed=5, use_8bit_adam=True)
    assert estimate_for_configs(configs, other, cache_dir=tmp_path).step == first.step and len(calls) == 1
    assert estimate_for_configs(configs, dataclasses.replace(params, rank=5), cache_dir=tmp_path).step != first.step
    assert len(calls) == 2
    (tmp_path / CACHE_FILE).write_text("{not json", encoding="utf-8")                      # a broken file: measured again
    monkeypatch.setattr(peak, "_MEASURED", {})
    assert estimate_for_configs(configs, params, cache_dir=tmp_path) == first and len(calls) == 3


class _Reads:
    """TrainingParams that note which fields are read."""

    def __init__(self, params: TrainingParams):
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        method = getattr(type(self._params), name, None)
        if callable(method):  # a method's own reads are what count
            return method.__get__(self)
        self.read.add(name)
        return getattr(self._params, name)


# text_encoder_lora(i) gives (rank, alpha, learning rate) together; a learning rate changes no byte.
READ_ALONG = {"text_encoder_learning_rate", "text_encoder_2_learning_rate"}


@pytest.mark.one_env
@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_the_fake_run_reads_only_the_settings_its_measurements_are_kept_under(created_sd1, created_xl, model):
    created = created_sd1 if model == "tiny" else created_xl
    configs = PartConfigs.from_model_dir(created.model_dir(model))
    options = [dict(cache_latents=False, use_dora=True, conv_rank=2, use_ema=True),
               dict(gradient_checkpointing=True, train_text_encoder=False, cache_text_encoder_outputs=True,
                    base_weights="fp8")]
    read = set()
    for changes in options:
        params = _Reads(dataclasses.replace(BASE, **changes))
        fakestep.measure_run(configs.model_type, configs.parts, params, 1)
        read |= params.read
    assert read and read - READ_ALONG <= set(MEASURED_FIELDS), read - READ_ALONG - set(MEASURED_FIELDS)
