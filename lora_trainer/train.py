""""Train": DreamBooth-style LoRA training (or a full fine-tune) of a working model.

`train` reads like the steps it takes: check the options against the
machine, save the settings, generate missing class pictures, load the model,
attach the adapters (continuing from the last run), build the batches, run the
step loop, save. The parts live in `lora_trainer/training/`, one concern each.
It runs under `accelerate launch` on several GPUs unchanged (data parallel).
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .caption_augment import CaptionAugment
from .checkpoint_io import BackgroundSha256
from .classimages import generate_class_images, plan_class_images
from .compat import new_accelerator
from .config import CONCEPTS_FILE, MODEL_INFO_FILE, PARAMS_FILE, Concept, ModelInfo, TrainingParams, save_concepts
from .data import collect_examples, instance_examples
from .errors import ConfigError
from .host import ModelsDir
from .lora import load_lora_state_dict
from .leftovers import clean_leftovers
from .modellock import model_lock
from .progress import CancelFlag, Progress, Report, TrainResult, no_report
from .source_hash import source_sha256
from .training.adapters import Adapters, attach_lora, trainable_groups, unfreeze_for_full_finetune
from .training.batches import LatentDataset, make_dataloader, make_dataset
from .training.console import ProgressDisplay
from .training.hardware import Hardware, check_options, check_parallel, probe_hardware
from .training.loop import OUT_OF_MEMORY, Loop, TextCache, run_loop, steps_per_epoch, total_steps
from .training.memory import check_memory, describe, free_gpu_memory, least_memory
from .training.optim import make_lr_scheduler, make_optimizer
from .training.outputs import output_name
from .training.peak import PartConfigs, check_peak, describe_peak, estimate_for_configs
from .training.parts import (WorkingModel, enable_checkpointing, free_device_memory, load_working_model,
                             part_dtypes, place, set_attention, store_base_in_fp8)
from .training.ema import EMA, ema_applied
from .training.fastpath import CompiledUNet
from .training.resume import (RESUME_DIR, check_resume_fits, interrupted_run, load_ema_state, load_resume_state,
                              restore_optimizer, run_plan)
from .training.samples import draw_samples, sample_prompts
from .training.saving import Retention, SaveSchedule, draw_grid, grid_prompts, grid_seeds
from .training.logs import RunLog, group_names
from .training.snapshots import Snapshots
from .training.validation import (Validator, best_line, build_validation_set, check_validation_dirs, evaluate,
                                  hold_out, result_fields)

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
    alpha or Train Text Encoder (also before loading); ModelBusy when another job is writing the model.
    """
    with model_lock(models.existing_model_dir(model_name), "train"):
        return _train(models, model_name, params, concepts, report=report, cancel=cancel, device=device)


def _train(models: ModelsDir, model_name: str, params: TrainingParams, concepts: list[Concept], *,
           report: Report, cancel: CancelFlag | None, device: str | None) -> TrainResult:
    model_dir = models.existing_model_dir(model_name)
    for folder in (models.lora, model_dir / RESUME_DIR):
        clean_leftovers(folder)  # what a killed run left (its lock is taken over by model_lock)
    model_dir, info, hardware = check_before_loading(models, model_name, params, concepts, device)
    name = output_name(info, params)
    accelerator = make_accelerator(params, hardware)
    check_parallel(params, accelerator.num_processes)
    dtypes = part_dtypes(params, accelerator.device, info.family)
    check_gpu_memory(model_dir, params, dtypes, accelerator.device, hardware.name,
                     prior_preservation=any(c.with_prior_preservation for c in concepts if c.is_set))
    if accelerator.is_main_process:
        dataclasses.replace(params, new_run=False).save(model_dir / PARAMS_FILE)  # a new run is asked for once
        save_concepts(concepts, model_dir / CONCEPTS_FILE)
        make_class_pictures(models, model_name, concepts, accelerator.device, report, cancel)
    accelerator.wait_for_everyone()
    if cancel is not None and cancel.is_set():
        log.info("Training cancelled before the first step")
        return TrainResult(None, info.lifetime_steps, info.revision, 0, cancelled=True)
    instance, class_ = collect_examples(concepts, model_dir)
    instance, held_out = hold_out(instance, concepts, model_dir, params.validation_split)
    pictures = [str(e.image_path) for e in instance + class_]
    interrupted = interrupted_run(model_dir, info, params, concepts, pictures) if params.use_lora else None
    start_info = interrupted.start_info if interrupted else info
    seed = run_seed(params, accelerator, interrupted.seed if interrupted else None)
    report(Progress(job="train", message=f"Loading {model_name}"))
    # The source's hash (the LoRA's metadata; model_info.json from the first save), when Create Model left it for
    # later: read while the model loads.
    hashing = source_sha256(models, info) if accelerator.is_main_process else BackgroundSha256.known("")
    with hashing as source_hash:
        model = load_working_model(model_dir, info, dtypes)
        adapters = prepare_model(model, params, accelerator.device, dtypes)
        validator = make_validator(model, held_out, params, accelerator)  # before the latent cache moves the VAE off
        optimizer_state = resume_from_last_run(models, model_dir, info, adapters)
        run = build_run(accelerator, model, adapters, params, instance, class_, start_info, seed, optimizer_state,
                        validation_prompts=[e.prompt for e in held_out])
        digest = source_hash.result()
        info, start_info = (dataclasses.replace(i, source_checkpoint_hash=digest) for i in (info, start_info))
    started_at = interrupted.plan["started_at"] if interrupted else time.time()
    if interrupted and interrupted.total_steps == run.total_steps:
        run.resume_at = interrupted.position
        resuming = f"Resuming the interrupted run at step {interrupted.position.step + 1} of {run.total_steps}"
        log.info(resuming)
        report(Progress(job="train", message=resuming, step=interrupted.position.step, total_steps=run.total_steps))
    elif interrupted:  # same settings and pictures, yet another step count: a library counts batches otherwise
        log.warning("The interrupted run planned %d steps, this one %d; a new run starts from what it learned",
                    interrupted.total_steps, run.total_steps)
        start_info, run.first_epoch, started_at = info, info.lifetime_epochs, time.time()
    run.ema = make_ema(params, run.trainable, model_dir if adapters is not None else None)
    snapshots = Snapshots(models, model_dir, start_info, params, name, seed, len(instance), started_at,
                          source_checkpoint=source_checkpoint(models, info),
                          plan=run_plan(params, concepts, pictures, seed=seed, total_steps=run.total_steps,
                                        start_info=start_info, started_at=started_at))
    snapshots.saved_at_step = run.resume_at.step if run.resume_at else -1  # saved when it stopped
    display = ProgressDisplay(run.total_steps, report=report, device=accelerator.device,
                              lifetime_start=start_info.lifetime_steps, enabled=accelerator.is_main_process,
                              first_step=run.resume_at.step if run.resume_at else 0)
    samples = sample_prompts(concepts, instance)
    saving = Saving(SaveSchedule(params, run.total_steps), Retention(params.keep_last_n_saves),
                    next((c for c in concepts if c.is_set), None))
    runlog = RunLog(model_dir, info.revision + 1, group_names(len(run.optimizer.param_groups))) \
        if accelerator.is_main_process else None
    run.on_step = lambda step, epochs: after_step(run, snapshots, display, samples, adapters, step, epochs, saving,
                                                  validator=validator, runlog=runlog)
    run.cancel = cancel
    try:
        outcome = run_loop(run, display)
        if outcome.steps and accelerator.is_main_process:
            display.message("Saving", outcome.steps)
            save_snapshot(run, snapshots, adapters, outcome.steps, outcome.epochs)
            name_best(validator, snapshots, display, outcome.steps)
            if adapters is not None:
                saving.retention.settle(snapshots.keep)
            sample_grid(run, snapshots, display, saving, outcome.steps)
    finally:
        display.close()
        if runlog is not None:
            runlog.close()
    accelerator.wait_for_everyone()
    # The main process saved; the others read what it wrote, so every process returns the same result.
    final = ModelInfo.load(model_dir / MODEL_INFO_FILE) if outcome.steps else info
    added = outcome.steps - (run.resume_at.step if run.resume_at is not None else 0)  # by this start
    lora_path = models.lora / final.latest_lora if adapters is not None and added else None
    if accelerator.is_main_process and not outcome.out_of_memory:
        log_outcome(outcome.cancelled, outcome.steps, final, models.lora / final.latest_lora
                    if adapters is not None and outcome.steps else model_dir)
    result = TrainResult(lora_path, final.lifetime_steps, final.revision, added,
                         cancelled=outcome.cancelled, samples=list(display.samples), losses=list(run.losses),
                         **result_fields(validator))
    accelerator.free_memory()
    free_device_memory(accelerator.device)
    if outcome.out_of_memory:
        raise ConfigError(out_of_memory_message(model_dir, params, dtypes, accelerator.device, outcome, final))
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
    info.family.check_params(params)
    hardware = probe_hardware(device)
    check_options(params, hardware)
    check_trains_something(params, info.family)
    check_feature_pairs(params)
    output_name(info, params)
    grid_seeds(params)
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


def out_of_memory_message(model_dir: Path, params: TrainingParams, dtypes: dict[str, torch.dtype],
                          device: torch.device, outcome, final: ModelInfo) -> str:
    """The one line of a run stopped by running out of GPU memory: the memory count, what was kept,
    and the options that lower the need."""
    figures = describe(least_memory(model_dir, params, dtypes), free_gpu_memory(device))
    if device.type == "cuda":
        figures += f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GB"
    saved = (f"the {outcome.steps} steps before it are saved ({final.latest_lora or model_dir}) and the next start "
             "finishes the run" if outcome.steps else "nothing was learned yet")
    return OUT_OF_MEMORY.format(step=outcome.steps + 1, figures=figures, saved=saved)


def check_concepts(concepts: list[Concept], model_dir: Path) -> None:
    """Before anything is written or loaded: every concept that names a Dataset Directory has readable
    pictures with a prompt (Instance Prompt or captions), at least one does, and missing class pictures
    have a Class Prompt to be generated from. Raises ConfigError naming the concept and field."""
    chosen = [(i, c) for i, c in enumerate(concepts) if c.is_set]
    if not chosen:
        raise ConfigError("Concepts: no concept has a Dataset Directory; set Concept 1's Dataset Directory ('instance_data_dir')")
    for index, concept in chosen:
        instance_examples(concept, index, model_dir)
    check_validation_dirs(concepts, model_dir)
    plan_class_images(model_dir, concepts, quiet=True)


def check_feature_pairs(params: TrainingParams) -> None:
    """Refuse features that cannot work together (before loading). Raises ConfigError naming both."""
    if params.cache_text_encoder_outputs and CaptionAugment.from_params(params).active:
        raise ConfigError("Cache Text Encoder Outputs ('cache_text_encoder_outputs') encodes each caption once, so "
                          "Shuffle Caption and the caption dropout rates cannot change it; turn one of them off")


def check_trains_something(params: TrainingParams, family=None) -> None:
    """Refuse a run whose every trained part has learning rate 0: it would save a copy of what was there.
    `family` (default: one text encoder) tells whether SDXL's second encoder's rate counts."""
    if params.use_lora:
        rates = {"Lora UNET Learning Rate ('unet_learning_rate')": params.unet_learning_rate}
        if params.train_text_encoder:
            rates["Lora Text Encoder Learning Rate ('text_encoder_learning_rate')"] = params.text_encoder_learning_rate
            if family is not None and len(family.text_encoders) > 1 and params.text_encoder_2_learning_rate:
                rates["Lora Text Encoder 2 Learning Rate ('text_encoder_2_learning_rate')"] = \
                    params.text_encoder_2_learning_rate
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
    configs = PartConfigs.from_model_dir(model_dir)
    estimate = estimate_for_configs(configs, params, prior_preservation=prior_preservation, cache_dir=model_dir)
    check_peak(configs, params, estimate, free, gpu, prior_preservation=prior_preservation, cache_dir=model_dir,
               device=device)
    log.info("%s; %s", describe(need, free), describe_peak(estimate))


def run_seed(params: TrainingParams, accelerator, seed: int | None = None) -> int:
    """Seed every random generator with `seed`, else the run's seed (-1: one picked at random, the same on
    every process: they must shuffle the batches alike to share them out)."""
    from accelerate.utils import broadcast_object_list, set_seed

    seed = [seed if seed is not None else random.randrange(2**31) if params.seed < 0 else params.seed]
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
    """Place the parts, set attention and checkpointing, attach LoRA (or unfreeze for a full fine-tune).
    With latents or text-encoder outputs cached, the UNet joins the GPU only after the caches are filled
    (build_run): the SDXL VAE at 1024 px beside the UNet would not fit an 8 GB card (docs/training.md)."""
    place(model, device, dtypes, unet_later=params.cache_latents or params.cache_text_encoder_outputs)
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
              instance, class_, info: ModelInfo, seed: int, optimizer_state: dict | None, *,
              validation_prompts: list[str] | None = None) -> Loop:
    """Batches, optimizer and schedule, prepared by accelerate; with "Cache Text Encoder Outputs" the
    encodings of every prompt, the validation pictures' `validation_prompts` too."""
    dataset = make_dataset(instance, class_, params, model.tokenizer, cached=params.cache_latents, seed=seed,
                           tokenizer_2=model.tokenizer_2, time_ids=model.info.family.time_ids)
    if isinstance(dataset, LatentDataset):
        dataset.fill_cache(model.vae, device=accelerator.device, dtype=next(model.vae.parameters()).dtype)
        model.vae.to("cpu")  # not needed again until samples: free the GPU for training
        free_device_memory(accelerator.device)
    train_text = params.train_text_encoder
    for encoder in model.text_encoders:
        encoder.train(train_text)
    text_cache = None
    if params.cache_text_encoder_outputs:
        text_cache = TextCache()
        text_cache.fill(model.info.family, model.text_encoders, dataset, [e.prompt for e in instance + class_]
                        + list(validation_prompts or []), accelerator.device)
        for encoder in model.text_encoders:
            encoder.to("cpu")  # not needed again until samples: free the GPU for training
        free_device_memory(accelerator.device)
    model.unet.to(accelerator.device)  # kept off the GPU while the caches were filled (prepare_model)
    loader, sampler = make_dataloader(dataset, params.train_batch_size, seed=seed)
    groups = trainable_groups(model, adapters, params)
    optimizer = make_optimizer(groups, params)
    if restore_optimizer(optimizer, optimizer_state, groups):
        log.info("Restored the optimizer state of the previous run")
    per_epoch = steps_per_epoch(len(sampler), accelerator.num_processes, params.gradient_accumulation_steps)
    steps = total_steps(params, per_epoch)
    lr_scheduler = make_lr_scheduler(optimizer, params, steps, accelerator.num_processes)
    if train_text:
        unet, *encoders, optimizer, loader, lr_scheduler = accelerator.prepare(
            model.unet, *model.text_encoders, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(model.unet, optimizer, loader, lr_scheduler)
        encoders = model.text_encoders
    unet.train()
    trainable = [p for group in groups for p in group["params"]]
    compiled = CompiledUNet(unet, accelerator.device, static_shapes=len(set(dataset.sizes)) == 1) \
        if params.compile_unet else None
    return Loop(accelerator, model, unet, encoders[0], train_text, trainable, optimizer, lr_scheduler, loader,
                sampler, dataset, params, steps, info.lifetime_epochs,
                text_encoder_2=encoders[1] if len(encoders) > 1 else None, text_cache=text_cache,
                compiled_unet=compiled)


@dataclass
class Saving:
    """When to save on the way, which of those files to keep, and the concept whose sample settings the grid uses."""

    schedule: SaveSchedule
    retention: Retention
    concept: Concept | None


def after_step(run: Loop, snapshots: Snapshots, display: ProgressDisplay, samples, adapters, step: int,
               epochs: int, plan: Saving, *, validator: Validator | None = None, runlog: RunLog | None = None) -> None:
    """Measure the validation loss when due, write the step's figures to the logs, save at the "Save Model
    Frequency" (steps or epochs; keeping the last N intermediate files and the best by validation, with a
    sample grid) and draw previews at the "Save Preview(s) Frequency"."""
    if not run.accelerator.is_main_process:
        return
    params = run.params
    saving = plan.schedule.due(step, epochs)
    val_loss = evaluate(run, validator, step, saving=saving)
    if val_loss is not None:
        display.validation(step, val_loss)
    if runlog is not None:
        runlog.row(step=step, lifetime_step=snapshots.start_info.lifetime_steps + step, epoch=epochs,
                   loss=run.losses[-1], val_loss=val_loss, lrs=run.lr_scheduler.get_last_lr(),
                   memory_mb=display.memory_mb())
    if saving:
        display.message(f"Saving at step {step}", step)
        save_snapshot(run, snapshots, adapters, step, epochs)
        if validator is not None:
            validator.files[step] = snapshots.lora_path
            snapshots.keep = {path for path in [validator.best_file()] if path is not None}
        if adapters is not None:
            plan.retention.protected = set(snapshots.keep)
            plan.retention.saved(snapshots.lora_path)
        sample_grid(run, snapshots, display, plan, step)
    if params.save_preview_every_n_steps and step % params.save_preview_every_n_steps == 0:
        display.message(f"Drawing samples at step {step}", step)
        lifetime = snapshots.start_info.lifetime_steps + step
        stem = f"{snapshots.name}_{lifetime if params.use_lifetime_steps else step}"
        unwrap = run.accelerator.unwrap_model
        # Previews must not move the training's generators: a resumed run would not match one that never stopped.
        with ema_applied(run.ema), torch.random.fork_rng(devices=[run.accelerator.device] if run.accelerator.device.type == "cuda" else []):
            display.samples += draw_samples(run.model, unwrap(run.unet), unwrap(run.text_encoder), samples,
                                            folder=snapshots.model_dir, stem=stem, resolution=params.resolution,
                                            device=run.accelerator.device, autocast=run.accelerator.autocast,
                                            seed=snapshots.seed,
                                            text_encoder_2=unwrap(run.text_encoder_2) if run.text_encoder_2 else None)
        display.message(f"Samples of step {step} saved", step)


def sample_grid(run: Loop, snapshots: Snapshots, display: ProgressDisplay, saving: Saving, step: int) -> None:
    """The grid of Sample Grid Prompts x Seeds after a save (nothing without prompts); shown in the gallery."""
    prompts = grid_prompts(run.params)
    if not prompts:
        return
    display.message(f"Drawing the sample grid of step {step}", step)
    lifetime = snapshots.start_info.lifetime_steps + step
    unwrap = run.accelerator.unwrap_model
    # As the previews: the EMA weights when on, and the training's generators left where they were.
    with ema_applied(run.ema), torch.random.fork_rng(devices=[run.accelerator.device] if run.accelerator.device.type == "cuda" else []):
        path = draw_grid(run.model, unwrap(run.unet), unwrap(run.text_encoder), prompts, grid_seeds(run.params),
                         saving.concept, folder=snapshots.model_dir,
                         stem=f"{snapshots.name}_{lifetime if run.params.use_lifetime_steps else step}",
                         resolution=run.params.resolution, device=run.accelerator.device,
                         autocast=run.accelerator.autocast,
                         text_encoder_2=unwrap(run.text_encoder_2) if run.text_encoder_2 else None)
    display.samples.append(path)
    display.message(f"Sample grid of step {step} saved", step)


def save_snapshot(run: Loop, snapshots: Snapshots, adapters: Adapters | None, step: int, epochs: int) -> None:
    """Save the LoRA (or the fine-tuned weights), the resume state and the model info after `step` steps."""
    unwrap = run.accelerator.unwrap_model
    snapshots.save(step, epochs, adapters=adapters, optimizer=run.optimizer, unet=unwrap(run.unet),
                   text_encoder=unwrap(run.text_encoder), position=run.position, ema=run.ema)


def make_validator(model: WorkingModel, held_out: list, params: TrainingParams, accelerator) -> Validator | None:
    """The validation set (encoded once, on the main process) when there are validation pictures."""
    if not held_out or not accelerator.is_main_process:
        return None
    vset = build_validation_set(held_out, model, resolution=params.resolution, center_crop=params.center_crop,
                                device=accelerator.device)
    return Validator(vset, params.validation_every_n_steps, among_saves=bool(params.save_every_n_steps))


def name_best(validator: Validator | None, snapshots: Snapshots, display: ProgressDisplay, steps: int) -> None:
    """At the end: the step with the lowest validation loss, and its LoRA, in the log and the console."""
    if validator is None:
        return
    validator.files[steps] = snapshots.lora_path
    snapshots.keep = {path for path in [validator.best_file()] if path is not None}
    line = best_line(validator, snapshots.start_info.lifetime_steps)
    if line:
        log.info(line)
        display.message(line, steps)


def make_ema(params: TrainingParams, trainable: list, resume_dir: Path | None) -> EMA | None:
    """"Use EMA": averages of the trained weights, continuing the ones kept in `resume_dir`'s resume
    state (a LoRA run's model folder) when they fit."""
    if not params.use_ema:
        return None
    ema = EMA(trainable, params.ema_decay)
    state = load_ema_state(resume_dir) if resume_dir is not None else None
    if state is not None and ema.load_state_dict(state):
        log.info("Continuing the EMA of the previous run")
    return ema


def source_checkpoint(models: ModelsDir, info: ModelInfo) -> Path | None:
    """The checkpoint the model was created from, when it is still there (its hash goes into the LoRA's metadata)."""
    path = models.checkpoints / info.source_checkpoint if info.source_checkpoint else None
    return path if path is not None and path.is_file() else None

