"""Peak memory and time per step of "Train" for a few option sets, the 8 GB preset among them.

Builds a mid-sized SD 1.x-shaped model (`build`: real CLIP-L text
encoder, a UNet of `--channels` base channels: 320 is SD 1.5's own shape) and
trains a few steps in a fresh process per option set on four drawn pictures.
On CUDA it prints the peak of torch.cuda.max_memory_allocated (what the 8 GB
question is about); on the CPU the peak memory the process owns (RssAnon)
above its baseline after loading. Seconds per step are measured after a
warm-up step. Each line also gives what the option set holds on a GPU before any
activation, counted from the model's file headers (lora_trainer/training/memory.py),
wherever it runs. Run: `python benchmarks/train_memory.py [--channels 320 --resolution 512]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_size import AnonPeak, memory_mb  # noqa: E402

OPTION_SETS = {
    "fp32, nothing saved": dict(mixed_precision="no", gradient_checkpointing=False, cache_latents=False),
    "+ gradient checkpointing": dict(mixed_precision="no", gradient_checkpointing=True, cache_latents=False),
    "+ cache latents": dict(mixed_precision="no", gradient_checkpointing=True, cache_latents=True),
    "8 GB preset": "8 GB GPU",
    "8 GB preset, no text encoder": "Low memory (6 GB, no text encoder)",
}


def build(root: Path, channels: int) -> None:
    import torch
    import yaml
    from safetensors.torch import save_file

    from lora_trainer import keymap
    from lora_trainer.architecture import spec_from_original_config
    from lora_trainer.checkpoint import create_model
    from lora_trainer.checkpoint_io import save_checkpoint
    from lora_trainer.host import ModelsDir
    from lora_trainer.tiny import tiny_original_config

    config = yaml.safe_load(tiny_original_config())
    unet = config["model"]["params"]["unet_config"]["params"]
    unet.update(model_channels=channels, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
                num_heads=8, context_dim=768)
    text = yaml.safe_dump(config, sort_keys=False)
    spec = spec_from_original_config(text)
    spec.text = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
    models = ModelsDir.at(root)
    models.checkpoints.mkdir(parents=True)
    tensors, lora = {}, {}
    for build_part, links, prefix in ((keymap.build_unet, keymap.unet_links, "lora_unet"), (keymap.build_vae, keymap.vae_links, None),
                                      (keymap.build_text_encoder, keymap.text_links, "lora_te")):
        model = build_part(spec, device="cpu")
        weights = {k: (torch.randn(v.shape) * 0.02 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        tensors.update(keymap.to_original(links(spec, model), weights.__getitem__))
        for name, module in model.named_modules() if prefix else ():
            if isinstance(module, torch.nn.Linear):
                key = f"{prefix}_{('text_model.' + name if prefix == 'lora_te' and not name.startswith('text_model.') else name).replace('.', '_')}"
                lora[f"{key}.lora_down.weight"] = torch.randn(16, module.in_features) * 0.01
                lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 16) * 0.01
                lora[f"{key}.alpha"] = torch.tensor(8.0)
    (models.checkpoints / "mid.yaml").write_text(text)
    save_checkpoint(tensors, models.checkpoints / "mid.safetensors")
    models.lora.mkdir()
    save_file(lora, str(models.lora / "mid_0.safetensors"))
    create_model(models, "mid.safetensors", "mid")


def run_one(root: Path, name: str, steps: int, resolution: int) -> None:
    import torch

    from lora_trainer.cli.demo import draw_pictures
    from lora_trainer.config import Concept, TrainingParams
    from lora_trainer.host import ModelsDir
    from lora_trainer.train import train
    from lora_trainer.presets import apply_preset
    from lora_trainer.training.memory import least_memory
    from lora_trainer.training.parts import part_dtypes

    cuda = torch.cuda.is_available()
    models = ModelsDir.at(root)
    model = f"mid-{list(OPTION_SETS).index(name)}"  # a fresh copy per option set: no run continues another
    shutil.copytree(models.model_dir("mid"), models.model_dir(model))
    options = OPTION_SETS[name]
    params = apply_preset(TrainingParams(), options, cuda=cuda) if isinstance(options, str) \
        else TrainingParams.from_dict(options)
    # The same pictures, size and length for every option set (presets name a resolution of their own).
    params = dataclasses.replace(params, resolution=resolution, max_train_steps=steps, seed=0, save_every_n_steps=0,
                                 save_preview_every_n_steps=0)
    if params.use_8bit_adam and not _has("bitsandbytes"):
        params.use_8bit_adam = False
    pictures = draw_pictures(root / "pictures", size=resolution)
    concept = Concept(instance_data_dir=str(pictures), instance_prompt="scs shape, [filewords]")
    times = []

    def report(progress):
        if progress.job == "train" and progress.loss is not None:
            times.append(time.perf_counter())

    baseline = memory_mb("RssAnon")
    sampler = AnonPeak()
    result = train(models, model, params, [concept], report=report)
    peak = sampler.stop()
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    memory = (f"CUDA peak {torch.cuda.max_memory_allocated() / 2**20:7.0f} MB" if cuda
              else f"owned memory peak {peak - baseline:7.0f} MB above baseline")
    # What the run holds on a GPU before activations, counted from the headers (training/memory.py).
    gpu_params = apply_preset(TrainingParams(), options, cuda=True) if isinstance(options, str) else params
    least = least_memory(models.model_dir(model), gpu_params, part_dtypes(gpu_params, torch.device("cuda")))
    print(f"{name:30s} {per_step:6.2f} s/step  {memory}  GPU least {least.total / 2**20:6.0f} MB  "
          f"final loss {result.losses[-1]:.4f}", flush=True)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64, help="UNet base channels (SD 1.x has 320)")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution (SD 1.x: 512)")
    parser.add_argument("--steps", type=int, default=3, help="steps per option set (the first is a warm-up)")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        logging.basicConfig(level=logging.WARNING)
        run_one(Path(args.root), args.only, args.steps, args.resolution)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.channels)
        print(f"UNet channels {args.channels}, resolution {args.resolution}, {args.steps} steps, batch 1, LoRA rank 4")
        for name in OPTION_SETS:
            subprocess.run([sys.executable, __file__, "--only", name, "--root", tmp, "--steps", str(args.steps),
                            "--resolution", str(args.resolution)], check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
