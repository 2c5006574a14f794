"""The run's figures on disk: one CSV row per step with loss, learning rate per group, step time and memory
(and TensorBoard event files beside it where the tensorboard package is installed)."""
from __future__ import annotations

import csv
import math

from helpers_train import instance_pictures, private_models

from lora_trainer.config import Concept, TrainingParams
from lora_trainer.train import train
from lora_trainer.training.logs import CSV_FILE, LOGS_DIR, RunLog, tensorboard_available


def test_the_csv_has_one_row_per_step(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(max_train_steps=3, resolution=32, hflip=False, seed=0, unet_learning_rate=1e-3,
                            text_encoder_learning_rate=2e-4, lr_scheduler="linear")
    result = train(models, "tiny", params, [concept], device="cpu")
    runs = list((models.model_dir("tiny") / LOGS_DIR).iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("1-")   # the model's revision 1
    with (runs[0] / CSV_FILE).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [int(r["lifetime_step"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == result.losses
    assert all(r["val_loss"] == "" for r in rows)  # no validation pictures
    unet_lr = [float(r["lr_unet"]) for r in rows]
    text_lr = [float(r["lr_text_encoder"]) for r in rows]
    assert unet_lr[0] > unet_lr[1] > unet_lr[2] >= 0 and math.isclose(text_lr[0] / unet_lr[0], 0.2)
    assert all(float(r["step_seconds"]) > 0 for r in rows)
    assert all(r["memory_mb"] == "" for r in rows)  # peak GPU memory: none on the CPU
    events = list(runs[0].glob("events.out.tfevents.*"))
    assert bool(events) == tensorboard_available()

    train(models, "tiny", TrainingParams(max_train_steps=1, resolution=32, hflip=False, seed=0), [concept],
          device="cpu")
    assert len(list((models.model_dir("tiny") / LOGS_DIR).iterdir())) == 2  # each run its own folder


def test_rows_are_on_disk_while_the_run_goes_on(tmp_path):
    log = RunLog(tmp_path, 3, ["unet"])
    log.row(step=1, lifetime_step=11, epoch=0, loss=0.5, val_loss=0.25, lrs=[1e-4], memory_mb=12.5)
    rows = list(csv.DictReader((log.path).open(newline="")))
    assert rows == [{"step": "1", "lifetime_step": "11", "epoch": "0", "loss": "0.5", "val_loss": "0.25",
                     "lr_unet": "0.0001", "step_seconds": rows[0]["step_seconds"], "memory_mb": "12.5"}]
    log.close()
    if tensorboard_available():  # the same figures in TensorBoard's event files (only where it is installed)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(log.folder))
        events.Reload()
        assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss/validation")] == [(11, 0.25)]
        assert {"loss/train", "lr/unet", "time/step_seconds", "memory/peak_mb"} <= set(events.Tags()["scalars"])
