"""The predicted peak GPU memory of a run: one fake training step of the real architecture, counted
byte by byte, checked against peaks measured on a GPU, and a run predicted not to fit refused."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from helpers_train import instance_pictures, private_models

from lora_trainer import train as train_module
from lora_trainer.config import Concept, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.training.livebytes import LiveBytes
from lora_trainer.training.memory import GB, memory_report
from lora_trainer.training.peak import PartConfigs, check_peak, estimate_for_configs

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


def test_train_refuses_a_run_predicted_not_to_fit_before_anything_is_loaded(created_sd1, tmp_path, monkeypatch):
    """The weights and training state fit; the predicted peak does not (free memory as a small GPU would say)."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded weights before checking the memory")

    params = TrainingParams(resolution=64, gradient_checkpointing=True, train_text_encoder=False)
    estimate = estimate_for_configs(PartConfigs.from_model_dir(created_sd1.model_dir("tiny")), params,
                                    prior_preservation=False)
    monkeypatch.setattr(train_module, "free_gpu_memory", lambda device: estimate.reserved - 1)
    monkeypatch.setattr(train_module, "load_working_model", must_not_run)
    monkeypatch.setattr(train_module, "generate_class_images", must_not_run)
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs")
    with pytest.raises(ConfigError, match="predicted to peak at"):
        train_module.train(models, "tiny", params, [concept], device="cpu")
    assert not (models.model_dir("tiny") / "params.json").exists()
