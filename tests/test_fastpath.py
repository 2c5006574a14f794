"""The fast path, "Compile UNet (fast path)": refused where torch.compile cannot run; the compiled step
gives the eager loss and gradients within rounding (it compiles for minutes on a loaded CPU: marked one_env);
a compilation that fails falls back with a line and the eager step's exact result."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers_train import instance_pictures, private_models

from lora_trainer import train as train_module
from lora_trainer.config import Concept, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.lora import read_lora
from lora_trainer.train import train
from lora_trainer.training import fastpath
from lora_trainer.training.hardware import check_options, probe_hardware
from lora_trainer.training.loop import compute_loss

# 32 px, and a learning rate that moves the adapters well away from their start.
PARAMS = dict(max_train_steps=3, train_batch_size=1, unet_learning_rate=2e-2, text_encoder_learning_rate=2e-2,
              resolution=32, hflip=False, seed=3, new_run=True)


def test_compile_is_refused_without_a_cpp_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(ConfigError, match=r"Compile UNet \(fast path\) \('compile_unet'\): .*'no-such-compiler-here'.*"
                                          r"not found on PATH.*untick it"):
        check_options(TrainingParams(compile_unet=True), probe_hardware("cpu"))
    check_options(TrainingParams(compile_unet=False), probe_hardware("cpu"))  # nothing asked, nothing refused


def test_compile_is_refused_without_torch_compile(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    assert "has no torch.compile" in fastpath.compile_problem(torch.device("cpu"))


def test_cuda_graphs_only_for_one_shape_on_a_gpu():
    assert fastpath.compile_mode(torch.device("cuda"), static_shapes=True) == "reduce-overhead"
    assert fastpath.compile_mode(torch.device("cuda"), static_shapes=False) is None
    assert fastpath.compile_mode(torch.device("cpu"), static_shapes=True) is None


def _run(created_sd1, root, concept, **changes):
    models = private_models(created_sd1, root)
    loops = []
    real = train_module.run_loop

    def watch(loop, display):
        loops.append(loop)
        return real(loop, display)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "run_loop", watch)
        result = train(models, "tiny", TrainingParams(**{**PARAMS, **changes}), [concept], device="cpu")
    return result, read_lora(result.lora_path)[0], loops[0]


@pytest.mark.one_env
def test_the_compiled_step_gives_the_eager_loss_and_gradients(created_sd1, tmp_path, caplog):
    """One compiled training step through `train`, then the loss and gradients of a batch through the compiled
    UNet against the eager one on the weights that step trained (its LoRA no longer zero, so it counts)."""
    problem = fastpath.compile_problem(torch.device("cpu"))
    assert problem is None, f"this machine cannot compile: {problem}"
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        # 64 px: at 32 the tiny UNet's lowest level is 1 x 1, where GroupNorm over a one-value group turns
        # rounding into large gradient differences (eager against eager in another order would show them too).
        result, lora, loop = _run(created_sd1, tmp_path / "fast", concept, compile_unet=True, max_train_steps=1,
                                  resolution=64)
    assert loop.compiled_unet is not None and loop.compiled_unet.active, caplog.text
    assert "torch.compile failed" not in caplog.text and len(result.losses) == 1
    # The compiled backward reached the UNet's adapters (a self-attention over one latent pixel has a zero gradient
    # in its key projection, eager too: not all of them move).
    moved = [float(lora[k].abs().max()) > 0 for k in lora if k.endswith("lora_up.weight") and k.startswith("lora_unet")]
    assert sum(moved) > len(moved) / 2, moved
    batch = next(iter(loop.loader))

    def loss_and_gradients(compiled: bool):
        loop.compiled_unet.active = compiled
        loop.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = compute_loss(loop, batch)
        loss.total.backward()
        return loss.total.item(), [p.grad.clone() for p in loop.trainable]

    compiled_loss, compiled_grads = loss_and_gradients(True)
    eager_loss, eager_grads = loss_and_gradients(False)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert len(compiled_grads) == len(eager_grads) == len(loop.trainable)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-12)


def test_a_failing_compile_falls_back_with_a_line(created_sd1, tmp_path, caplog, monkeypatch):
    """A backend that fails: the run goes on eagerly from the same batch, with the same noise."""
    def broken(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("no C++ compiler worked\nmore detail")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = dict(max_train_steps=1)
    eager, eager_lora, _ = _run(created_sd1, tmp_path / "eager", concept, **params)
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        fast, fast_lora, loop = _run(created_sd1, tmp_path / "fast", concept, compile_unet=True, **params)
    assert not loop.compiled_unet.active
    lines = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert lines == ["Compile UNet (fast path) ('compile_unet'): torch.compile failed (RuntimeError: no C++ compiler "
                     "worked); training goes on with the eager UNet, as without the option. Untick it to skip the "
                     "attempt"]
    assert fast.losses == eager.losses  # exactly: the generators were put back before the eager retry
    assert all(torch.equal(fast_lora[k], eager_lora[k]) for k in eager_lora)
