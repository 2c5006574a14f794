"""Seconds and peak memory of "Generate Ckpt" on a full-size SD 1.5-architecture checkpoint, against a plain copy.

Writes a checkpoint with the real key set and shapes and seeded random weights (about 2 GB in fp16,
4 GB in fp32; see full_size.py), creates a working model of it (with its source's hash recorded, as
the model's first training run records it) and two seeded LoRAs (untimed): rank 16 over every Linear of
its UNet and text encoder (heavier than any Train writes), and rank 4 over their attention projections
(what Train writes by default). Then, each in a fresh process and from the same page-cache state: a
plain copy of the checkpoint (`shutil.copyfile`); the heavy LoRA merged into the model's own weights and
into the checkpoint file (`--into`) twice (the first hashing the checkpoint, the second with its hash
known: models/lora_trainer/checkpoint_hashes.json); the default LoRA merged into the model and into the
checkpoint; and the copy again. Prints the seconds of each (the merge itself, and the whole process with
its imports), the merge's time as a multiple of the copies' mean, the peak memory it owned as a multiple
of the file's size, and the issue 13 targets
(at most 2x the copy, at most 1.3x the file). Usage:

    python benchmarks/merge_memory.py [--dtype fp16,fp32] [--loras heavy,default] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_size import (DTYPES, AnonPeak, benchmark_arguments, copy_file, forget_hashes,  # noqa: E402,F401
                       full_size_checkpoint, measure, memory_mb, print_result, run_benchmark, run_phase, verdict)

MODEL = "full"
# The LoRAs merged, by name: (file name in the Lora folder, rank, adapted modules or None for every Linear,
# what the figures' lines call it).
LORAS = {"heavy": ("full_0", 16, None, "rank 16 on every Linear"),  # heavier than any the trainer writes
         "default": ("full_attention", 4, "attention", "rank 4 on attention (Train's default)")}


def seeded_lora(path: Path, models_dir: Path, seed: int, rank: int, targets: str | None) -> None:
    """A kohya LoRA of `rank` over every Linear of the working model's UNet and text encoder (`targets` None)
    or over their attention projections, as Train adapts them ("attention"), seeded random."""
    import torch
    from safetensors.torch import save_file

    from lora_trainer import keymap
    from lora_trainer.checkpoint import load_model_spec
    from lora_trainer.host import ModelsDir
    from lora_trainer.lora import TEXT_TARGETS, UNET_TARGETS, is_target

    spec = load_model_spec(ModelsDir.at(models_dir).model_dir(MODEL))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for model, prefix, adapted in ((keymap.build_unet(spec), "lora_unet", UNET_TARGETS),
                                   (keymap.build_text_encoder(spec), "lora_te", TEXT_TARGETS)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (targets is None or is_target(name, adapted)):
                if prefix == "lora_te" and not name.startswith("text_model."):  # transformers >= 5 drops the level
                    name = "text_model." + name
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
                tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def prepare(work: Path, dtype: str, seed: int, family: str = "sd1") -> tuple[Path, Path]:
    """The checkpoint, its working model and the LoRAs (reused when there); the checkpoint and the model's folder."""
    from lora_trainer.checkpoint import create_model
    from lora_trainer.config import MODEL_INFO_FILE, ModelInfo
    from lora_trainer.host import ModelsDir
    from lora_trainer.source_hash import source_sha256

    models = ModelsDir.at(work)
    checkpoint = models.checkpoints / f"full-{family}-{dtype}-seed{seed}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if not checkpoint.exists():
        full_size_checkpoint(checkpoint, family, DTYPES[dtype], seed)
    folder = create_model(models, checkpoint.name, MODEL, overwrite=True)
    info = ModelInfo.load(folder / MODEL_INFO_FILE)
    with source_sha256(models, info) as sha256:  # what a training run of the model records at its first save
        info.source_checkpoint_hash = sha256.result()
    info.save(folder / MODEL_INFO_FILE)
    for name, rank, targets, _ in LORAS.values():
        seeded_lora(models.lora / f"{name}.safetensors", work, seed, rank, targets)
    return checkpoint, folder


def merge_phase(work: Path, into: str | None, lora: str) -> dict:
    """In a child: "Generate Ckpt" of `lora` into the model (or into the checkpoint `into`), imports done before
    the clock."""
    import diffusers  # noqa: F401  (imported lazily by the merge; not part of its time)
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from lora_trainer.host import ModelsDir
    from lora_trainer.merge import merge_lora

    models = ModelsDir.at(work)
    figures = measure(lambda: merge_lora(models, MODEL, lora=lora, into=into, custom_name="into" if into else "own",
                                         overwrite=True))
    for merged in models.checkpoints.glob("*_lora.*"):
        merged.unlink()
    return figures


def bench(work: Path, dtype: str, seed: int, loras: list[str]) -> list[str]:
    """Copy; each of `loras` merged into the model and into the checkpoint (the first LoRA into it twice: hashing
    the checkpoint, then with its hash known); copy. The figures' lines."""
    checkpoint, model_dir = prepare(work, dtype, seed)
    size_mb = checkpoint.stat().st_size / 2**20
    copy_args = ["--source", str(checkpoint), "--target", str(work / "copy.safetensors")]
    copies = [run_phase(__file__, "copy", copy_args, checkpoint)]

    def merge(lora: str, into: bool) -> dict:
        return run_phase(__file__, "into" if into else "own",
                         ["--target", str(work), "--lora", LORAS[lora][0],
                          *(["--source", checkpoint.name] if into else [])], checkpoint if into else model_dir)

    jobs = []  # (figures, what the line calls the job)
    for i, lora in enumerate(loras):
        named = f"merge sd1 {dtype} into the %s, {LORAS[lora][3]}"
        jobs.append((merge(lora, into=False), named % "model"))
        if i == 0:
            forget_hashes(work)  # the model's hash was stored when it was recorded
            jobs.append((merge(lora, into=True), named % "checkpoint" + ", checkpoint hashed"))
        jobs.append((merge(lora, into=True), named % "checkpoint" + ", hash known"))
    copies.append(run_phase(__file__, "copy", copy_args, checkpoint))
    return [line for figures, name in jobs for line in verdict(figures, copies, size_mb, name)]


def main(argv: list[str] | None = None) -> list[str]:
    parser = benchmark_arguments(__doc__.splitlines()[0], ("own", "into"))
    parser.add_argument("--loras", default="heavy,default",
                        help="which LoRAs to merge, comma-separated: heavy (rank 16 on every Linear), default "
                             "(rank 4 on attention, as Train writes); default: both")
    parser.add_argument("--lora", default=LORAS["heavy"][0], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    loras = [name.strip() for name in args.loras.split(",") if name.strip()]
    if not loras or any(name not in LORAS for name in loras):
        parser.error(f"--loras: {args.loras!r}; choose from {', '.join(LORAS)}")
    if args.phase == "copy":
        print_result(copy_file(Path(args.source), Path(args.target)))
        return []
    if args.phase in ("own", "into"):
        print_result(merge_phase(Path(args.target), args.source if args.phase == "into" else None, args.lora))
        return []
    return run_benchmark("merge", args.workdir, args.dtype, lambda work, dtype: bench(work, dtype, args.seed, loras))


if __name__ == "__main__":
    main()
