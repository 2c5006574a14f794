"""One writer per model, with real processes: a running `train` command holds the model; a second
`train`, Generate Ckpt or an overwriting Create Model is refused naming it; a killed one's lock is taken over."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_train import instance_pictures, private_models

from lora_trainer.checkpoint import create_model
from lora_trainer.cli import main
from lora_trainer.modellock import LOCK_FILE, ModelBusy, model_lock

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"the child ended early: {process.stdout.read()}")
        if path.is_file() and path.read_text():
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear")


def test_second_writer_refused_and_dead_lock_taken_over(created_sd1, tmp_path, capsys, caplog, reliability):
    models = private_models(created_sd1, tmp_path / "models")
    pictures = instance_pictures(tmp_path / "pictures")
    folder = models.model_dir("tiny")
    command = ["train", "--models-dir", str(models.working.parent), "--model", "tiny", "--device", "cpu",
               "--instance_data_dir", str(pictures), "--instance_prompt", "scs thing", "--resolution", "32",
               "--max_train_steps", "100000", "--save_every_n_steps", "0"]
    child = subprocess.Popen([sys.executable, "-m", "lora_trainer", *command], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        holder = _wait_for(folder / LOCK_FILE, child)
        assert (holder["job"], holder["pid"]) == ("train", child.pid)

        for second in (command, ["merge", "--models-dir", str(models.working.parent), "--model", "tiny"]):
            capsys.readouterr()
            assert main(second) == 2
            error = capsys.readouterr().err.strip()
            assert len(error.splitlines()) == 1 and f"train job (process {child.pid}" in error, error
            reliability(f"A second `{second[0]}` command on a model a `train` command (another process) is training",
                        f"refused, exit 2: \"{re.sub(r'since [0-9:]+', 'since HH:MM:SS', error.replace(str(child.pid), 'PID'))}\"")
        with pytest.raises(ModelBusy, match=f"process {child.pid}"):
            create_model(models, next(models.checkpoints.glob("*.safetensors")).name,
                         "tiny", overwrite=True)

        # Another model is not held: it trains (here: takes its lock) side by side.
        other = models.model_dir("other")
        other.mkdir()
        with model_lock(other, "train"):
            assert json.loads((other / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not (other / LOCK_FILE).exists()

        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert (folder / LOCK_FILE).is_file()  # left by the killed process
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        with model_lock(folder, "merge"):
            assert json.loads((folder / LOCK_FILE).read_text())["job"] == "merge"
    taken = [r.getMessage() for r in caplog.records if f"(process {child.pid}) is no longer running" in r.getMessage()]
    assert taken
    reliability("The lock of a `train` process killed with kill -9", f"the next job takes it over: \"{taken[0].replace(str(child.pid), 'PID')}\"")
    assert not (folder / LOCK_FILE).exists()


def test_a_thread_of_the_same_process_is_refused_and_nesting_passes(tmp_path):
    import threading

    folder = tmp_path / "model"
    folder.mkdir()
    errors = []
    with model_lock(folder, "train"):
        with model_lock(folder, "class images"):  # training makes its class pictures under its own lock
            pass
        assert (folder / LOCK_FILE).is_file()

        def merge():
            try:
                with model_lock(folder, "merge"):
                    pass
            except ModelBusy as e:
                errors.append(str(e))

        thread = threading.Thread(target=merge)
        thread.start()
        thread.join()
    assert errors and f"train job (process {os.getpid()}" in errors[0]
