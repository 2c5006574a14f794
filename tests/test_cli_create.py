"""`create` on the command line: a pickle that asks to run code is refused in one sentence of ours."""
from __future__ import annotations

import os
import pickle

import pytest

from lora_trainer.cli import main


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle.dump", "pickle.dump, no code", "torch.save"])
def test_a_refused_pickle_gets_our_sentence_without_torchs_text_or_warnings(models_dir, tmp_path, capfd, writer):
    import torch

    marker = tmp_path / "pwned"
    path = models_dir.checkpoints / "evil.ckpt"
    weights = {"model.diffusion_model.x": torch.zeros(1)}
    if writer == "torch.save":
        torch.save({"state_dict": weights, "payload": Payload(marker)}, path)
    else:
        data = {"state_dict": {"x": 1}} if writer.endswith("no code") else {"state_dict": {"x": Payload(marker)}}
        with open(path, "wb") as f:
            pickle.dump(data, f)
    capfd.readouterr()
    code = main(["create", "--models-dir", str(models_dir.checkpoints.parent), "--source", "evil.ckpt", "--name", "m"])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err  # no torch warnings either
    assert err.startswith(f"error: {path}: refused to load: ")
    if writer.endswith("no code"):
        assert "a plain Python pickle, which can run code when loaded" in err
    else:
        assert f"it asks to run code ('{os.system.__module__}.system')" in err
    assert "convert it to .safetensors with a tool you trust" in err
    assert "weights_only" not in err and "torch.load" not in err
    assert not marker.exists() and not models_dir.model_dir("m").exists()
