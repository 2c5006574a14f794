"""The fast path, "Compile UNet (fast path)": refused where torch.compile cannot run, and a compiled run
trains what an eager run trains (same losses and LoRA within rounding), falling back with a line when
compiling fails."""
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

# Three steps at 32 px with a learning rate that moves the loss: steps 2 and 3 differ from step 1's only
# through what the compiled backward taught the adapters.
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


@pytest.mark.compile
def test_compiled_run_trains_like_the_eager_run(created_sd1, tmp_path, caplog):
    if fastpath.compile_problem(torch.device("cpu")):
        pytest.fail(f"this machine cannot compile: {fastpath.compile_problem(torch.device('cpu'))}")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    eager, eager_lora, _ = _run(created_sd1, tmp_path / "eager", concept)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        fast, fast_lora, loop = _run(created_sd1, tmp_path / "fast", concept, compile_unet=True)
    assert loop.compiled_unet is not None and loop.compiled_unet.active, caplog.text
    assert "torch.compile failed" not in caplog.text
    assert len(fast.losses) == len(eager.losses) == 3
    assert eager.losses[1] != pytest.approx(eager.losses[0], rel=1e-2)  # the step changes the loss: a real check
    assert fast.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-6)
    ups = [k for k in eager_lora if k.endswith("lora_up.weight") and k.startswith("lora_unet")]
    assert ups and all(eager_lora[k].abs().max() > 0 for k in ups)  # the UNet's adapters learned
    for key, tensor in eager_lora.items():
        torch.testing.assert_close(fast_lora[key], tensor, rtol=1e-3, atol=1e-5, msg=key)


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
