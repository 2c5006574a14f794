"""Seconds and peak memory of "Create Model" on a full-size SD 1.5-architecture checkpoint, against a plain copy.

Writes a checkpoint with the real key set and shapes and seeded random weights (about 2 GB in fp16,
4 GB in fp32; see full_size.py), then, each in a fresh process and from the same page-cache state:
a plain copy of the file (`shutil.copyfile`), "Create Model" (`lora_trainer.checkpoint.create_model`,
what `python -m lora_trainer create` runs) twice, the first of a source never hashed (its hash is
left to the first job that needs it: lora_trainer/source_hash.py), the second with its hash known
(models/lora_trainer/checkpoint_hashes.json, filled untimed between them), the SHA-256 of the file
alone (what that first job then pays, beside its own work), and the copy again. Prints the seconds
of each (the job itself, and the whole process with its imports), the job's time as a multiple of the
copies' mean, the peak memory the job owned as a multiple of the file's size, and the issue 13 targets
(at most 2x the copy, at most 1.3x the file). Usage:

    python benchmarks/create_memory.py [--dtype fp16,fp32] [--family sd1|sd2] [--workdir DIR]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_size import (DTYPES, benchmark_arguments, copy_file, copy_seconds, forget_hashes,  # noqa: E402
                       full_size_checkpoint, measure, print_result, run_benchmark, run_phase, verdict)


def create_phase(models_dir: Path, checkpoint: str) -> dict:
    """In a child: "Create Model" of `checkpoint`, with the imports it needs done before the clock starts."""
    import diffusers  # noqa: F401  (imported lazily by the conversion; not part of its time)
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from lora_trainer.checkpoint import create_model
    from lora_trainer.host import ModelsDir

    return measure(lambda: create_model(ModelsDir.at(models_dir), checkpoint, "bench", overwrite=True))


def hash_phase(checkpoint: Path) -> dict:
    """In a child: the SHA-256 of the whole file, as the first job that needs it computes it."""
    from lora_trainer.checkpoint_io import file_sha256

    return measure(lambda: file_sha256(checkpoint))


def remember_hash(work: Path, checkpoint: Path) -> None:
    """Store the checkpoint's hash where Create Model looks it up, as an earlier job would have."""
    from lora_trainer.checkpoint_io import file_sha256
    from lora_trainer.hash_cache import file_stamp
    from lora_trainer.host import ModelsDir

    stamp = file_stamp(checkpoint)
    ModelsDir.at(work).hash_cache.put(checkpoint, file_sha256(checkpoint), stamp)


def bench(work: Path, family: str, dtype: str, seed: int) -> list[str]:
    """Build (or reuse) the checkpoint, measure copy, create, copy; return the figures' lines."""
    checkpoint = work / "Stable-diffusion" / f"full-{family}-{dtype}-seed{seed}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        full_size_checkpoint(checkpoint, family, DTYPES[dtype], seed)
    size_mb = checkpoint.stat().st_size / 2**20
    copy_args = ["--source", str(checkpoint), "--target", str(work / "copy.safetensors")]
    copies = [run_phase(__file__, "copy", copy_args, checkpoint)]
    forget_hashes(work)
    job = run_phase(__file__, "create", ["--source", str(checkpoint), "--target", str(work)], checkpoint)
    # Each create writes a new model: replacing the first (deleting 2 GB of files) is not part of the work.
    shutil.rmtree(work / "lora_trainer" / "bench", ignore_errors=True)  # where ModelsDir keeps working models
    remember_hash(work, checkpoint)
    again = run_phase(__file__, "create", ["--source", str(checkpoint), "--target", str(work)], checkpoint)
    shutil.rmtree(work / "lora_trainer" / "bench", ignore_errors=True)
    hashing = run_phase(__file__, "hash", ["--source", str(checkpoint)], checkpoint)
    copies.append(run_phase(__file__, "copy", copy_args, checkpoint))
    return [*verdict(job, copies, size_mb, f"create {family} {dtype}, source never hashed (left to the first job)"),
            *verdict(again, copies, size_mb, f"create {family} {dtype}, hash known from an earlier job"),
            f"SHA-256 of the {family} {dtype} source alone, which the first job that needs it pays beside its own work: "
            f"{hashing['seconds']:.2f} s = {hashing['seconds'] / copy_seconds(copies):.2f}x the copy"]


def main(argv: list[str] | None = None) -> list[str]:
    parser = benchmark_arguments(__doc__.splitlines()[0], ("create", "hash"))
    parser.add_argument("--family", choices=("sd1", "sd2", "tiny"), default="sd1", help="tiny: the test model")
    args = parser.parse_args(argv)
    if args.phase == "copy":
        print_result(copy_file(Path(args.source), Path(args.target)))
        return []
    if args.phase == "create":
        print_result(create_phase(Path(args.target), Path(args.source).name))
        return []
    if args.phase == "hash":
        print_result(hash_phase(Path(args.source)))
        return []
    return run_benchmark("create", args.workdir, args.dtype, lambda work, dtype: bench(work, args.family, dtype, args.seed))


if __name__ == "__main__":
    main()
