"""The "4 GB card" preset's loss curve against the same run with its base weights kept as they load.

Issue 13: the frozen base weights stored in float8 (e4m3, with a scale) must train as the half-precision
ones do: the loss curve within 2 % over the same 200 steps on the same data. Two working models are
created from one checkpoint, and each trains 200 steps with the preset, the same seed and the same
pictures (so both runs draw the same noise and timesteps, step for step); the only difference is
"Base Weight Storage" (fp8, or default: the weights in the run's dtype, fp16 on a GPU, fp32 on a CPU,
where a preset trains in fp32). Printed: the mean loss of each window of steps in both runs, their
relative difference, the largest of those and the mean of all steps, and the verdict against 2 %.

    python benchmarks/fp8_loss.py                     # the built-in tiny SD 1.x model on the CPU
    python benchmarks/fp8_loss.py --device cuda --full-size     # SD 1.5's architecture, random weights, 512 px
    python benchmarks/fp8_loss.py --device cuda --checkpoint model.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_trainer.checkpoint import create_model  # noqa: E402
from lora_trainer.cli.demo import draw_pictures  # noqa: E402
from lora_trainer.config import Concept, ModelInfo, TrainingParams  # noqa: E402
from lora_trainer.host import ModelsDir  # noqa: E402
from lora_trainer.presets import apply_preset  # noqa: E402
from lora_trainer.tiny import write_tiny_checkpoint  # noqa: E402
from lora_trainer.train import train  # noqa: E402

PRESET = "4 GB card"
TARGET = 0.02  # the largest relative difference of a window's mean loss the issue allows


def run_both(work: Path, checkpoint: Path | str | None, steps: int, resolution: int | None,
             device: str) -> dict[str, list[float]]:
    """The per-step losses of the preset with float8 base weights and with them as they load (same data, seed).
    `checkpoint`: a file, "full-size" (SD 1.5's architecture with seeded random weights) or None (tiny)."""
    models = ModelsDir.at(work)
    models.checkpoints.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        checkpoint = write_tiny_checkpoint(models.checkpoints)
    elif checkpoint == "full-size":
        from full_size import full_size_checkpoint

        checkpoint = full_size_checkpoint(models.checkpoints / "full-sd1-fp16.safetensors", "sd1", torch.float16)
    else:
        checkpoint = Path(shutil.copy2(checkpoint, models.checkpoints / Path(checkpoint).name))
    storages = ("fp8", "default")
    folders = [create_model(models, checkpoint.name, f"bench-{storage}", overwrite=True) for storage in storages]
    size = resolution or ModelInfo.load(folders[0] / "model_info.json").resolution
    concept = Concept(instance_data_dir=str(draw_pictures(work / "pictures", size=size)),
                      instance_prompt="scs shape, [filewords]")
    params = dataclasses.replace(apply_preset(TrainingParams(), PRESET, cuda=device.startswith("cuda")),
                                 max_train_steps=steps, num_train_epochs=steps, resolution=size, seed=0, hflip=False,
                                 save_preview_every_n_steps=0)
    return {storage: list(train(models, f"bench-{storage}", dataclasses.replace(params, base_weights=storage),
                                [concept], device=device).losses) for storage in storages}


def compare(losses: dict[str, list[float]], window: int) -> list[str]:
    """Each window's mean loss in both runs and their relative difference, then the largest and the verdict."""
    fp8, reference = losses["fp8"], losses["default"]
    lines, worst = [], 0.0
    for start in range(0, len(reference), window):
        a = sum(fp8[start:start + window]) / len(fp8[start:start + window])
        b = sum(reference[start:start + window]) / len(reference[start:start + window])
        worst = max(worst, abs(a - b) / b)
        lines.append(f"steps {start + 1:4d}-{min(start + window, len(reference)):4d}: fp8 {a:.5f}, "
                     f"default {b:.5f}, {(a - b) / b:+.2%}")
    overall = (sum(fp8) - sum(reference)) / sum(reference)
    verdict = "met" if worst <= TARGET else "MISSED"
    lines.append(f"{PRESET}, {len(reference)} steps: largest window difference {worst:.2%}, all steps {overall:+.2%} "
                 f"[target: every window within {TARGET:.0%}: {verdict}]")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20, help="steps per window of the curve (default 20)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a .safetensors/.ckpt (default: the tiny model)")
    parser.add_argument("--full-size", action="store_true",
                        help="SD 1.5's architecture with seeded random weights (a 2 GB fp16 checkpoint)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    parser.add_argument("--workdir", type=Path, default=None, help="where the models are made (default: a temp dir)")
    args = parser.parse_args(argv)
    checkpoint = "full-size" if args.full_size else args.checkpoint
    model = {"full-size": "SD 1.5 architecture, random weights", None: "tiny SD 1.x model"}.get(checkpoint, checkpoint)
    print(f"# fp8 loss curve: {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}"
          f"{', ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}; python "
          f"{platform.python_version()}, torch {torch.__version__}; {args.steps} steps, preset {PRESET!r}, "
          f"{model}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fp8-loss-") as tmp:
        work = args.workdir or Path(tmp)
        lines = compare(run_both(work, checkpoint, args.steps, args.resolution, args.device), args.window)
    for line in lines:
        print(line, flush=True)
    return lines


if __name__ == "__main__":
    main()
