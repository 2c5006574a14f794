"""Class (regularisation) pictures: count what is there, generate what is missing.

Prior preservation needs pictures of the class ("chibi girl") made by the
model before training, so the model keeps what it knows about the class while
it learns the instance. Existing pictures in the class folder (subfolders
included) count; the missing ones are drawn with the working model and the
concept's class prompt, class negative prompt, CFG scale and steps, at the
model's native resolution, a batch at a time. Each is saved as PNG (with the
generation parameters in its text chunk, as the web UI writes them) and a
caption `.txt` holding the prompt, under a new name, written atomically.
Picture number n of a folder is drawn from seed + n, so a rerun, or a run
resumed after a cancel, makes the same pictures. The rate (images/s, model
loading excluded) is in each progress message, the last log line and the result.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import PngImagePlugin

from .config import MODEL_INFO_FILE, Concept, ModelInfo
from .data import class_dir_for, instance_pictures, list_images, num_class_images_wanted
from .errors import ConfigError
from .fileio import atomic_path, atomic_write_text
from .host import ModelsDir
from .leftovers import clean_leftovers
from .modellock import model_lock
from .prompts import build_prompt, caption_path, read_caption, tidy, uses_filewords
from .pipeline import draw_pictures, load_pipeline

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
NAME_PREFIX = "class_"


def count_class_images(folder: str | Path) -> int:
    """Pictures in `folder` and its subfolders; 0 when it does not exist."""
    return len(list_images(folder, recursive=True))


# The clock the rate is measured with (a test replaces it to check the rate is computed from it).
_clock = time.perf_counter


class ClassImagesMade(list):
    """The number of pictures generated per concept (a list, in the order of the concepts), with the
    generation's `seconds` (drawing and saving; loading the model excluded) and `images_per_second`."""

    def __init__(self, counts, seconds: float = 0.0):
        super().__init__(counts)
        self.seconds = seconds

    @property
    def images_per_second(self) -> float:
        """Pictures made per second of generation; 0.0 when none were made."""
        return sum(self) / self.seconds if self.seconds > 0 else 0.0


def rate_text(images: int, seconds: float) -> str:
    """`N images in S s (R images/s)`: how the log, the progress and the command line say the rate."""
    rate = images / seconds if seconds > 0 else 0.0
    return f"{images} images in {seconds:.1f} s ({rate:.2f} images/s)"


@dataclass
class ClassImageJob:
    """The pictures one concept still needs: where they go and the prompt of each."""

    concept_index: int
    concept: Concept
    folder: Path
    existing: int
    prompts: list[str]


def plan_class_images(model_dir: Path, concepts: list[Concept], *, quiet: bool = False) -> list[ClassImageJob]:
    """What each concept with prior preservation is missing, logging the console lines
    `Concept requires N images.` and `Class dir DIR has M images.` (at debug level when `quiet`:
    a check before the real plan).

    Concepts without a Dataset Directory take part when they have a class
    prompt and a total; a per-image count or [filewords] needs the pictures.
    Raises ConfigError for a missing or empty Dataset Directory where one is needed,
    or a blank class prompt.
    """
    say = log.debug if quiet else log.info
    jobs = []
    for index, concept in enumerate(concepts):
        if not concept.is_set and not concept.class_prompt.strip():
            continue  # an empty slot of the UI's three concepts
        if not concept.with_prior_preservation:
            say("Concept requires 0 images.")
            continue
        pictures = instance_pictures(concept, index, model_dir) if _needs_pictures(concept) else []
        wanted = num_class_images_wanted(concept, len(pictures))
        say("Concept requires %d images.", wanted)
        folder = class_dir_for(concept, index, model_dir)
        existing = count_class_images(folder)
        say("Class dir %s has %d images.", folder, existing)
        prompts = [_generation_prompt(concept, index, pictures, n) for n in range(existing, wanted)]
        jobs.append(ClassImageJob(index, concept, folder, existing, prompts))
    return jobs


def _needs_pictures(concept: Concept) -> bool:
    """Whether the count or the prompts depend on the concept's own pictures."""
    return concept.num_class_images_per_image > 0 or uses_filewords(concept.class_prompt)


def _generation_prompt(concept: Concept, index: int, pictures: list[Path], number: int) -> str:
    # With [filewords] the class prompts follow the instance captions in turn, with the
    # instance token taken out, as the dreambooth extension does.
    caption = read_caption(pictures[number % len(pictures)]) if pictures and uses_filewords(concept.class_prompt) else ""
    prompt = build_prompt(concept.class_prompt, caption, concept, is_class=True)
    if not prompt:
        raise ConfigError(f"Concept {index + 1} Class Prompt ('class_prompt') is blank; give a class prompt "
                          "such as 'chibi girl' to generate class pictures")
    return prompt


def generate_class_images(models: ModelsDir, model_name: str, concepts: list[Concept], *, batch_size: int = 4,
                          device: str | torch.device | None = None, progress: Progress | None = None,
                          cancel: threading.Event | None = None, seed: int = 0,
                          dtype: torch.dtype | None = None) -> ClassImagesMade:
    """Generate the missing class pictures of every concept with the working model `model_name`.

    Returns the number of pictures generated per concept (a list in the order of `concepts`) with the
    seconds and images/s of the generation (`ClassImagesMade`); batches of `batch_size` pictures.
    `seed` -1 picks one at random. `dtype` defaults to fp16 on CUDA, fp32 elsewhere.
    `cancel` is checked between batches; what was made stays.
    Raises ModelError when the model does not exist, ConfigError for bad concepts, ModelBusy while
    another job is writing the model.
    """
    if batch_size < 1:
        raise ConfigError(f"Class image batch size ('sample_batch_size') must be at least 1; got {batch_size}")
    model_dir = models.existing_model_dir(model_name)
    with model_lock(model_dir, "class images"):
        return _generate(model_dir, concepts, batch_size=batch_size, device=device, progress=progress,
                         cancel=cancel, seed=seed, dtype=dtype)


def _generate(model_dir: Path, concepts: list[Concept], *, batch_size, device, progress, cancel, seed,
              dtype) -> ClassImagesMade:
    generated = ClassImagesMade([0] * len(concepts))
    for job in plan_class_images(model_dir, concepts):
        clean_leftovers(job.folder)  # a picture a killed run was writing
    jobs = [job for job in plan_class_images(model_dir, concepts) if job.prompts]
    total = sum(len(job.prompts) for job in jobs)
    if total == 0:
        return generated
    seed = random.randrange(2**31) if seed < 0 else seed
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    resolution = ModelInfo.load(model_dir / MODEL_INFO_FILE).resolution
    log.info("Generating %d class images at %dx%d on %s in %s, %d at a time", total, resolution, resolution, device,
             str(dtype).removeprefix("torch."), batch_size)
    pipe = load_pipeline(model_dir, device=device, dtype=dtype)
    done = 0
    started = _clock()
    try:
        for job in jobs:
            for start in range(0, len(job.prompts), batch_size):
                if cancel is not None and cancel.is_set():
                    log.info("Class image generation cancelled after %d of %d images", done, total)
                    return generated
                numbers = range(job.existing + start, job.existing + min(start + batch_size, len(job.prompts)))
                _generate_batch(pipe, job, list(numbers), seed, resolution)
                generated[job.concept_index] += len(numbers)
                done += len(numbers)
                generated.seconds = _clock() - started
                if progress is not None:
                    progress(f"Generating class images {done}/{total} ({generated.images_per_second:.2f} images/s)",
                             done / total)
    finally:
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if done:
            log.info("Generated %s, %d at a time, %s on %s", rate_text(done, generated.seconds), batch_size,
                     str(dtype).removeprefix("torch."), device)
    return generated


def _generate_batch(pipe, job: ClassImageJob, numbers: list[int], seed: int, resolution: int) -> None:
    concept = job.concept
    prompts = [job.prompts[n - job.existing] for n in numbers]
    negative = tidy(concept.class_negative_prompt)
    # One CPU generator per picture: picture n looks the same whatever the batch size or device.
    generators = [torch.Generator("cpu").manual_seed(seed + n) for n in numbers]
    with torch.no_grad():
        images = draw_pictures(pipe, prompt=prompts, negative_prompt=[negative] * len(prompts) if negative else None,
                               num_inference_steps=concept.class_infer_steps, guidance_scale=concept.class_guidance_scale,
                               height=resolution, width=resolution, generator=generators)
    for image, prompt, n in zip(images, prompts, numbers):
        parameters = (f"{prompt}\nNegative prompt: {negative}\nSteps: {concept.class_infer_steps}, "
                      f"CFG scale: {concept.class_guidance_scale}, Seed: {seed + n}, Size: {resolution}x{resolution}")
        save_class_image(job.folder, image, prompt, parameters=parameters)


def save_class_image(folder: Path, image, prompt: str, *, parameters: str = "") -> Path:
    """Save `image` as a new PNG in `folder` with its caption `.txt`; never overwrites.

    The name is the first free `class_NNNNN` (no picture nor caption of that
    stem), so a rerun adds files beside the old ones. Both files are written
    under temporary names and renamed into place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = _free_name(folder)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path, overwrite=False) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
        atomic_write_text(caption_path(path), prompt)
    return path


def _free_name(folder: Path) -> Path:
    taken = {p.stem for p in folder.iterdir() if p.name.startswith(NAME_PREFIX)}
    number = len(taken)
    while f"{NAME_PREFIX}{number:05d}" in taken:
        number += 1
    return folder / f"{NAME_PREFIX}{number:05d}.png"
