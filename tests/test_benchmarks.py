"""The training benchmark's CPU path runs and prints its figures (not a timed test: only that it produces them)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_speed  # noqa: E402

FIGURES = re.compile(r"^(floor|recipe|ours) tiny +\d+\.\d+ s/step +\d+\.\d+ samples/s peak +\d+\.\d+ GiB +\d+\.\d+x floor time")


def test_the_training_benchmark_measures_floor_recipe_and_ours_at_tiny_size(capsys):
    lines = train_speed.main(["--sizes", "tiny", "--steps", "1", "--warmup", "1", "--in-process"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("# ") and "torch " + torch.__version__ in printed[0] and "peft " in printed[0]
    rows = [line for line in lines if FIGURES.match(line)]
    assert [row.split()[0] for row in rows] == ["floor", "recipe", "ours"], lines
    assert "rank 4" in rows[2] and "64 px" in rows[2]
    assert any(re.match(r"^ours tiny: \d+\.\d+x the recipe's step time, \d+\.\d+x its peak memory$", line) for line in lines)


def test_the_gpu_mode_says_it_is_skipped_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_speed.main(["--mode", "gpu"]) == []
    assert "no CUDA GPU here; skipped" in capsys.readouterr().out


def test_the_gpu_table_has_the_fast_path_beside_the_recipe():
    rows = {row.name: row for row in train_speed.gpu_rows()}
    fast = rows["ours r4, checkpointing, fast path"]
    params = train_speed.row_params(fast, 512, cuda=True)
    assert (params.compile_unet, params.gradient_checkpointing, params.mixed_precision, params.rank) == (True, True, "fp16", 4)
    recipe = rows["recipe r4, checkpointing"]

    def result(row, seconds):
        return dict(row=row, params=train_speed.row_params(row, 512, cuda=True), seconds=seconds, samples=2 / seconds,
                    peak=2**31, predicted=None, loss=0.1)

    lines = train_speed.report([result(recipe, 0.4), result(fast, 0.25)])
    assert "ours r4, checkpointing, fast path: 0.62x the recipe's step time, 1.00x its peak memory" in lines
    runs = [dict(seconds=s) for s in (0.5, 0.2, 0.3)]
    assert train_speed.median_run(runs)["seconds"] == 0.3
