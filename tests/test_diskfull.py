"""A full disk: every writer stops with one line naming the folder and the space it needed; what was
there before is intact. Tested with files whose writes fail with ENOSPC after N bytes, and once with a
real full file system (a small tmpfs) under the `train` command."""
from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers_merge import load_parts, random_lora, save_lora
from helpers_train import instance_pictures, private_models
from helpers_writes import watching_copy_file_range, watching_open, write_part
from PIL import Image

from lora_trainer.checkpoint import create_model
from lora_trainer.checkpoint_io import file_sha256
from lora_trainer.classimages import save_class_image
from lora_trainer.cli import main
from lora_trainer.config import ModelInfo, TrainingParams
from lora_trainer.errors import DiskFullError
from lora_trainer.lora import save_lora as write_lora_file
from lora_trainer.merge import merge_lora
from lora_trainer.training.resume import save_resume_state


@contextlib.contextmanager
def disk_fills_after(monkeypatch, folder: Path, nbytes: int):
    """Files opened for writing under `folder` share `nbytes` of space; then every write fails with ENOSPC
    (the bytes that fit are written)."""
    left = [nbytes]

    def before_write(file, data, size: int) -> None:
        if size > left[0]:
            write_part(file, data, left[0])
            left[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= size

    filling_open = watching_open(builtins.open, [folder], before_write)
    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", filling_open)
        patch.setattr(io, "open", filling_open)
        patch.setattr(os, "copy_file_range", watching_copy_file_range(os.copy_file_range, [folder], before_write))
        yield


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) and its hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _free_as_n(message: str) -> str:
    """The free space (it changes from run to run) as N, for the table."""
    return re.sub(r"and [0-9.]+ [A-Za-z]+ is free", "and N is free", message)


def _one_line(error: DiskFullError, folder: Path) -> str:
    message = str(error)
    assert "\n" not in message and message.startswith(f"{folder}: the disk is full") and "needs" in message, message
    return message


@pytest.fixture
def models(created_sd1, tmp_path):
    return private_models(created_sd1, tmp_path / "models")


def test_every_writer_stops_with_one_line_and_keeps_what_was_there(models, tmp_path, monkeypatch, reliability):
    folder = models.model_dir("tiny")
    unet, text = load_parts(folder)
    adapters = random_lora(unet, text, seed=1)
    lora = save_lora(models.lora / "tiny_1000.safetensors", adapters)
    save_resume_state(folder, adapters, None, lifetime_steps=0, lora_file=lora.name)
    TrainingParams(rank=4).save(folder / "params.json")
    info = ModelInfo.load(folder / "model_info.json")  # a run's save records the source's hash
    info.source_checkpoint_hash = file_sha256(models.checkpoints / info.source_checkpoint)
    info.save(folder / "model_info.json")
    classes = tmp_path / "class"
    save_class_image(classes, Image.new("RGB", (8, 8)), "thing")
    before = {"models": _snapshot(models.working.parent), "class": _snapshot(classes)}
    checkpoint = next(models.checkpoints.glob("*.safetensors")).name

    writers = [
        ("Create Model: the working model folder", models.working,
         lambda: create_model(models, checkpoint, "second")),
        ("class pictures", classes, lambda: save_class_image(classes, Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)), "thing")),
        ("the LoRA file", models.lora, lambda: write_lora_file(models.lora / "tiny_2000.safetensors", adapters, {})),
        ("the optimizer and resume state", folder,
         lambda: save_resume_state(folder, adapters, {"state": {0: {"step": torch.tensor(3.0),
                                                                   "exp_avg": torch.ones(4096)}},
                                                      "param_groups": [{"lr": 1e-4, "params": [0]}]},
                                   lifetime_steps=3, lora_file="tiny_3.safetensors")),
        ("Generate Ckpt: the merged checkpoint", models.checkpoints,
         lambda: merge_lora(models, "tiny", lora=lora.name, custom_name="merged")),
        ("the parameters (params.json)", folder, lambda: TrainingParams(rank=8).save(folder / "params.json")),
    ]
    for what, where, write in writers:
        with disk_fills_after(monkeypatch, where, 100):
            with pytest.raises(DiskFullError) as full:
                write()
        message = _one_line(full.value, where)
        assert _snapshot(models.working.parent) == before["models"], what
        assert _snapshot(classes) == before["class"], what
        reliability(f"Disk full (ENOSPC after 100 bytes) while writing {what}",
                    f"stopped: \"{_free_as_n(message.replace(str(tmp_path), '...'))}\"; every earlier file unchanged, "
                    "no temporary left")


def test_a_full_tmpfs_under_the_train_command(models, tmp_path, capsys, reliability):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on this machine")
    models.lora.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(models.lora)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.strip()}")
    try:
        pictures = instance_pictures(tmp_path / "pictures")
        info_before = (models.model_dir("tiny") / "model_info.json").read_bytes()
        capsys.readouterr()
        code = main(["train", "--models-dir", str(models.working.parent), "--model", "tiny", "--device", "cpu",
                     "--instance_data_dir", str(pictures), "--instance_prompt", "scs thing", "--resolution", "32",
                     "--max_train_steps", "1", "--train_batch_size", "3"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, errors  # (the rest of stderr is the progress bars)
        error = errors[0]
        assert f"{models.lora}: the disk is full" in error and "needs" in error, error
        assert list(models.lora.iterdir()) == []  # no partial LoRA, no temporary
        assert (models.model_dir("tiny") / "model_info.json").read_bytes() == info_before
        assert ModelInfo.load(models.model_dir("tiny") / "model_info.json").lifetime_steps == 0
        reliability("Disk full for real: the Lora folder on a 16 KB tmpfs, `train` command",
                    f"exit 2, one line: \"{error.replace(str(tmp_path), '...')}\"; no file in Lora/, "
                    "model_info.json unchanged")
    finally:
        subprocess.run(["umount", str(models.lora)], check=True)
