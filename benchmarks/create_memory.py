"""Peak memory and time of "Create Model" on a full-size SD 1.5-shaped checkpoint.

Writes a checkpoint with the real SD 1.5 key set and shapes (random fp16
weights, about 2 GB), then runs `python -m lora_trainer create` on it in a
child process and prints the file size, the child's peak resident memory and
the wall time. Usage:

    python benchmarks/create_memory.py [--workdir DIR] [--family sd1|sd2] [--dtype fp16|fp32]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_trainer import keymap  # noqa: E402
from lora_trainer.architecture import shipped_config, spec_from_original_config  # noqa: E402
from lora_trainer.checkpoint_io import save_checkpoint  # noqa: E402

TEXT = {"sd1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
        "sd2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")}


def full_size_checkpoint(path: Path, family: str, dtype: torch.dtype) -> None:
    spec = spec_from_original_config(shipped_config(family))
    spec.text = TEXT[family]
    tensors = {}
    for build, links in ((keymap.build_unet, keymap.unet_links), (keymap.build_vae, keymap.vae_links),
                         (keymap.build_text_encoder, keymap.text_links)):
        model = build(spec)
        sd = model.state_dict()

        def make(key, sd=sd):
            shape = sd[key].shape
            if not sd[key].is_floating_point():
                return torch.arange(shape[-1]).expand(shape).clone()
            return torch.empty(shape, dtype=dtype).normal_(0, 0.02)

        tensors.update(keymap.to_original(links(spec, model), make))
    save_checkpoint(tensors, path, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--family", choices=("sd1", "sd2"), default="sd1")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="create-bench-"))
    checkpoint = work / "Stable-diffusion" / f"full-{args.family}-{args.dtype}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        full_size_checkpoint(checkpoint, args.family, torch.float16 if args.dtype == "fp16" else torch.float32)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lora_trainer", "create", "--models-dir", str(work),
                    "--source", checkpoint.name, "--name", "bench", "--overwrite"], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size_mb = checkpoint.stat().st_size / 2 ** 20
    print(f"create {args.family} {args.dtype}: checkpoint {size_mb:.0f} MB, peak RSS {peak_mb:.0f} MB "
          f"({peak_mb / size_mb:.2f}x the file), {seconds:.1f} s")


if __name__ == "__main__":
    main()
