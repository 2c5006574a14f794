"""Step time, samples/s and peak memory of training: the floor, a plain peft recipe and this trainer, side by side.

At the same shapes and in the same process, three ways of taking a DreamBooth LoRA step:

- floor: the frozen UNet and text encoder, gradients to their inputs only (what any LoRA step costs at least);
- recipe: peft LoRA on UNet and text-encoder attention in the style of diffusers' train_dreambooth_lora.py
  (fp32 LoRA on half-precision weights, autocast, a gradient scaler on CUDA, torch AdamW, clipping);
- ours: this trainer's own step (lora_trainer.training.loop.optimizer_micro_step through accelerate) with the
  options of the row, and on CUDA the peak it predicts (lora_trainer/training/peak.py), worked out on the CPU
  in worker processes while the GPU measures, and printed beside the measured peak at the end.

Each step holds 1 instance + 1 class picture per batch entry (prior preservation), latents are
cached (random, drawn from a cached distribution as the trainer does), weights are random
(seeded). Figures are ratios to the floor measured in the same run.

    python benchmarks/train_speed.py                  # CPU: the tiny model and a mid-size SD 1.x-shaped one
    python benchmarks/train_speed.py --mode gpu       # CUDA: issue 13's table rows on SD 1.5 at 512
    python benchmarks/train_speed.py --mode gpu --gpu-rows fast-path   # the fast path beside the recipe

On the CPU, peak memory is what the process owns (RssAnon) above its level before the row's
model was built; on CUDA it is torch.cuda.max_memory_reserved over the row's steps (the weights, made
in their own dtype, and what the steps add; the setup's passing peaks, such as half-precision weights
before they are stored in float8, are forgotten: a run of the trainer never holds them on the GPU).
The "8 GB GPU" and "4 GB card" preset rows run with the allocator held to 8 and 4 GiB
(torch.cuda.set_per_process_memory_fraction): they must complete on the card they are for.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_memory import AnonPeak, memory_mb  # noqa: E402

from lora_trainer.config import TrainingParams  # noqa: E402
from lora_trainer.training.peak import STANDARD_TEXT, PartConfigs  # noqa: E402

MID_UNET = dict(model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
                num_heads=8, context_dim=768)


def size_configs(size: str) -> tuple[PartConfigs, int]:
    """The model configs and picture size of `size` (tiny, mid, sd15)."""
    import yaml

    from lora_trainer.architecture import spec_from_original_config
    from lora_trainer.tiny import tiny_original_config, tiny_text_config

    if size == "sd15":
        return PartConfigs.standard("sd1"), 512
    config = yaml.safe_load(tiny_original_config())
    if size == "tiny":
        spec = spec_from_original_config(yaml.safe_dump(config))
        return PartConfigs(spec.unet, tiny_text_config(), spec.vae), 64
    config["model"]["params"]["unet_config"]["params"].update(MID_UNET)
    spec = spec_from_original_config(yaml.safe_dump(config))
    return PartConfigs(spec.unet, STANDARD_TEXT["clip"], spec.vae), 128


@dataclasses.dataclass
class Row:
    name: str
    runner: str                 # floor | recipe | ours
    options: dict               # TrainingParams fields
    size: str = "sd15"
    cap_gib: float | None = None  # a preset's card: on CUDA the row must complete with the allocator held to it


GPU_ROWS = ("all", "table", "fast-path")


def gpu_rows(which: str = "all") -> list[Row]:
    """Issue 13's table, each with this trainer beside it, plus the presets and bf16 ("table"); the fast path
    beside the recipe and our eager step ("fast-path": it compiles for minutes, so the suite runs it apart);
    or both ("all")."""
    ckpt = dict(mixed_precision="fp16", gradient_checkpointing=True)
    rows = [Row("floor, checkpointing", "floor", ckpt),
            Row("recipe r4, checkpointing", "recipe", dict(ckpt, rank=4)),
            Row("ours r4, checkpointing", "ours", dict(ckpt, rank=4)),
            Row("recipe r32, checkpointing", "recipe", dict(ckpt, rank=32, text_encoder_rank=32)),
            Row("ours r32, checkpointing", "ours", dict(ckpt, rank=32, text_encoder_rank=32)),
            Row("recipe r4, text encoder frozen", "recipe", dict(ckpt, rank=4, train_text_encoder=False)),
            Row("ours r4, text encoder frozen", "ours", dict(ckpt, rank=4, train_text_encoder=False)),
            Row("floor, no checkpointing", "floor", dict(mixed_precision="fp16")),
            Row("recipe r4, no checkpointing", "recipe", dict(mixed_precision="fp16", rank=4)),
            Row("ours r4, no checkpointing", "ours", dict(mixed_precision="fp16", rank=4)),
            Row("recipe r4, batch 4", "recipe", dict(ckpt, rank=4, train_batch_size=4)),
            Row("ours r4, batch 4", "ours", dict(ckpt, rank=4, train_batch_size=4)),
            Row("ours r4, bf16", "ours", dict(mixed_precision="bf16", gradient_checkpointing=True, rank=4)),
            Row("ours 8 GB GPU preset", "ours", {"preset": "8 GB GPU"}, cap_gib=8),
            Row("ours 4 GB card preset", "ours", {"preset": "4 GB card"}, cap_gib=4)]
    fast = [rows[1], rows[2], Row("ours r4, checkpointing, fast path", "ours", dict(ckpt, rank=4, compile_unet=True))]
    return {"table": rows, "fast-path": fast, "all": rows + fast[2:]}[which]


def cpu_rows(sizes: list[str], fast_path: bool = False) -> list[Row]:
    # fp32: CPUs without bf16 instructions emulate bf16 convolutions, many times slower than fp32.
    options = dict(mixed_precision="no", gradient_checkpointing=False, rank=4)
    rows = []
    for size in sizes:
        rows += [Row(f"{runner} {size}", runner, options, size) for runner in ("floor", "recipe", "ours")]
        if fast_path:  # torch.compile takes minutes at first: only when asked for
            rows.append(Row(f"ours {size}, fast path", "ours", dict(options, compile_unet=True), size))
    return rows


def row_params(row: Row, resolution: int, cuda: bool) -> TrainingParams:
    from lora_trainer.presets import apply_preset

    options = dict(row.options)
    base = TrainingParams(attention="flash_attention", cache_latents=True, resolution=resolution, seed=0,
                          lora_alpha=float(options.get("rank", 4)),
                          text_encoder_alpha=float(options.get("text_encoder_rank", 4)))
    if "preset" in options:
        params = dataclasses.replace(apply_preset(base, options.pop("preset"), cuda=cuda), resolution=resolution)
    else:
        params = dataclasses.replace(base, **options)
    if params.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:  # the settings column says so
        params = dataclasses.replace(params, use_8bit_adam=False)
    return params


def build_parts(configs: PartConfigs, params: TrainingParams, device: torch.device):
    """UNet and text encoder with seeded random weights, frozen, in the dtypes a run of `params` gives them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.training.parts import part_dtypes

    dtypes = part_dtypes(params, device)
    generator = torch.Generator(device).manual_seed(0)
    parts = {}
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel.from_config(_public(configs.unet))
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**_public(configs.text_encoder)))
    for name, part in parts.items():
        materialise(part, device, generator, dtypes[name])
    return parts["unet"], parts["text_encoder"]


def materialise(part: torch.nn.Module, device: torch.device, generator: torch.Generator,
                dtype: torch.dtype) -> torch.nn.Module:
    """Give a meta-device module seeded random weights on `device` in `dtype` (made in it: never in fp32
    first, which would leave its blocks reserved on a GPU), frozen."""
    part.to(dtype)
    part.to_empty(device=device)
    with torch.no_grad():
        for key, tensor in [*part.named_parameters(), *part.named_buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(1.0 if "norm" in key and key.endswith("weight") else 0.0, 0.02, generator=generator)
            else:  # position ids
                tensor.copy_(torch.arange(tensor.shape[-1], device=device).expand(tensor.shape))
    return part.requires_grad_(False)


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def batch(rows: int, channels: int, latent: int, device: torch.device) -> dict:
    """A cached-latents batch: instance rows then class rows (the trainer's collate order)."""
    return {"latent_dist": torch.cat([torch.randn(rows, channels, latent, latent),
                                      torch.rand(rows, channels, latent, latent) * 0.1], dim=1),
            "input_ids": torch.randint(0, 49000, (rows, 77)),
            "is_class": torch.tensor([False] * (rows // 2) + [True] * (rows - rows // 2))}


def floor_step(unet, text_encoder, params: TrainingParams, device, autocast):
    """Frozen UNet and text encoder, gradients to the noisy latents and the token embeddings only."""
    hook = text_encoder.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    unet.train()

    def step(data):
        latents = data["latent_dist"].to(device).chunk(2, dim=1)[0]
        noisy = latents.requires_grad_(True)
        with autocast():
            hidden = text_encoder(data["input_ids"].to(device))[0]
            prediction = unet(noisy, torch.randint(0, 1000, (noisy.shape[0],), device=device), hidden,
                              return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(prediction.float(), latents.float())
        loss.backward()
        return loss.detach()
    return step, [hook]


def recipe_step(unet, text_encoder, params: TrainingParams, device, autocast):
    """diffusers train_dreambooth_lora.py's step: peft LoRA (fp32) on attention, autocast, scaler, AdamW, clipping."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=params.rank, lora_alpha=params.rank, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]), unet)
    trained = [p for n, p in unet.named_parameters() if "lora_" in n]
    if params.train_text_encoder:
        inject_adapter_in_model(LoraConfig(r=params.text_encoder_rank, lora_alpha=params.text_encoder_rank,
                                           init_lora_weights="gaussian",
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder)
        trained += [p for n, p in text_encoder.named_parameters() if "lora_" in n]
    for p in trained:
        p.data = p.data.float()
        p.requires_grad_(True)
    if params.gradient_checkpointing:
        from lora_trainer.training.parts import enable_checkpointing

        enable_checkpointing(SimpleNamespace(unet=unet, text_encoders=[text_encoder]),
                             text_encoder=params.train_text_encoder)
    unet.train()
    text_encoder.train(params.train_text_encoder)
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and params.mixed_precision == "fp16")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def step(data):
        mean, std = data["latent_dist"].to(device).chunk(2, dim=1)
        latents = (mean + std * torch.randn_like(mean)) * 0.18215
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            with torch.set_grad_enabled(params.train_text_encoder):
                hidden = text_encoder(data["input_ids"].to(device))[0]
            prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
            instance, prior = prediction.float().chunk(2)
            target, prior_target = noise.float().chunk(2)
            loss = torch.nn.functional.mse_loss(instance, target) + torch.nn.functional.mse_loss(prior, prior_target)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step, []


def ours_step(unet, text_encoder, params: TrainingParams, device, autocast):
    """This trainer's step: its adapters, options and `optimizer_micro_step` through accelerate."""
    from diffusers import DDPMScheduler

    from lora_trainer.config import ModelInfo
    from lora_trainer.training.parts import WorkingModel

    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return our_step_of(WorkingModel(unet, vae, text_encoder, None, scheduler, ModelInfo(), Path(".")), params, device)


def our_step_of(model, params: TrainingParams, device, text_cache=None):
    """This trainer's step on a WorkingModel (any family: every text encoder it has), and no hooks to remove;
    `text_cache`: the prompts' encodings when "Cache Text Encoder Outputs" is on. The step's `loop` attribute
    is its training.loop.Loop."""
    from lora_trainer.compat import new_accelerator
    from lora_trainer.training.adapters import attach_lora, trainable_groups
    from lora_trainer.training.loop import Loop, optimizer_micro_step
    from lora_trainer.training.optim import make_lr_scheduler, make_optimizer
    from lora_trainer.training.parts import enable_checkpointing, part_dtypes, set_attention, store_base_in_fp8

    if params.base_weights == "fp8":
        store_base_in_fp8(model, part_dtypes(params, device, model.info.family), device)
    set_attention(model.unet, params.attention)
    if params.gradient_checkpointing:
        enable_checkpointing(model, text_encoder=params.train_text_encoder)
    adapters = attach_lora(model, params)
    groups = trainable_groups(model, adapters, params)
    optimizer = make_optimizer(groups, params)
    accelerator = new_accelerator(mixed_precision=params.mixed_precision, gradient_accumulation_steps=1,
                                  cpu=device.type != "cuda")
    lr_scheduler = make_lr_scheduler(optimizer, params, 1000)
    encoders = model.text_encoders
    if params.train_text_encoder:
        unet_p, *encoders, optimizer, lr_scheduler = accelerator.prepare(model.unet, *encoders, optimizer, lr_scheduler)
    else:
        unet_p, optimizer, lr_scheduler = accelerator.prepare(model.unet, optimizer, lr_scheduler)
    unet_p.train()
    for encoder in encoders:
        encoder.train(params.train_text_encoder)
    loop = Loop(accelerator, model, unet_p, encoders[0], params.train_text_encoder,
                [p for g in groups for p in g["params"]], optimizer, lr_scheduler, None, None, None, params, 1000, 0,
                text_encoder_2=encoders[1] if len(encoders) > 1 else None, text_cache=text_cache)
    if params.compile_unet:  # the fast path, as train.build_run sets it up (one shape: CUDA graphs on a GPU)
        from lora_trainer.training.fastpath import CompiledUNet

        loop.compiled_unet = CompiledUNet(unet_p, device, static_shapes=True)

    def step(data):
        return optimizer_micro_step(loop, data)
    step.loop = loop
    return step, []


RUNNERS = {"floor": floor_step, "recipe": recipe_step, "ours": ours_step}


def run_row(row: Row, device: torch.device, steps: int, warmup: int) -> dict:
    configs, resolution = size_configs(row.size)
    cuda = device.type == "cuda"
    params = row_params(row, resolution, cuda)
    refuse_what_cannot_compile(params, device)
    prior_rows = 2 * params.train_batch_size
    free_memory(device)
    baseline = 0.0 if cuda else memory_mb("RssAnon")
    sampler = None if cuda else AnonPeak()
    unet, text_encoder = build_parts(configs, params, device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(params.mixed_precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    step, hooks = RUNNERS[row.runner](unet, text_encoder, params, device, autocast)
    factor = 2 ** (len(configs.vae["block_out_channels"]) - 1)
    data = batch(prior_rows, configs.unet["in_channels"], resolution // factor, device)
    forget_setup_peak(device)
    seconds, loss = time_steps(step, data, device, steps, warmup)
    peak = torch.cuda.max_memory_reserved(device) if cuda else (sampler.stop() - baseline) * 2**20
    for hook in hooks:
        hook.remove()
    note = compiled_note(step)
    del unet, text_encoder, step
    return {"row": row, "params": params, "seconds": seconds, "samples": prior_rows / seconds, "peak": peak,
            "predicted": None, "loss": loss, "note": note}


def refuse_what_cannot_compile(params: TrainingParams, device: torch.device) -> None:
    """A fast-path row where torch.compile cannot run fails at once with the reason, not after a failed compile."""
    if params.compile_unet:
        from lora_trainer.training.fastpath import compile_problem

        problem = compile_problem(device)
        if problem:
            raise RuntimeError(f"Compile UNet: {problem}")


def free_memory(device: torch.device) -> None:
    """What earlier rows left: Python's garbage collected, the GPU's cached blocks given back."""
    from lora_trainer.training.parts import free_device_memory

    gc.collect()
    free_device_memory(device)


def forget_setup_peak(device: torch.device) -> None:
    """From here on the GPU's peak is the steps' (the weights and what each step adds), not the setup's."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compiled_note(step) -> str:
    """For a fast-path step: whether it ran compiled, or fell back to the eager UNet (its figures are then
    eager ones). Drops the compiled graphs (CUDA graphs hold a memory pool of their own) for the next row."""
    loop = getattr(step, "loop", None)
    if loop is None or loop.compiled_unet is None:
        return ""
    torch._dynamo.reset()
    return "" if loop.compiled_unet.active else "FELL BACK TO EAGER (torch.compile failed: see the warning above)"


def predicted_reserved(configs, params: TrainingParams) -> int:
    """The peak a run of `params` is predicted to reserve while training (training/peak.py), in bytes."""
    from lora_trainer.training.peak import estimate_for_configs

    return estimate_for_configs(configs, params).training_reserved


class PredictedPeaks:
    """The peaks our CUDA rows are predicted to reserve, worked out on the CPU in worker processes while the
    GPU measures (tens of CPU seconds a full-size row: none of the GPU's time is spent on them)."""

    def __init__(self, jobs: dict[str, tuple]):   # row name -> (PartConfigs, TrainingParams)
        # Half the cores at most, one thread each: the rows' own process keeps cores to launch the GPU's work.
        workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2))
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=torch.set_num_threads, initargs=(1,)) if jobs else None
        self.futures = {name: self.pool.submit(predicted_reserved, *job) for name, job in jobs.items()}

    def fill(self, results: list[dict]) -> None:
        """Wait for each result's prediction and put it in (a prediction that failed says so and stays None)."""
        for result in results:
            future = self.futures.get(result["row"].name)
            if future is None:
                continue
            try:
                result["predicted"] = future.result()
            except Exception as e:
                print(f"{result['row'].name}: the peak prediction failed: {type(e).__name__}: {e}", flush=True)
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def time_steps(step, data: dict, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per step of `step(data)` over `steps` steps after `warmup` ones, and the last loss."""
    for _ in range(warmup):
        step(data)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(data)
    loss = float(loss)
    _sync(device)
    return (time.perf_counter() - start) / steps, loss


def median_run(runs: list[dict]) -> dict:
    """The run with the median step time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def run_child(row: Row, index: int, argv: list[str]) -> dict:
    """A CPU row in a fresh process: memory the process owns is only comparable from a clean start."""
    out = subprocess.run([sys.executable, __file__, *argv, "--row", str(index)], capture_output=True, text=True)
    figures = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not figures:
        raise RuntimeError(f"{row.name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(figures[-1].removeprefix("RESULT "))
    configs, resolution = size_configs(row.size)
    return {**result, "row": row, "params": row_params(row, resolution, cuda=False)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def header(device: torch.device, args) -> str:
    import accelerate
    import diffusers
    import peft
    import transformers

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return (f"# {time.strftime('%Y-%m-%d')} {hardware}; python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"accelerate {accelerate.__version__}; {args.steps} steps after {args.warmup} warm-up")


def report(results: list[dict]) -> list[str]:
    """One line per row: settings, s/step, samples/s, peak, and the ratios to the floor of the same size."""
    lines = []
    floors = {}
    for result in results:
        row, params = result["row"], result["params"]
        key = (row.size, params.gradient_checkpointing, params.train_batch_size)
        if row.runner == "floor":
            floors[key] = result
        floor = floors.get(key) or floors.get((row.size, params.gradient_checkpointing, 1))
        ratio = f"{result['seconds'] / floor['seconds']:.2f}x floor time" if floor else "no floor"
        settings = (f"{params.mixed_precision}, rank {params.rank}, checkpointing {'on' if params.gradient_checkpointing else 'off'}, "
                    f"text encoder {'trained' if params.train_text_encoder else 'frozen'}, batch {params.train_batch_size}x2, "
                    f"{params.resolution} px, base {params.base_weights}, 8-bit Adam {'on' if params.use_8bit_adam else 'off'}")
        line = (f"{row.name:34s} {result['seconds']:7.3f} s/step {result['samples']:7.2f} samples/s "
                f"peak {result['peak'] / 2**30:6.3f} GiB  {ratio}")
        if result.get("cap_gib"):
            line += f", completed with the allocator held to {result['cap_gib']:g} GiB"
        if result.get("note"):
            line += f"  {result['note']}"
        lines.append(f"{line}  [{settings}]")
    by_name = {r["row"].name: r for r in results}
    for result in results:
        row = result["row"]
        if row.runner == "ours":
            recipe = by_name.get(row.name.replace("ours", "recipe", 1).replace(", fast path", ""))
            if recipe:
                lines.append(f"{row.name}: {result['seconds'] / recipe['seconds']:.2f}x the recipe's step time, "
                             f"{result['peak'] / max(recipe['peak'], 1):.2f}x its peak memory")
    for result in results:
        if result.get("predicted"):
            measured, predicted = result["peak"], result["predicted"]
            lines.append(f"{result['row'].name}: peak reserved {measured / 2**30:.3f} GiB, predicted "
                         f"{predicted / 2**30:.3f} GiB ({(predicted - measured) / max(measured, 1):+.1%})")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--sizes", default="tiny,mid", help="CPU mode: tiny, mid (comma-separated)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per row (default: 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default: 3 GPU, 1 CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: figures that stay put on a shared machine)")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: every row in this process (quicker; the memory figures then overlap)")
    parser.add_argument("--gpu-rows", choices=GPU_ROWS, default="all",
                        help="GPU mode: the table, the fast path beside the recipe, or all (default)")
    parser.add_argument("--fast-path", action="store_true",
                        help="CPU mode: also our step with Compile UNet (fast path) (compiling takes minutes)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the rows this many times, alternating, and report each row's median step time")
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    gpu = args.mode == "gpu"
    if gpu and not torch.cuda.is_available():
        print("--mode gpu: no CUDA GPU here; skipped (run --mode cpu)")
        return []
    args.steps = args.steps or (10 if gpu else 3)
    args.warmup = args.warmup or (3 if gpu else 1)
    device = torch.device("cuda" if gpu else "cpu")
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(args.threads)
    try:
        return run_rows(args, argv, gpu, device)
    finally:
        torch.set_num_threads(threads)


def run_rows(args, argv: list[str], gpu: bool, device: torch.device) -> list[str]:
    rows = gpu_rows(args.gpu_rows) if gpu else cpu_rows(args.sizes.split(","), args.fast_path)
    print(header(device, args), flush=True)
    if args.row is not None:  # a child of a CPU run: one row, its figures as JSON
        result = run_row(rows[args.row], device, args.steps, args.warmup)
        print("RESULT " + json.dumps({k: v for k, v in result.items() if k not in ("row", "params")}))
        return []
    predictions = PredictedPeaks(prediction_jobs(rows) if gpu else {})
    results = measure_rows(rows, lambda row, index: (run_row(row, device, args.steps, args.warmup)
                                                     if gpu or args.in_process else run_child(row, index, argv)),
                           args.repeat, device)
    return finish(results, predictions)


def finish(results: list[dict], predictions: PredictedPeaks) -> list[str]:
    """Every line of the report, with the predictions put in; the rows' own lines were printed as they came,
    the rest (ratios to the recipe, predicted against measured peaks) is printed here."""
    predictions.fill(results)
    lines = report(results)
    for line in lines[len(results):]:
        print(line)
    return lines


def prediction_jobs(rows: list[Row], configs_of=size_configs) -> dict[str, tuple]:
    """What PredictedPeaks works out for our rows: row name -> (PartConfigs, TrainingParams);
    `configs_of(row.size)` gives a row's (PartConfigs, picture size)."""
    jobs = {}
    for row in rows:
        if row.runner == "ours":
            configs, resolution = configs_of(row.size)
            jobs[row.name] = (configs, row_params(row, resolution, cuda=True))
    return jobs


@contextlib.contextmanager
def memory_cap(gib: float | None, device: torch.device):
    """On CUDA, the allocator held to `gib` GiB (torch.cuda.set_per_process_memory_fraction) while the row runs:
    the card a preset is for. A row that needs more fails with CUDA's out-of-memory error."""
    if gib is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def measure_rows(rows: list[Row], run, repeat: int, device: torch.device) -> list[dict]:
    """Each row's figures from `run(row, index)` (the median of `repeat` turns), each row's line printed as it
    comes; a row that fails says why and the others run."""
    results = []
    runs: list[list[dict]] = [[] for _ in rows]
    for turn in range(repeat):  # row after row, again and again: a busy spell of the machine hits all alike
        for index, row in enumerate(rows):
            try:
                with memory_cap(row.cap_gib, device):
                    result = dict(run(row, index), cap_gib=row.cap_gib if device.type == "cuda" else None)
            except Exception as e:  # one row that cannot run (a package the machine lacks) must not cost the others
                print(f"{row.name}: failed: {type(e).__name__}: {str(e).strip()[-2000:]}", flush=True)
                free_memory(device)
                continue
            runs[index].append(result)
            if repeat > 1:
                print(f"{row.name}: run {turn + 1} of {repeat}: {result['seconds']:.3f} s/step", flush=True)
            if not math.isfinite(result["loss"]):
                print(f"{row.name}: the loss was not a number", flush=True)
            if turn == repeat - 1 and runs[index]:
                results.append(median_run(runs[index]))
                print(report(results)[len(results) - 1], flush=True)
    return results


if __name__ == "__main__":
    main()
