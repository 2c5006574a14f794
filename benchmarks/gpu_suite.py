"""Every figure issues 12 and 13 ask of a lent GPU, from one command that finishes in under 8 minutes on one
H100/H200.

Parts, in this order (each prints its own header with hardware, versions and settings):

- train:       benchmarks/train_speed.py --mode gpu --gpu-rows table: SD 1.5 at 512, the floor, the
               diffusers recipe and ours side by side (rank 4 and 32, checkpointing on and off, text
               encoder frozen, batch 4), bf16, the "8 GB GPU" and "4 GB card" presets, each of ours with
               its predicted peak;
- families:    benchmarks/family_speed.py: SD 2.x-v at 768 px (v-prediction) and SDXL at 1024 px,
               floor and ours, and SDXL's "8 GB GPU (SDXL)" preset, each of ours with its predicted peak;
- fastpath:    benchmarks/train_speed.py --mode gpu --gpu-rows fast-path: the fast path (Compile UNet,
               CUDA graphs) beside the recipe and our eager step; it compiles for minutes, so it comes
               after the figures that need no compiling;
- classimages: benchmarks/class_images_speed.py --mode gpu: images/s of class pictures, SD 1.5 at
               512 px, fp16, batch sizes 1 and 4;
- files (only when asked for: `--parts files`): benchmarks/create_memory.py and merge_memory.py (the
               LoRA Train writes by default) on a full-size fp16 checkpoint: CPU work, which any machine
               measures (docs/benchmarks.md), so it spends no GPU time by default;
- fp8loss (only when asked for: `--parts fp8loss`, about 4 minutes): benchmarks/fp8_loss.py on SD 1.5's
               architecture: the "4 GB card" preset's loss curve over 200 steps against the same run with
               fp16 base weights (issue 13: within 2 %).

A part that fails prints its error and the next one runs. Step counts are kept small (GPU time is
scarce): `--steps 5 --warmup 2` per SD 1.5 row, `--family-steps 3 --family-warmup 1` per SD 2.x-v /
SDXL row. The predicted peaks are worked out on the CPU in worker processes while the GPU measures.
Before it starts it prints the estimate of its length from those counts; at the end, how long each
part took. Without CUDA every GPU part says it is skipped (tests/test_benchmarks.py runs it so);
`files` then runs when asked for (`fp8loss` runs on the CPU as `python benchmarks/fp8_loss.py`).

    python benchmarks/gpu_suite.py [--parts train,families,fastpath,classimages] [--steps 5 --warmup 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from family_speed import FAMILIES, family_rows  # noqa: E402
from train_speed import gpu_rows  # noqa: E402

DEFAULT_PARTS = ("train", "families", "fastpath", "classimages")
PARTS = (*DEFAULT_PARTS, "files", "fp8loss")
TRAIN_ROWS, FASTPATH_ROWS = len(gpu_rows("table")), len(gpu_rows("fast-path"))
FAMILY_ROWS = len(family_rows(list(FAMILIES), tiny=False))
# Seconds on one H100/H200, for the estimate (guesses, pessimistic; no GPU has run it yet): 0.15-0.45 s
# per SD 1.5 step (issue 13's table), an SDXL step at 1024 px taken as 3x the slowest; building a row's
# models on the GPU in their dtypes and accelerate's prepare 6 s (the peak predictions run beside, in
# worker processes on the CPU); compiling SD 1.5's UNet forward and backward with inductor and CUDA graphs
# 150 s (the tiny model took 220 s on two loaded CPU cores); class images (a 2 GB checkpoint built and
# created, the pipeline loaded 4 times, 17 pictures of 20 steps) 60 s; create and merge benchmarks (7
# processes, 2 GB each) 90 s.
ROW_SETUP_S, SD15_STEP_S, FAMILY_STEP_S, COMPILE_S = 6, 0.45, 1.5, 150
CLASS_IMAGES_S, FILES_S, START_S = 60, 90, 20
FP8_LOSS_S = 2 * (30 + 200 * SD15_STEP_S)  # two 200-step runs, each with its model created from a 2 GB checkpoint


def estimate_seconds(parts: list[str], steps: int, warmup: int, family_steps: int, family_warmup: int) -> float:
    """A pessimistic length of the run on one H100/H200, from the step counts."""
    seconds = START_S
    sd15_row = ROW_SETUP_S + (steps + warmup) * SD15_STEP_S
    if "train" in parts:
        seconds += TRAIN_ROWS * sd15_row
    if "families" in parts:
        seconds += FAMILY_ROWS * (ROW_SETUP_S + (family_steps + family_warmup) * FAMILY_STEP_S)
    if "fastpath" in parts:
        seconds += FASTPATH_ROWS * sd15_row + COMPILE_S
    if "classimages" in parts:
        seconds += CLASS_IMAGES_S
    if "files" in parts:
        seconds += FILES_S
    if "fp8loss" in parts:
        seconds += FP8_LOSS_S
    return seconds


def run_part(name: str, args, work: Path) -> list[str]:
    """One part's figures (its printed lines)."""
    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if name in ("train", "fastpath"):
        import train_speed

        return train_speed.main(["--mode", "gpu", "--gpu-rows", "table" if name == "train" else "fast-path", *steps])
    if name == "families":
        import family_speed

        return family_speed.main(["--steps", str(args.family_steps), "--warmup", str(args.family_warmup)])
    if name == "classimages":
        import class_images_speed

        return class_images_speed.main(["--mode", "gpu", "--workdir", str(work)])
    if name == "fp8loss":
        import fp8_loss

        return fp8_loss.main(["--device", "cuda", "--full-size", "--workdir", str(work / "fp8loss")])
    import create_memory
    import merge_memory

    return [*create_memory.main(["--dtype", "fp16", "--workdir", str(work)]),
            *merge_memory.main(["--dtype", "fp16", "--loras", "default", "--workdir", str(work)])]


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"some of {', '.join(PARTS)} (comma-separated; default: all but files and fp8loss)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per training row")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring, per training row")
    parser.add_argument("--family-steps", type=int, default=3, help="measured steps per SD 2.x-v / SDXL row")
    parser.add_argument("--family-warmup", type=int, default=1, help="steps before measuring, per SD 2.x-v / SDXL row")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    cuda = torch.cuda.is_available()
    print(f"# gpu suite: parts {', '.join(parts)}; {args.steps} steps after {args.warmup} warm-up per training row; "
          f"{args.family_steps} after {args.family_warmup} per SD 2.x-v / SDXL row; estimated at most "
          f"{estimate_seconds(parts, args.steps, args.warmup, args.family_steps, args.family_warmup) / 60:.1f} min "
          "on one H100/H200", flush=True)
    figures, took = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        for part in parts:
            if not cuda and part != "files":
                print(f"{part}: no CUDA GPU here; skipped", flush=True)
                continue
            started = time.perf_counter()
            try:
                figures[part] = run_part(part, args, Path(tmp))
            except Exception:  # one broken part must not cost the GPU time of the others
                print(f"{part}: failed:\n{traceback.format_exc()}", flush=True)
            took[part] = time.perf_counter() - started
    if took:
        print("# took: " + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in took.items()) +
              f"; total {sum(took.values()) / 60:.1f} min", flush=True)
    return figures


if __name__ == "__main__":
    main()
