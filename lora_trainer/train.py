""""Train": DreamBooth-style LoRA training (or a full fine-tune) of a working model.

`train` reads like the steps it takes: check the options against the
machine, save the settings, generate missing class pictures, load the model,
attach the adapters (continuing from the last run), build the batches, run the
step loop, save. The parts live in `lora_trainer/training/`, one concern each.
It runs under `accelerate launch` on several GPUs unchanged (data parallel).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from .classimages import generate_class_images, plan_class_images
from .compat import new_accelerator
from .config import CONCEPTS_FILE, MODEL_INFO_FILE, PARAMS_FILE, Concept, ModelInfo, TrainingParams, save_concepts
from .data import collect_examples, instance_examples
from .errors import ConfigError
from .host import ModelsDir
from .lora import load_lora_state_dict
from .progress import CancelFlag, Progress, Report, TrainResult, no_report
from .training.adapters import Adapters, attach_lora, trainable_groups, unfreeze_for_full_finetune
from .training.batches import LatentDataset, make_dataloader, make_dataset
from .training.console import ProgressDisplay
from .training.hardware import Hardware, check_options, check_parallel, probe_hardware
from .training.loop import Loop, TextCache, run_loop, steps_per_epoch, total_steps
from .training.memory import check_memory, describe, free_gpu_memory, least_memory
from .training.optim import make_lr_scheduler, make_optimizer
from .training.outputs import output_name
from .training.peak import PartConfigs, check_peak, describe_peak, estimate_for_configs, predicts
from .training.parts import (WorkingModel, enable_checkpointing, free_device_memory, load_working_model,
                             part_dtypes, place, set_attention, store_base_in_fp8)
from .training.resume import check_resume_fits, load_resume_state, restore_optimizer
from .training.samples import draw_samples, sample_prompts
from .training.snapshots import Snapshots

log = logging.getLogger(__name__)


def train(models: ModelsDir, model_name: str, params: TrainingParams, concepts: list[Concept], *,
          report: Report = no_report, cancel: CancelFlag | None = None, device: str | None = None) -> TrainResult:
    """Train the working model `model_name` on `concepts`; return what was written.

    The LoRA goes to `models.lora/<Custom Model Name or model name>_<steps>.safetensors`
    (a full fine-tune, "Use LORA" off, into the model folder); the model's info
    gets revision +1 and the new lifetime steps; a later call continues from here.
    `cancel.is_set()` is looked at every step: a cancelled run saves what it learned.
    Raises ConfigError for option pairs the machine cannot run (before any weight
    is loaded), bad concepts or running out of GPU memory; ModelError for a missing
    or broken model, or when the model's last LoRA was trained with another rank,
    alpha or Train Text Encoder (also before loading).
    """
    model_dir, info, hardware = check_before_loading(models, model_name, params, concepts, device)
    name = output_name(info, params)
    accelerator = make_accelerator(params, hardware)
    check_parallel(params, accelerator.num_processes)
    dtypes = part_dtypes(params, accelerator.device, info.family)
    check_gpu_memory(model_dir, params, dtypes, accelerator.device, hardware.name,
                     prior_preservation=any(c.with_prior_preservation for c in concepts if c.is_set))
    if accelerator.is_main_process:
        params.save(model_dir / PARAMS_FILE)
        save_concepts(concepts, model_dir / CONCEPTS_FILE)
        make_class_pictures(models, model_name, concepts, accelerator.device, report, cancel)
    accelerator.wait_for_everyone()
    if cancel is not None and cancel.is_set():
        log.info("Training cancelled before the first step")
        return TrainResult(None, info.lifetime_steps, info.revision, 0, cancelled=True)
    instance, class_ = collect_examples(concepts, model_dir)
    seed = run_seed(params, accelerator)
    report(Progress(job="train", message=f"Loading {model_name}"))
    model = load_working_model(model_dir, info, dtypes)
    adapters = prepare_model(model, params, accelerator.device, dtypes)
    optimizer_state = resume_from_last_run(models, model_dir, info, adapters)
    run = build_run(accelerator, model, adapters, params, instance, class_, info, seed, optimizer_state)
    snapshots = Snapshots(models, model_dir, info, params, name, seed, len(instance), time.time(),
                          source_checkpoint=source_checkpoint(models, info))
    display = ProgressDisplay(run.total_steps, report=report, device=accelerator.device,
                              lifetime_start=info.lifetime_steps, enabled=accelerator.is_main_process)
    samples = sample_prompts(concepts, instance)
    run.on_step = lambda step, epochs: after_step(run, snapshots, display, samples, adapters, step, epochs)
    run.cancel = cancel
    try:
        outcome = run_loop(run, display)
        if outcome.steps and accelerator.is_main_process:
            display.message("Saving", outcome.steps)
            save_snapshot(run, snapshots, adapters, outcome.steps, outcome.epochs)
    finally:
        display.close()
    accelerator.wait_for_everyone()
    # The main process saved; the others read what it wrote, so every process returns the same result.
    final = ModelInfo.load(model_dir / MODEL_INFO_FILE) if outcome.steps else info
    lora_path = models.lora / final.latest_lora if adapters is not None and outcome.steps else None
    if accelerator.is_main_process:
        log_outcome(outcome.cancelled, outcome.steps, final, models.lora / final.latest_lora
                    if adapters is not None and outcome.steps else model_dir)
    result = TrainResult(lora_path, final.lifetime_steps, final.revision, outcome.steps,
                         cancelled=outcome.cancelled, samples=list(display.samples), losses=list(run.losses))
    accelerator.free_memory()
    free_device_memory(accelerator.device)
    return result


def check_before_loading(models: ModelsDir, model_name: str, params: TrainingParams, concepts: list[Concept],
                         device: str | None = None) -> tuple[Path, ModelInfo, Hardware]:
    """The checks of `train` that need no weights and write nothing: the model, the options this
    machine runs, that something trains, the output name, the concepts' pictures, and that the last
    LoRA's shape fits. The UI runs them before a job, so a refused run never makes the host give up
    its GPU. Returns the model folder, its info and the hardware. Raises ConfigError or ModelError.
    """
    model_dir = models.existing_model_dir(model_name)
    info = ModelInfo.load(model_dir / MODEL_INFO_FILE)
    if not params.use_lora and not info.family.full_finetune:
        raise ConfigError(f"Use LORA ('use_lora'): a full fine-tune of {info.family.title} models is not supported; "
                          "tick Use LORA")
    hardware = probe_hardware(device)
    check_options(params, hardware)
    check_trains_something(params)
    output_name(info, params)
    check_concepts(concepts, model_dir)
    check_resume_fits(model_dir, models.lora, info, params)
    return model_dir, info, hardware


def log_outcome(cancelled: bool, steps: int, info: ModelInfo, saved: Path) -> None:
    """The run's one closing console line: finished, or cancelled with what was saved."""
    if not cancelled:
        log.info("Training finished. Total lifetime steps: %d", info.lifetime_steps)
    elif steps:
        log.info("Training cancelled after %d steps; saved %s", steps, saved)
    else:
        log.info("Training cancelled before the first step; nothing saved")


def check_concepts(concepts: list[Concept], model_dir: Path) -> None:
    """Before anything is written or loaded: every concept that names a Dataset Directory has readable
    pictures with a prompt (Instance Prompt or captions), at least one does, and missing class pictures
    have a Class Prompt to be generated from. Raises ConfigError naming the concept and field."""
    chosen = [(i, c) for i, c in enumerate(concepts) if c.is_set]
    if not chosen:
        raise ConfigError("Concepts: no concept has a Dataset Directory; set Concept 1's Dataset Directory ('instance_data_dir')")
    for index, concept in chosen:
        instance_examples(concept, index, model_dir)
    plan_class_images(model_dir, concepts, quiet=True)


def check_trains_something(params: TrainingParams) -> None:
    """Refuse a run whose every trained part has learning rate 0: it would save a copy of what was there."""
    if params.use_lora:
        rates = {"Lora UNET Learning Rate ('unet_learning_rate')": params.unet_learning_rate}
        if params.train_text_encoder:
            rates["Lora Text Encoder Learning Rate ('text_encoder_learning_rate')"] = params.text_encoder_learning_rate
    else:
        rates = {"Learning Rate ('learning_rate')": params.learning_rate}
    if all(rate == 0 for rate in rates.values()):
        names = " and ".join(rates)
        raise ConfigError(f"{names} {'are' if len(rates) > 1 else 'is'} 0, so training would change nothing; "
                          "set a learning rate above 0")


def make_accelerator(params: TrainingParams, hardware: Hardware):
    """The accelerate.Accelerator of the run: mixed precision, accumulation, the device (several under a launcher)."""
    if hardware.cuda and hardware.device.index is not None:
        torch.cuda.set_device(hardware.device)
    return new_accelerator(mixed_precision=params.mixed_precision,
                           gradient_accumulation_steps=params.gradient_accumulation_steps,
                           cpu=not hardware.cuda)


def check_gpu_memory(model_dir: Path, params: TrainingParams, dtypes: dict[str, torch.dtype], device: torch.device,
                     gpu: str, *, prior_preservation: bool) -> None:
    """On a GPU: refuse, before anything is loaded, a run whose weights and training state alone do not fit,
    or whose predicted peak does not (naming the options that would fit)."""
    free = free_gpu_memory(device)
    if free is None:
        return
    need = least_memory(model_dir, params, dtypes)
    check_memory(need, free, gpu)
    if not predicts(model_dir):
        log.info(describe(need, free))
        return
    configs = PartConfigs.from_model_dir(model_dir)
    estimate = estimate_for_configs(configs, params, prior_preservation=prior_preservation)
    check_peak(configs, params, estimate, free, gpu, prior_preservation=prior_preservation)
    log.info("%s; %s", describe(need, free), describe_peak(estimate))


def run_seed(params: TrainingParams, accelerator) -> int:
    """Seed every random generator with the run's seed (-1: one picked at random, the same on every
    process: they must shuffle the batches alike to share them out)."""
    from accelerate.utils import broadcast_object_list, set_seed

    seed = [random.randrange(2**31) if params.seed < 0 else params.seed]
    if accelerator.num_processes > 1:
        broadcast_object_list(seed)
    set_seed(seed[0])
    return seed[0]


def make_class_pictures(models: ModelsDir, model_name: str, concepts: list[Concept], device: torch.device,
                        report: Report, cancel: CancelFlag | None) -> None:
    """Generate the missing class pictures first (the console says how many each concept needs)."""
    def progress(message: str, fraction: float) -> None:
        report(Progress(job="class images", message=message, step=round(fraction * 1000), total_steps=1000))

    generate_class_images(models, model_name, concepts, device=device, progress=progress, cancel=cancel)


def prepare_model(model: WorkingModel, params: TrainingParams, device: torch.device,
                  dtypes: dict[str, torch.dtype]) -> Adapters | None:
    """Place the parts, set attention and checkpointing, attach LoRA (or unfreeze for a full fine-tune)."""
    place(model, device, dtypes)
    if params.base_weights == "fp8":
        store_base_in_fp8(model, dtypes, device)
    set_attention(model.unet, params.attention)
    if params.gradient_checkpointing:
        enable_checkpointing(model, text_encoder=params.train_text_encoder)
    if not params.use_lora:
        unfreeze_for_full_finetune(model, params)
        return None
    return attach_lora(model, params)


def resume_from_last_run(models: ModelsDir, model_dir: Path, info: ModelInfo, adapters: Adapters | None) -> dict | None:
    """Load the adapters the previous run left and return its optimizer state (None: start afresh).

    A full fine-tune continues from the weights in the model folder itself.
    """
    state = load_resume_state(model_dir, models.lora, info) if adapters is not None else None
    if state is None:
        return None
    load_lora_state_dict(adapters.all, state.adapters, source=state.source)
    log.info("Continuing from %s (lifetime step %d)", state.source, info.lifetime_steps)
    return state.optimizer


def build_run(accelerator, model: WorkingModel, adapters: Adapters | None, params: TrainingParams,
              instance, class_, info: ModelInfo, seed: int, optimizer_state: dict | None) -> Loop:
    """Batches, optimizer and schedule, prepared by accelerate."""
    dataset = make_dataset(instance, class_, params, model.tokenizer, cached=params.cache_latents, seed=seed,
                           tokenizer_2=model.tokenizer_2, time_ids=model.info.family.time_ids)
    if isinstance(dataset, LatentDataset):
        dataset.fill_cache(model.vae, device=accelerator.device, dtype=next(model.vae.parameters()).dtype)
        model.vae.to("cpu")  # not needed again until samples: free the GPU for training
        free_device_memory(accelerator.device)
    loader, sampler = make_dataloader(dataset, params.train_batch_size, seed=seed)
    groups = trainable_groups(model, adapters, params)
    optimizer = make_optimizer(groups, params)
    if restore_optimizer(optimizer, optimizer_state, groups):
        log.info("Restored the optimizer state of the previous run")
    per_epoch = steps_per_epoch(len(sampler), accelerator.num_processes, params.gradient_accumulation_steps)
    steps = total_steps(params, per_epoch)
    lr_scheduler = make_lr_scheduler(optimizer, params, steps, accelerator.num_processes)
    train_text = params.train_text_encoder
    if train_text:
        unet, *encoders, optimizer, loader, lr_scheduler = accelerator.prepare(
            model.unet, *model.text_encoders, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(model.unet, optimizer, loader, lr_scheduler)
        encoders = model.text_encoders
    unet.train()
    for encoder in encoders:
        encoder.train(train_text)
    trainable = [p for group in groups for p in group["params"]]
    text_cache = None
    if params.cache_text_encoder_outputs:
        text_cache = TextCache()
        text_cache.fill(model.info.family, encoders, dataset, [e.prompt for e in instance + class_], accelerator.device)
        for encoder in encoders:
            encoder.to("cpu")  # not needed again until samples: free the GPU for training
        free_device_memory(accelerator.device)
    return Loop(accelerator, model, unet, encoders[0], train_text, trainable, optimizer, lr_scheduler, loader,
                sampler, dataset, params, steps, info.lifetime_epochs,
                text_encoder_2=encoders[1] if len(encoders) > 1 else None, text_cache=text_cache)


def after_step(run: Loop, snapshots: Snapshots, display: ProgressDisplay, samples, adapters, step: int,
               epochs: int) -> None:
    """Save at the "Save Model Frequency" and draw previews at the "Save Preview(s) Frequency"."""
    if not run.accelerator.is_main_process:
        return
    params = run.params
    if params.save_every_n_steps and step % params.save_every_n_steps == 0 and step < run.total_steps:
        display.message(f"Saving at step {step}", step)
        save_snapshot(run, snapshots, adapters, step, epochs)
    if params.save_preview_every_n_steps and step % params.save_preview_every_n_steps == 0:
        display.message(f"Drawing samples at step {step}", step)
        lifetime = snapshots.start_info.lifetime_steps + step
        stem = f"{snapshots.name}_{lifetime if params.use_lifetime_steps else step}"
        unwrap = run.accelerator.unwrap_model
        display.samples += draw_samples(run.model, unwrap(run.unet), unwrap(run.text_encoder), samples,
                                        folder=snapshots.model_dir, stem=stem, resolution=params.resolution,
                                        device=run.accelerator.device, autocast=run.accelerator.autocast,
                                        seed=snapshots.seed,
                                        text_encoder_2=unwrap(run.text_encoder_2) if run.text_encoder_2 else None)
        display.message(f"Samples of step {step} saved", step)


def save_snapshot(run: Loop, snapshots: Snapshots, adapters: Adapters | None, step: int, epochs: int) -> None:
    """Save the LoRA (or the fine-tuned weights), the resume state and the model info after `step` steps."""
    unwrap = run.accelerator.unwrap_model
    snapshots.save(step, epochs, adapters=adapters, optimizer=run.optimizer, unet=unwrap(run.unet),
                   text_encoder=unwrap(run.text_encoder))


def source_checkpoint(models: ModelsDir, info: ModelInfo) -> Path | None:
    """The checkpoint the model was created from, when it is still there (its hash goes into the LoRA's metadata)."""
    path = models.checkpoints / info.source_checkpoint if info.source_checkpoint else None
    return path if path is not None and path.is_file() else None

