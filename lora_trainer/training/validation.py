"""Validation: the loss on pictures the run does not train on, at fixed timesteps and fixed noise.

The validation pictures are a held-out share of each concept's pictures
("Validation Share"; the same pictures in every run of the model, whatever
the seed) or, for a concept that names one, all pictures of its "Validation
Directory" (then none of its own pictures is held out). Before the first step
each is encoded once (the mean of the VAE's latent distribution, at Max
Resolution, never mirrored) with its prompt as written (no caption
augmentation), and noise is drawn once per picture and timestep from a
generator of its own with a fixed seed. Every evaluation then uses the same
latents, noise and timesteps, so the curve moves only when the weights do.
The loss is the plain mean squared error of the prediction against the
training target, averaged over the pictures and VALIDATION_TIMESTEPS.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Concept
from ..data import Example, instance_examples
from ..images import load_image, resize_to, to_tensor
from .loss import training_target

log = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)   # fractions of the noise schedule
VALIDATION_SEED = 20240501                         # fixed: the noise is the same in every run
ENCODE_BATCH = 4


def hold_out(instance: list[Example], concepts: list[Concept], model_dir: Path,
             share: float) -> tuple[list[Example], list[Example]]:
    """(pictures to train on, validation pictures). A concept with a Validation Directory gives all of its
    pictures to validation and keeps its own; otherwise `share` of its pictures (at least one, never all)
    are held out, chosen the same way in every run. Raises ConfigError for a bad Validation Directory."""
    train, validation = [], []
    for index, concept in enumerate(concepts):
        own = [e for e in instance if e.concept_index == index]
        if not own:
            continue
        if concept.validation_data_dir.strip():
            validation += validation_examples(concept, index, model_dir)
            train += own
            continue
        count = min(len(own) - 1, max(1, round(share * len(own)))) if share > 0 else 0
        if share > 0 and count == 0:
            log.warning("Concept %d has only one picture: none is held out for validation", index + 1)
        chosen = set(random.Random(f"validation:{index}").sample(range(len(own)), count))
        train += [e for i, e in enumerate(own) if i not in chosen]
        validation += [e for i, e in enumerate(own) if i in chosen]
    if validation:
        log.info("Validation: %d pictures not trained on", len(validation))
    return train, validation


@dataclass
class ValidationSet:
    """The fixed inputs of every evaluation (on the CPU)."""

    latents: torch.Tensor          # [N, C, h, w], scaled
    input_ids: torch.Tensor        # [N, 77]
    noise: torch.Tensor            # [T, N, C, h, w]
    timesteps: list[int]
    paths: list[Path]


@torch.no_grad()
def build_validation_set(examples: list[Example], model, *, resolution: int, center_crop: bool,
                         device: torch.device) -> ValidationSet:
    """Encode the validation pictures with `model` (a WorkingModel, VAE still on `device`) and fix the noise.
    Raises ConfigError when a picture can no longer be read."""
    from ..errors import ConfigError

    vae_dtype = next(model.vae.parameters()).dtype
    latents = []
    for start in range(0, len(examples), ENCODE_BATCH):
        pixels = []
        for example in examples[start:start + ENCODE_BATCH]:
            image = load_image(example.image_path)
            if image is None:
                raise ConfigError(f"{example.image_path}: validation picture cannot be read; restore or remove it")
            pixels.append(to_tensor(resize_to(image, (resolution, resolution), center_crop=center_crop)))
        encoded = model.vae.encode(torch.stack(pixels).to(device, vae_dtype)).latent_dist.mean
        latents.append(encoded.float().cpu() * model.latent_scale)
    latents = torch.cat(latents)
    ids = model.tokenizer([e.prompt for e in examples], padding="max_length", truncation=True,
                          max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
    generator = torch.Generator("cpu").manual_seed(VALIDATION_SEED)
    noise = torch.randn((len(VALIDATION_TIMESTEPS), *latents.shape), generator=generator)
    steps = model.noise_scheduler.config.num_train_timesteps
    timesteps = [min(steps - 1, int(fraction * steps)) for fraction in VALIDATION_TIMESTEPS]
    return ValidationSet(latents, ids, noise, timesteps, [e.image_path for e in examples])


@torch.no_grad()
def validation_loss(vset: ValidationSet, unet, text_encoder, noise_scheduler, *, device: torch.device,
                    autocast, batch_size: int = 4) -> float:
    """The mean loss of `unet`/`text_encoder` (unwrapped) on the validation set; the same inputs every time."""
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    total, count = 0.0, 0
    try:
        with autocast():
            for start in range(0, vset.latents.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                latents = vset.latents[rows].to(device)
                hidden = text_encoder(vset.input_ids[rows].to(device))[0]
                for t, noise in zip(vset.timesteps, vset.noise[:, rows]):
                    noise = noise.to(device)
                    timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
                    target = training_target(noise_scheduler, latents, noise, timesteps)
                    error = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
                    total += float(error.sum())
                    count += latents.shape[0]
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return total / max(count, 1)


@dataclass
class Validator:
    """When to evaluate, what came out, and which step (and saved file) was best."""

    vset: ValidationSet
    every: int                       # Validation Frequency; 0: only at saves and at the end
    among_saves: bool                # saving every N steps: the best is chosen among the saved steps
    history: list[tuple[int, float]] = field(default_factory=list)
    saved_steps: set[int] = field(default_factory=set)
    files: dict[int, Path] = field(default_factory=dict)

    def due(self, step: int, *, saving: bool, last: bool) -> bool:
        return saving or last or bool(self.every and step % self.every == 0)

    def record(self, step: int, loss: float, *, saved: bool) -> None:
        self.history.append((step, loss))
        if saved:
            self.saved_steps.add(step)
        log.info("Validation loss at step %d: %.6f", step, loss)

    def best(self) -> tuple[int, float] | None:
        """(step, validation loss) with the lowest loss (among saved steps when saving every N steps)."""
        pool = [(s, v) for s, v in self.history if math.isfinite(v) and (not self.among_saves or s in self.saved_steps)]
        return min(pool, key=lambda item: (item[1], item[0])) if pool else None

    def best_file(self) -> Path | None:
        """The LoRA saved at the best step so far, if one was."""
        best = self.best()
        return self.files.get(best[0]) if best is not None else None


def check_validation_dirs(concepts: list[Concept], model_dir: Path) -> None:
    """Before anything is written: every Validation Directory named has readable pictures.
    Raises ConfigError naming the concept's Validation Directory."""
    for index, concept in enumerate(concepts):
        if concept.is_set and concept.validation_data_dir.strip():
            validation_examples(concept, index, model_dir)


def validation_examples(concept: Concept, index: int, model_dir: Path) -> list[Example]:
    """The pictures of a concept's Validation Directory with their prompts (as its own pictures get them).
    Raises ConfigError naming the Validation Directory when it is missing, empty or unreadable."""
    from ..errors import ConfigError

    folder = dataclasses.replace(concept, instance_data_dir=concept.validation_data_dir,
                                 num_class_images=0, num_class_images_per_image=0)
    try:
        return instance_examples(folder, index, model_dir)[1]
    except ConfigError as e:
        message = str(e).replace("Dataset Directory ('instance_data_dir')", "Validation Directory ('validation_data_dir')")
        raise ConfigError(message.replace("choose the folder with the pictures to train on",
                                          "choose a folder of pictures to validate on, or leave it blank")) from None


def evaluate(run, validator: Validator | None, step: int, *, saving: bool) -> float | None:
    """The validation loss after `step` when it is due (None otherwise), with the EMA weights when on
    (what a save writes); recorded in `validator`."""
    from .ema import ema_applied

    last = step >= run.total_steps
    if validator is None or not validator.due(step, saving=saving, last=last):
        return None
    unwrap = run.accelerator.unwrap_model
    with ema_applied(run.ema):
        loss = validation_loss(validator.vset, unwrap(run.unet), unwrap(run.text_encoder), run.model.noise_scheduler,
                               device=run.accelerator.device, autocast=run.accelerator.autocast,
                               batch_size=run.params.train_batch_size)
    validator.record(step, loss, saved=saving or last)
    return loss


def result_fields(validator: Validator | None) -> dict:
    """TrainResult's val_losses, best_step and best_lora (empty without validation)."""
    if validator is None:
        return {}
    best = validator.best()
    return {"val_losses": list(validator.history), "best_step": best[0] if best else None,
            "best_lora": validator.best_file()}


def best_line(validator: Validator, lifetime_start: int) -> str | None:
    """"Best validation loss ... at step ...", naming the LoRA saved at that step when there is one."""
    best = validator.best()
    if best is None:
        return None
    step, loss = best
    path = validator.best_file()
    where = f": {path.name}" if path is not None else ""
    return f"Best validation loss {loss:.6f} at step {step} (lifetime step {lifetime_start + step}){where}"
