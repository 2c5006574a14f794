"""Seconds and peak memory of "Generate Ckpt" on a full-size SD 1.5-architecture checkpoint, against a plain copy.

Writes a checkpoint with the real key set and shapes and seeded random weights (about 2 GB in fp16,
4 GB in fp32; see full_size.py), creates a working model of it (with its source's hash recorded, as
the model's first training run records it) and a seeded rank-16 LoRA over every Linear of its UNet and
text encoder (untimed), then, each in a fresh process and from the same
page-cache state: a plain copy of the checkpoint (`shutil.copyfile`), the merge into the model's own
weights, the merge into the checkpoint file (`--into`) twice (the first hashing the checkpoint, the
second with its hash known: models/lora_trainer/checkpoint_hashes.json), and the copy again. Prints
the seconds of each (the merge itself, and the whole process with its imports), the merge's time as a multiple of the
copies' mean, the peak memory it owned as a multiple of the file's size, and the issue 13 targets
(at most 2x the copy, at most 1.3x the file). Usage:

    python benchmarks/merge_memory.py [--dtype fp16,fp32] [--workdir DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_size import (DTYPES, AnonPeak, benchmark_arguments, copy_file, forget_hashes,  # noqa: E402,F401
                       full_size_checkpoint, measure, memory_mb, print_result, run_benchmark, run_phase, verdict)

RANK = 16
MODEL = "full"


def seeded_lora(path: Path, models_dir: Path, seed: int) -> None:
    """A rank-16 kohya LoRA over every Linear of the working model's UNet and text encoder (seeded random)."""
    import torch
    from safetensors.torch import save_file

    from lora_trainer import keymap
    from lora_trainer.checkpoint import load_model_spec
    from lora_trainer.host import ModelsDir

    spec = load_model_spec(ModelsDir.at(models_dir).model_dir(MODEL))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for model, prefix in ((keymap.build_unet(spec), "lora_unet"), (keymap.build_text_encoder(spec), "lora_te")):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                if prefix == "lora_te" and not name.startswith("text_model."):  # transformers >= 5 drops the level
                    name = "text_model." + name
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=generator) * 0.01
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=generator) * 0.01
                tensors[f"{key}.alpha"] = torch.tensor(RANK / 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def prepare(work: Path, dtype: str, seed: int) -> tuple[Path, Path]:
    """The checkpoint, its working model and the LoRA (reused when there); the checkpoint and the model's folder."""
    from lora_trainer.checkpoint import create_model
    from lora_trainer.config import MODEL_INFO_FILE, ModelInfo
    from lora_trainer.host import ModelsDir
    from lora_trainer.source_hash import source_sha256

    models = ModelsDir.at(work)
    checkpoint = models.checkpoints / f"full-sd1-{dtype}-seed{seed}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        full_size_checkpoint(checkpoint, "sd1", DTYPES[dtype], seed)
    folder = create_model(models, checkpoint.name, MODEL, overwrite=True)
    info = ModelInfo.load(folder / MODEL_INFO_FILE)
    with source_sha256(models, info) as sha256:  # what a training run of the model records at its first save
        info.source_checkpoint_hash = sha256.result()
    info.save(folder / MODEL_INFO_FILE)
    seeded_lora(models.lora / f"{MODEL}_0.safetensors", work, seed)
    return checkpoint, folder


def merge_phase(work: Path, into: str | None) -> dict:
    """In a child: "Generate Ckpt" into the model (or into the checkpoint `into`), imports done before the clock."""
    import diffusers  # noqa: F401  (imported lazily by the merge; not part of its time)
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from lora_trainer.host import ModelsDir
    from lora_trainer.merge import merge_lora

    models = ModelsDir.at(work)
    figures = measure(lambda: merge_lora(models, MODEL, into=into, custom_name="into" if into else "own",
                                         overwrite=True))
    for merged in models.checkpoints.glob("*_lora.*"):
        merged.unlink()
    return figures


def bench(work: Path, dtype: str, seed: int) -> list[str]:
    """Copy, merge into the model, merge into the checkpoint, copy; the figures' lines."""
    checkpoint, model_dir = prepare(work, dtype, seed)
    size_mb = checkpoint.stat().st_size / 2**20
    copy_args = ["--source", str(checkpoint), "--target", str(work / "copy.safetensors")]
    copies = [run_phase(__file__, "copy", copy_args, checkpoint)]
    own = run_phase(__file__, "own", ["--target", str(work)], model_dir)
    into_args = ["--target", str(work), "--source", checkpoint.name]
    forget_hashes(work)  # the model's hash was stored when it was recorded
    into = run_phase(__file__, "into", into_args, checkpoint)
    again = run_phase(__file__, "into", into_args, checkpoint)
    copies.append(run_phase(__file__, "copy", copy_args, checkpoint))
    return [*verdict(own, copies, size_mb, f"merge sd1 {dtype} into the model"),
            *verdict(into, copies, size_mb, f"merge sd1 {dtype} into the checkpoint, checkpoint hashed"),
            *verdict(again, copies, size_mb, f"merge sd1 {dtype} into the checkpoint, hash known from the first")]


def main(argv: list[str] | None = None) -> list[str]:
    parser = benchmark_arguments(__doc__.splitlines()[0], ("own", "into"))
    args = parser.parse_args(argv)
    if args.phase == "copy":
        print_result(copy_file(Path(args.source), Path(args.target)))
        return []
    if args.phase in ("own", "into"):
        print_result(merge_phase(Path(args.target), args.source if args.phase == "into" else None))
        return []
    return run_benchmark("merge", args.workdir, args.dtype, lambda work, dtype: bench(work, dtype, args.seed))


if __name__ == "__main__":
    main()
