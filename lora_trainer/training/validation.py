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
The UNet is conditioned as in training (`loop.conditioning`): SDXL gets both
encoders' states, the pooled embedding and each picture's size/crop ids, and
with "Cache Text Encoder Outputs" the prompts come from the run's text cache.
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
from ..data import DreamBoothDataset, Example, instance_examples
from ..images import load_image, resize_to, to_tensor
from .loop import conditioning, predict
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
    conditioning: dict[str, torch.Tensor]   # "input_ids" [N, 77] (SDXL: "input_ids_2", "time_ids" [N, 6])
    prompts: list[str]
    noise: torch.Tensor            # [T, N, C, h, w]
    timesteps: list[int]
    paths: list[Path]

    def batch(self, rows: slice) -> dict:
        """The prompt-side keys of rows `rows`, as a training batch holds them."""
        return {**{key: value[rows] for key, value in self.conditioning.items()}, "prompts": self.prompts[rows]}


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
    # The token ids (and SDXL's size/crop ids) as the training data makes them, unmirrored.
    data = DreamBoothDataset(examples, [], resolution=resolution, center_crop=center_crop, hflip=False,
                             tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, time_ids=model.info.family.time_ids)
    rows = [data.conditioning(example, (resolution, resolution), False) for example in examples]
    generator = torch.Generator("cpu").manual_seed(VALIDATION_SEED)
    noise = torch.randn((len(VALIDATION_TIMESTEPS), *latents.shape), generator=generator)
    steps = model.noise_scheduler.config.num_train_timesteps
    timesteps = [min(steps - 1, int(fraction * steps)) for fraction in VALIDATION_TIMESTEPS]
    conditions = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return ValidationSet(latents, conditions, [e.prompt for e in examples], noise, timesteps,
                         [e.image_path for e in examples])


@torch.no_grad()
def validation_loss(vset: ValidationSet, unet, text_encoders: list, noise_scheduler, *, family,
                    device: torch.device, autocast, batch_size: int = 4, text_cache=None) -> float:
    """The mean loss of `unet` and `text_encoders` (unwrapped, in `family`'s order) on the validation set;
    the same inputs every time. `text_cache` (training.loop.TextCache) holds the prompts' encodings when
    "Cache Text Encoder Outputs" is on."""
    modules = [unet, *text_encoders]
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    total, count = 0.0, 0
    try:
        with autocast():
            for start in range(0, vset.latents.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                latents = vset.latents[rows].to(device)
                batch = vset.batch(rows)
                hidden, added = conditioning(family, text_encoders, batch, device, train_text=False,
                                             text_cache=text_cache)
                for t, noise in zip(vset.timesteps, vset.noise[:, rows]):
                    noise = noise.to(device)
                    timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    prediction = predict(unet, noisy, timesteps, hidden, added)
                    target = training_target(noise_scheduler, latents, noise, timesteps)
                    error = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
                    total += float(error.sum())
                    count += latents.shape[0]
    finally:
        for module, was in zip(modules, was_training):
            module.train(was)
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
        loss = validation_loss(validator.vset, unwrap(run.unet), [unwrap(e) for e in run.text_encoders],
                               run.model.noise_scheduler, family=run.model.info.family,
                               device=run.accelerator.device, autocast=run.accelerator.autocast,
                               batch_size=run.params.train_batch_size, text_cache=run.text_cache)
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
