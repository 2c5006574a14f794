"""Faults in the middle of a job: out of GPU memory in a step, a full disk."""
from __future__ import annotations

import torch
from helpers_hosts import RecordingHost
from helpers_train import instance_pictures, private_models

from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.jobs import JobRunner
from lora_trainer.train import train
from lora_trainer.training import loop as loop_module
from lora_trainer.training.resume import load_optimizer_state

FAST = dict(resolution=32, hflip=False, seed=0, train_batch_size=1)


def test_out_of_gpu_memory_in_a_step_saves_gives_back_and_names_the_options(created_sd1, tmp_path, monkeypatch,
                                                                              reliability):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    real, calls = loop_module.compute_loss, []

    def third_step_runs_out(loop, batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(loop, batch)

    monkeypatch.setattr(loop_module, "compute_loss", third_step_runs_out)
    host = RecordingHost(models)
    runner = JobRunner(host)
    params = TrainingParams(max_train_steps=5, **FAST)
    runner.start("train", "Train tiny", lambda report, cancel: train(models, "tiny", params, [concept],
                                                                     report=report, cancel=cancel, device="cpu"))
    assert runner.wait(300)
    error = runner.snapshot().error
    assert error is not None and "\n" not in error
    assert "out of GPU memory at step 3" in error and "GPU memory before activations:" in error, error
    assert all(option in error for option in ("Gradient Checkpointing", "Use 8bit Adam", "train_batch_size")), error
    assert "the 2 steps before it are saved (tiny_2.safetensors)" in error, error
    assert (models.lora / "tiny_2.safetensors").is_file()
    folder = models.model_dir("tiny")
    assert ModelInfo.load(folder / "model_info.json").lifetime_steps == 2
    assert load_optimizer_state(folder / "resume" / "optimizer.safetensors")["state"][0]["step"] == 2
    assert host.calls.index("release_gpu") < host.calls.index("restore_gpu")
    reliability("Out of GPU memory (torch.OutOfMemoryError) in training step 3 of 5",
                f"stopped with one line: \"{error}\"; kept: {sorted(p.name for p in models.lora.iterdir())}, "
                f"resume state at step 2; host model given back ({', '.join(host.calls)})")
