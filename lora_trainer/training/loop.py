"""The step loop: noise, predict, loss, backward, optimizer step; report, save, sample, cancel.

One step is one optimizer update (after Gradient Accumulation micro-batches).
The cancel flag is looked at before every micro-batch; under `accelerate
launch` the processes agree on it, so they stop at the same step.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import TrainingParams
from ..errors import ConfigError
from ..masks import latent_weights
from ..progress import CancelFlag
from .batches import batch_latents
from .console import ProgressDisplay
from .ema import EMA
from .fastpath import NOT_COMPILE_FAILURES, CompiledUNet
from .loss import Loss, dreambooth_loss, min_snr_weights, sample_noise, sample_timesteps, training_target
from .parts import WorkingModel
from .position import RunPosition, capture, restore

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
MAX_NON_FINITE_STEPS = 3  # losses that are not numbers in a row before the run stops
NOT_A_NUMBER = ("the loss was not a number (NaN/inf) for {count} steps in a row at step {step} with Mixed Precision "
                "'{precision}': choose bf16 or 'no' ('mixed_precision') or lower the learning rates; "
                "nothing of these steps was saved")
OUT_OF_MEMORY = ("out of GPU memory at step {step} ({figures}); {saved}: tick Mixed Precision fp16, Use 8bit Adam, "
                 "Gradient Checkpointing and Cache Latents, untick Train Text Encoder, or lower Batch Size "
                 "('train_batch_size') or Max Resolution ('resolution')")
# torch >= 2.5 names it torch.OutOfMemoryError (also raised by other devices); older ones only torch.cuda's
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class Loop:
    """What the loop runs on. `unet`/`text_encoder` are as prepared by accelerate."""

    accelerator: object
    model: WorkingModel
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    train_text: bool
    trainable: list[torch.nn.Parameter]
    optimizer: object
    lr_scheduler: object
    loader: object
    sampler: object
    dataset: object
    params: TrainingParams
    total_steps: int
    first_epoch: int                 # the model's lifetime epochs: flips and class partners continue from there
    on_step: Callable[[int, int], None] = lambda step, epochs: None   # after each step: save / samples
    cancel: CancelFlag | None = None
    losses: list[float] = field(default_factory=list)
    text_encoder_2: torch.nn.Module | None = None   # SDXL's second encoder, prepared like the first
    text_cache: "TextCache | None" = None           # "Cache Text Encoder Outputs": prompt -> encoder outputs
    resume_at: RunPosition | None = None   # where an interrupted run of the same plan stopped
    position: RunPosition | None = None    # after the last completed step (what a save keeps)
    ema: EMA | None = None                 # "Use EMA": averaged after every optimizer step
    compiled_unet: CompiledUNet | None = None   # "Compile UNet (fast path)": the training step's UNet call

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])


@dataclass
class Outcome:
    steps: int
    epochs: int
    cancelled: bool
    out_of_memory: bool = False     # stopped by it after `steps` completed steps (what they learned is kept)


def steps_per_epoch(batches: int, num_processes: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of `batches` batches shared by `num_processes` (accelerate evens them out)."""
    return math.ceil(math.ceil(batches / num_processes) / accumulation)


def total_steps(params: TrainingParams, per_epoch: int) -> int:
    """Epochs x steps per epoch, capped by Max Training Steps when set."""
    total = params.num_train_epochs * per_epoch
    return min(total, params.max_train_steps) if params.max_train_steps else total


def compute_loss(loop: Loop, batch: dict) -> Loss:
    """The DreamBooth loss of one batch (instance rows, then class rows)."""
    model, params, device = loop.model, loop.params, loop.accelerator.device
    latents = batch_latents(batch, model.vae, model.latent_scale, device)
    noise = sample_noise(latents, params.noise_offset)
    timesteps = sample_timesteps(model.noise_scheduler, latents.shape[0], device)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    hidden, added = conditioning(model.info.family, loop.text_encoders, batch, device, train_text=loop.train_text,
                                 text_cache=loop.text_cache)
    unet = loop.compiled_unet if loop.compiled_unet is not None else loop.unet
    prediction = predict(unet, noisy, timesteps, hidden, added)
    target = training_target(model.noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(model.noise_scheduler, timesteps, params.snr_gamma)
    mask = latent_weights(batch["loss_mask"], latents) if "loss_mask" in batch else None
    return dreambooth_loss(prediction, target, batch["is_class"], prior_loss_weight=params.prior_loss_weight,
                           weights=weights, pixel_weights=mask)


def conditioning(family, encoders: list, batch: dict, device, *, train_text: bool,
                 text_cache: "TextCache | None" = None) -> tuple:
    """The UNet's conditioning of a batch (training's and validation's): (encoder hidden states,
    added_cond_kwargs or None), from the text cache by prompt or from the text encoders (with gradients
    when `train_text`). SDXL's added conditioning is its pooled embedding and the batch's time ids."""
    if text_cache is not None:
        hidden, pooled = text_cache.lookup(batch["prompts"], device)
        return hidden, family.added_conditioning(pooled, batch, device, hidden.dtype)
    with torch.set_grad_enabled(train_text and torch.is_grad_enabled()):
        return family.condition(encoders, batch, device)


def predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, added: dict | None):
    """The UNet's prediction with its conditioning (and SDXL's added conditioning)."""
    extra = {"added_cond_kwargs": added} if added is not None else {}
    return unet(noisy, timesteps, hidden, return_dict=False, **extra)[0]


class TextCache:
    """What the frozen text encoders give for every prompt of the run, encoded once ("Cache Text Encoder
    Outputs"); kept on the CPU, a batch's rows are looked up by prompt."""

    def __init__(self):
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def fill(self, family, encoders: list, dataset, prompts: list[str], device, batch_size: int = 8) -> None:
        unique = list(dict.fromkeys(prompts))
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            rows = [dataset.conditioning_of_prompt(p) for p in chunk]
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            hidden, pooled = family.encode_text(encoders, batch, device)
            for i, prompt in enumerate(chunk):
                self.outputs[prompt] = (hidden[i].cpu(), None if pooled is None else pooled[i].cpu())
        log.info("Cached the text encoders' outputs of %d prompts", len(unique))

    def lookup(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [self.outputs[p] for p in prompts]
        hidden = torch.stack([r[0] for r in rows]).to(device)
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows]).to(device)
        return hidden, pooled


def cancelled(loop: Loop) -> bool:
    """Whether Cancel was pressed (on any process: they all stop at the same step)."""
    wanted = loop.cancel is not None and loop.cancel.is_set()
    accelerator = loop.accelerator
    if accelerator.num_processes > 1:  # every process must stop at the same step
        flag = torch.tensor([1.0 if wanted else 0.0], device=accelerator.device)
        wanted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return wanted


def run_loop(loop: Loop, display: ProgressDisplay) -> Outcome:
    """Train until the step count is reached or the cancel flag is set.

    A step whose loss is not a number updates nothing (see `optimizer_micro_step`);
    after MAX_NON_FINITE_STEPS of them in a row the run stops with a ConfigError
    instead of going on with a broken model (fp16's black pictures).
    """
    accelerator, pending, non_finite, start = loop.accelerator, [], 0, loop.resume_at
    step, micro_batches, epoch, skip = (start.step, start.micro_batches, start.epoch, start.batch_in_epoch) \
        if start is not None else (0, 0, 0, 0)
    batches_per_epoch = max(len(loop.loader), 1)
    if start is not None:
        restore(loop, start)
    while step < loop.total_steps:
        set_epoch(loop, loop.first_epoch + epoch)
        loop.sampler.skip = skip * accelerator.num_processes  # an interrupted epoch goes on where it stopped
        in_epoch, skip = skip, 0
        for batch in loop.loader:
            if cancelled(loop):
                return Outcome(step, micro_batches // batches_per_epoch, True)
            try:
                pending.append(optimizer_micro_step(loop, batch))
            except OutOfMemoryError:
                # Stop at the last completed step: its weights are intact; this step's gradients go.
                loop.optimizer.zero_grad(set_to_none=True)
                return Outcome(step, micro_batches // batches_per_epoch, True, out_of_memory=True)
            micro_batches += 1
            in_epoch += 1
            if accelerator.sync_gradients:
                step += 1
                loop.losses.append(step_loss(pending))
                pending = []
                non_finite = 0 if math.isfinite(loop.losses[-1]) else non_finite + 1
                if non_finite >= MAX_NON_FINITE_STEPS:
                    raise ConfigError(NOT_A_NUMBER.format(count=non_finite, step=step,
                                                          precision=loop.params.mixed_precision))
                loop.position = capture(loop, step=step, micro_batches=micro_batches, epoch=epoch,
                                        batch_in_epoch=in_epoch)
                display.step(step, loop.first_epoch + epoch, loop.losses[-1], loop.lr_scheduler.get_last_lr()[0])
                loop.on_step(step, micro_batches // batches_per_epoch)
                if step >= loop.total_steps:
                    break
        epoch += 1
    return Outcome(step, micro_batches // batches_per_epoch, False)


def optimizer_micro_step(loop: Loop, batch: dict) -> torch.Tensor:
    """Forward and backward of one batch; the optimizer steps when the accumulation is complete.
    Returns the batch's loss, detached and still on the device (see `step_loss`).

    Gradients that are not numbers never reach the weights: with fp16 the gradient
    scaler skips such a step itself (and lowers its scale); otherwise the step is
    skipped here. Gradients are averaged over the processes in backward, so every
    process decides alike.
    """
    accelerator = loop.accelerator
    with accelerator.accumulate(loop.unet):
        loss = forward_backward(loop, batch)
        finite = True
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(loop.trainable, MAX_GRAD_NORM)
            finite = norm is None or loop.params.mixed_precision == "fp16" or bool(torch.isfinite(norm))
        if finite:
            loop.optimizer.step()
        loop.lr_scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.ema is not None and accelerator.sync_gradients:
            loop.ema.update()
    return loss.total.detach()


def step_loss(losses: list[torch.Tensor]) -> float:
    """The mean loss of one optimizer step's micro-batches, read back from the device in one go: reading
    waits for the device to finish, so it happens once per step (for the progress bar, the UI's plot and
    the run log, which show every step), not once per micro-batch."""
    values = torch.stack(losses).tolist() if len(losses) > 1 else [losses[0].item()]
    return sum(values) / len(values)


def forward_backward(loop: Loop, batch: dict) -> Loss:
    """The batch's loss, with its gradients added to the trained weights' (scaled by accelerate).

    With "Compile UNet" the UNet runs compiled; when compiling fails, the run goes on eagerly from this
    very batch: the random generators are put back first, so it draws the same noise and timesteps.
    """
    fast = loop.compiled_unet
    if fast is None or not fast.active:
        loss = compute_loss(loop, batch)
        loop.accelerator.backward(loss.total)
        return loss
    device = loop.accelerator.device
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        loss = compute_loss(loop, batch)
        loop.accelerator.backward(loss.total)
        return loss
    except NOT_COMPILE_FAILURES:
        raise
    except Exception as error:  # noqa: BLE001 - inductor's failures have many types (compiler, triton, codegen)
        fast.fall_back(error)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return forward_backward(loop, batch)


def set_epoch(loop: Loop, epoch: int) -> None:
    """Shuffle, flips and class partners of `epoch`; newer accelerate re-sets its loader's epoch on iteration."""
    loop.dataset.set_epoch(epoch)
    loop.sampler.set_epoch(epoch)
    if hasattr(loop.loader, "set_epoch"):
        loop.loader.set_epoch(epoch)
