"""Training step of the other families: SD 2.x-v at 768 px (v-prediction) and SDXL at 1024 px, floor and ours.

The SD 1.5 table of train_speed.py holds one text encoder and SD 1.5's conditioning; these rows
build the family's own parts from its shipped config (SDXL: both text encoders, the size/crop
`time_ids`, the pooled embedding) with seeded random weights, and condition through the family
(`lora_trainer.families`), as the trainer does:

- floor: the frozen UNet and text encoders, gradients to the noisy latents and token embeddings only;
- ours: this trainer's step (`optimizer_micro_step` through accelerate) with the row's options;
- ours with the "8 GB GPU (SDXL)" preset (rank 16, 8-bit AdamW, text encoders frozen and their outputs
  cached by the trainer's TextCache, then moved off the GPU, as a run does): issue 12's 7.0 GiB target,
  run with the allocator held to 8 GiB (an 8 GB card).

Each step holds 1 instance + 1 class picture, latents cached, fp16 with gradient checkpointing,
rank 4 (but the preset row); peak is torch.cuda.max_memory_reserved over the steps, and each of our
rows is printed at the end beside the peak it is predicted to reserve (training/peak.py, worked out
on the CPU while the GPU measures). `--tiny` runs the same code on the families' tiny test models on
the CPU (what tests/test_benchmarks.py does), so it is known to work before a GPU is lent. Usage:

    python benchmarks/family_speed.py [--families sd2v,sdxl] [--steps 5 --warmup 2] [--tiny]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import (PredictedPeaks, Row, finish, forget_setup_peak, free_memory, header,  # noqa: E402
                         materialise, measure_rows, our_step_of, prediction_jobs, row_params, time_steps)

from lora_trainer.training.peak import STANDARD_TEXT, PartConfigs  # noqa: E402

# model type, native resolution; SDXL's second encoder is OpenCLIP ViT-bigG with its projection.
FAMILIES = {"sd2v": ("sd2-v", 768), "sdxl": ("sdxl", 1024)}
BIG_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
         "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
OPTIONS = dict(mixed_precision="fp16", gradient_checkpointing=True, rank=4)
PRESETS = {"sdxl": "8 GB GPU (SDXL)"}  # a family's own preset, measured beside its floor


def family_rows(families: list[str], tiny: bool) -> list[Row]:
    options = dict(OPTIONS, mixed_precision="no", gradient_checkpointing=False) if tiny else OPTIONS
    rows = []
    for family in families:
        name = f"{family}{' tiny' if tiny else ''}"
        rows += [Row(f"{runner} {name}", runner, options, family) for runner in ("floor", "ours")]
        if family in PRESETS:
            rows.append(Row(f"ours {name}, {PRESETS[family]} preset", "ours", {"preset": PRESETS[family]}, family,
                            cap_gib=8))
    return rows


def family_spec(family: str, tiny: bool):
    """The family's spec (diffusers configs) with its text encoders' configs, and the picture size."""
    from lora_trainer.architecture import shipped_config, spec_from_original_config

    model_type, resolution = FAMILIES[family]
    if tiny:
        from lora_trainer.tiny import tiny_original_config, tiny_text_config
        from lora_trainer.tiny_sdxl import tiny_xl_spec

        if family == "sdxl":
            return tiny_xl_spec(), 64
        spec = spec_from_original_config(tiny_original_config(v2=True))
        spec.text = tiny_text_config(v2=True)
        return spec, 64
    spec = spec_from_original_config(shipped_config(model_type))
    if family == "sdxl":
        spec.text, spec.text_2 = STANDARD_TEXT["clip"], BIG_G
    else:
        spec.text = STANDARD_TEXT["openclip"]
    return spec, resolution


def family_configs(family: str, tiny: bool = False) -> tuple[PartConfigs, int]:
    """The family's PartConfigs (what the peak prediction builds) and its picture size."""
    spec, resolution = family_spec(family, tiny)
    return PartConfigs(spec.unet, spec.text, spec.vae, spec.text_2 or None, spec.model_type), resolution


def build_model(spec, params, device: torch.device):
    """A WorkingModel of the spec: UNet and text encoders with seeded random weights, frozen, in the
    dtypes a run of `params` gives them (the VAE is not needed: latents are cached)."""
    from diffusers import DDPMScheduler

    from lora_trainer import keymap
    from lora_trainer.config import ModelInfo
    from lora_trainer.training.parts import WorkingModel, part_dtypes

    dtypes = part_dtypes(params, device, spec.family)
    generator = torch.Generator(device).manual_seed(0)
    unet = materialise(keymap.build_unet(spec), device, generator, dtypes["unet"])
    encoders = [materialise(keymap.build_text_encoder(spec, part=te.part), device, generator, dtypes[te.part])
                for te in spec.family.text_encoders]
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=spec.vae.get("scaling_factor", 0.18215)))
    info = ModelInfo(model_type=spec.model_type, prediction_type=spec.prediction_type, resolution=spec.resolution)
    return WorkingModel(unet, vae, encoders[0], None, DDPMScheduler.from_config(spec.scheduler), info, Path("."),
                        text_encoder_2=encoders[1] if len(encoders) > 1 else None)


def family_batch(spec, rows: int, latent: int) -> dict:
    """A cached-latents batch of the family: instance rows then class rows, with SDXL's second ids and time ids."""
    channels = spec.unet["in_channels"]
    data = {"latent_dist": torch.cat([torch.randn(rows, channels, latent, latent),
                                      torch.rand(rows, channels, latent, latent) * 0.1], dim=1),
            "input_ids": torch.randint(0, 49000, (rows, 77)),
            "is_class": torch.tensor([False] * (rows // 2) + [True] * (rows - rows // 2))}
    if spec.family.time_ids:
        size = spec.resolution
        data["input_ids_2"] = torch.randint(0, 49000, (rows, 77))
        data["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * rows, dtype=torch.float32)
    return data


def floor_step(model, params, device, autocast):
    """Frozen UNet and text encoders, gradients to the noisy latents and the token embeddings only."""
    from lora_trainer.training.parts import enable_checkpointing

    hooks = [te.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
             for te in model.text_encoders]
    if params.gradient_checkpointing:
        enable_checkpointing(model, text_encoder=True)
    model.unet.train()
    family = model.info.family

    def step(data):
        latents = data["latent_dist"].to(device).chunk(2, dim=1)[0]
        noisy = latents.requires_grad_(True)
        with autocast():
            hidden, added = family.condition(model.text_encoders, data, device)
            extra = {"added_cond_kwargs": added} if added is not None else {}
            prediction = model.unet(noisy, torch.randint(0, 1000, (noisy.shape[0],), device=device), hidden,
                                    return_dict=False, **extra)[0]
            loss = torch.nn.functional.mse_loss(prediction.float(), latents.float())
        loss.backward()
        return loss.detach()
    return step, hooks


def cache_text(model, data: dict, device: torch.device):
    """"Cache Text Encoder Outputs" as a run does it: the batch's prompts encoded once by the trainer's
    TextCache, then the text encoders off the GPU. Gives `data` its prompts; returns the cache."""
    from lora_trainer.training.loop import TextCache
    from lora_trainer.training.parts import free_device_memory

    data["prompts"] = [f"prompt {i}" for i in range(len(data["input_ids"]))]
    ids = {prompt: {key: data[key][i] for key in ("input_ids", "input_ids_2") if key in data}
           for i, prompt in enumerate(data["prompts"])}
    cache = TextCache()
    cache.fill(model.info.family, model.text_encoders, SimpleNamespace(conditioning_of_prompt=ids.__getitem__),
               data["prompts"], device)
    for encoder in model.text_encoders:
        encoder.to("cpu")
    free_device_memory(device)
    return cache


def run_family_row(row: Row, device: torch.device, steps: int, warmup: int, tiny: bool) -> dict:
    spec, resolution = family_spec(row.size, tiny)
    cuda = device.type == "cuda"
    params = dataclasses.replace(row_params(row, resolution, cuda), resolution=resolution)
    prior_rows = 2 * params.train_batch_size
    free_memory(device)
    model = build_model(spec, params, device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(params.mixed_precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    factor = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    data = family_batch(spec, prior_rows, resolution // factor)
    if row.runner == "floor":
        step, hooks = floor_step(model, params, device, autocast)
    else:
        text_cache = cache_text(model, data, device) if params.cache_text_encoder_outputs else None
        step, hooks = our_step_of(model, params, device, text_cache)
    forget_setup_peak(device)
    seconds, loss = time_steps(step, data, device, steps, warmup)
    peak = torch.cuda.max_memory_reserved(device) if cuda else 0
    for hook in hooks:
        hook.remove()
    del model, step
    return {"row": row, "params": params, "seconds": seconds, "samples": prior_rows / seconds, "peak": peak,
            "predicted": None, "loss": loss}


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd2v,sdxl", help="sd2v, sdxl (comma-separated)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny test models on the CPU (a check of this script)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("family rows (SD 2.x-v 768, SDXL 1024): no CUDA GPU here; skipped (--tiny runs them on tiny models)")
        return []
    device = torch.device("cpu" if args.tiny else "cuda")
    print(header(device, args), flush=True)
    rows = family_rows(args.families.split(","), args.tiny)
    predictions = PredictedPeaks({} if args.tiny else prediction_jobs(rows, family_configs))
    results = measure_rows(rows, lambda row, index: run_family_row(row, device, args.steps, args.warmup, args.tiny),
                           1, device)
    return finish(results, predictions)


if __name__ == "__main__":
    main()
