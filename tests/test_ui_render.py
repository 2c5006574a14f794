"""The Train tab's figures and loss plot, from a job's state."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_trainer.jobs import JobState
from lora_trainer.progress import Progress, TrainResult
from lora_trainer.ui import render


def test_a_running_training_shows_step_loss_speed_memory_and_time_left():
    state = JobState(name="train 'cat'", kind="train", running=True,
                     progress=Progress(job="train", message="Training", step=3, total_steps=10, loss=0.12345,
                                       it_per_s=1.5, memory_mb=7123.0, seconds_left=75))
    assert render.progress_figures(state) == ["Step 3/10", "loss 0.1235", "1.50 it/s", "memory 7,123 MB",
                                              "time left 01:15"]
    html = render.progress_html(state)
    assert 'width:30.0%' in html and 'data-step="3"' in html
    assert "Running train &#x27;cat&#x27;: Training" in render.status_html(state)  # escaped HTML


def test_a_finished_job_fills_the_bar_and_says_what_it_made():
    result = TrainResult(lora_path=Path("/m/Lora/cat_1000.safetensors"), lifetime_steps=1000, revision=1, steps=1000)
    state = JobState(name="train 'cat'", kind="train", running=False, result=result,
                     progress=Progress(job="train", message="Saving", step=990, total_steps=1000),
                     losses=[(1, 0.3), (2, 0.2)])
    assert "width:100.0%" in render.progress_html(state)
    assert "loss 0.2000" in render.progress_html(state)  # the last loss when the last report had none
    assert state.status == "train 'cat' finished: 1000 steps, total lifetime steps 1000; LoRA cat_1000.safetensors"


def test_a_cancelled_or_failed_job_does_not_look_finished():
    result = TrainResult(lora_path=None, lifetime_steps=12, revision=1, steps=12, cancelled=True)
    state = JobState(name="train 'cat'", kind="train", result=result,
                     progress=Progress(job="train", step=12, total_steps=100))
    assert "width:12.0%" in render.progress_html(state) and "cancelled" in state.status
    failed = JobState(name="generate ckpt", kind="merge", error="Lora Model: 'x' not found")
    assert failed.status == "generate ckpt failed: Lora Model: 'x' not found"


def test_the_loss_plot_draws_the_losses():
    blank = render.loss_plot([])
    drawn = render.loss_plot([(i, 1.0 / i) for i in range(1, 60)])
    assert drawn.size == render.PLOT_SIZE

    def orange(im):
        px = np.asarray(im).astype(int)
        return int(((px[..., 0] > 150) & (px[..., 1] < 180) & (px[..., 2] < 120)).sum())

    assert orange(blank) == 0 and orange(drawn) > 100
    # A falling loss: the line starts high on the left and ends low on the right.
    left_column = [y for y in range(drawn.height) if drawn.getpixel((49, y)) != (255, 255, 255)
                   and drawn.getpixel((49, y))[2] < 120]
    assert left_column and min(left_column) < drawn.height // 2


def test_time_left_reads_like_a_clock():
    assert render.format_seconds(5) == "00:05"
    assert render.format_seconds(3725) == "1:02:05"
    assert render.format_seconds(None) == "?"
