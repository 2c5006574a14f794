"""Images/s of "Generate Class Images": batches of pictures, fp16 on a GPU.

- CPU (default; any machine): the built-in tiny model at 64 px, fp32.
- GPU (`--mode gpu`): a full-size SD 1.5-architecture model with seeded random weights (full_size.py,
  created with "Create Model") at 512 px, fp16.

For each batch size (default 1 and 4) one batch is drawn first to warm up, then `--images` pictures
(default: 4 per batch size, at least one batch) with the concept defaults (20 steps, CFG 7.5); the rate
is the one `generate_class_images` measures and returns (drawing and saving; loading the model
excluded). Usage:

    python benchmarks/class_images_speed.py [--mode cpu|gpu] [--batch-sizes 1,4] [--images N] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_size import full_size_checkpoint, header  # noqa: E402


def working_model(root: Path, gpu: bool) -> tuple[object, str]:
    """The models folder and the name of the working model to draw with (built and created here)."""
    from lora_trainer.checkpoint import create_model
    from lora_trainer.host import ModelsDir
    from lora_trainer.tiny import write_tiny_checkpoint

    models = ModelsDir.at(root)
    models.checkpoints.mkdir(parents=True, exist_ok=True)
    if gpu:
        checkpoint = models.checkpoints / "full-sd1-fp16-seed0.safetensors"  # the name create/merge_memory.py give it
        if not checkpoint.exists():
            full_size_checkpoint(checkpoint, "sd1", torch.float16)
    else:
        checkpoint = write_tiny_checkpoint(models.checkpoints)
    create_model(models, checkpoint.name, "bench", overwrite=True)
    return models, "bench"


def draw(models, name: str, folder: Path, count: int, batch_size: int, device: str, steps: int | None):
    """Generate `count` class pictures into the empty `folder`; the result of generate_class_images."""
    from lora_trainer.classimages import generate_class_images
    from lora_trainer.config import Concept

    concept = Concept(class_data_dir=str(folder), class_prompt="a photo of a dog", num_class_images=count,
                      **({"class_infer_steps": steps} if steps else {}))
    return generate_class_images(models, name, [concept], batch_size=batch_size, device=device, seed=0)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--images", type=int, default=4, help="pictures measured per batch size (at least one batch)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the concept's, 20)")
    parser.add_argument("--warmup", type=int, default=1, help="batches drawn before measuring (default 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model is built (kept; default: a temporary folder)")
    args = parser.parse_args(argv)
    gpu = args.mode == "gpu"
    if gpu and not torch.cuda.is_available():
        print("class images --mode gpu: no CUDA GPU here; skipped")
        return []
    device = "cuda" if gpu else "cpu"
    print(header(f"class images, {args.mode}"), flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="class-bench-") as tmp:
        root = args.workdir or Path(tmp)
        models, name = working_model(root, gpu)
        resolution = 512 if gpu else 64
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            if args.warmup:
                draw(models, name, root / f"warm-{batch_size}", batch_size * args.warmup, batch_size, device, args.steps)
            count = max(args.images, batch_size)
            started = time.perf_counter()
            made = draw(models, name, root / f"pictures-{batch_size}", count, batch_size, device, args.steps)
            whole = time.perf_counter() - started
            line = (f"class images {'sd15' if gpu else 'tiny'} {resolution} px, batch {batch_size}, "
                    f"{'float16' if gpu else 'float32'} on {device}, {args.steps or 20} steps: {sum(made)} images in "
                    f"{made.seconds:.2f} s = {made.images_per_second:.2f} images/s (with loading the model: {whole:.1f} s)")
            print(line, flush=True)
            lines.append(line)
            shutil.rmtree(root / f"pictures-{batch_size}", ignore_errors=True)
    return lines


if __name__ == "__main__":
    main()
