"""The four things the buttons do, as jobs for `JobRunner`: each takes `(report, cancel)`.

"Create", "Train", "Generate Class Images" and "Generate Ckpt" call the core
with settings already turned into config objects; the steps that report a
`(message, fraction)` pair are translated into `Progress` reports here. No
gradio, no web UI: the UI builds the configs and starts these. "Check GPU
Memory" and the settings files are quick calls, not jobs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from .config import CONCEPTS_FILE, MODEL_INFO_FILE, PARAMS_FILE, Concept, ModelInfo, TrainingParams, save_concepts
from .errors import ConfigError, ModelError
from .fileio import atomic_write_text
from .host import ModelsDir
from .progress import CancelFlag, Progress, Report, TrainResult

log = logging.getLogger(__name__)

STEPS = 1000  # the resolution of a fraction-only progress bar


def fraction_reporter(report: Report, job: str) -> Callable[[str, float], None]:
    """A `progress(message, fraction)` callback of the core that reports `Progress` with time left."""
    started = time.monotonic()

    def progress(message: str, fraction: float) -> None:
        fraction = max(0.0, min(1.0, float(fraction)))
        elapsed = time.monotonic() - started
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        report(Progress(job=job, message=message, step=round(fraction * STEPS), total_steps=STEPS, seconds_left=left))

    return progress


def create(models: ModelsDir, source: str, name: str, *, extract_ema: bool = False, overwrite: bool = False):
    """"Create": the job that converts `source` into the working model `name`."""
    from .checkpoint import create_model

    def job(report: Report, cancel: CancelFlag) -> Path:
        return create_model(models, source, name, extract_ema=extract_ema, overwrite=overwrite,
                            progress=fraction_reporter(report, "create"))

    return job


def save_settings(models: ModelsDir, model_name: str, params: TrainingParams, concepts: list[Concept]) -> Path:
    """"Save Params": write params.json and concepts_list.json into the model folder; return the folder."""
    model_dir = models.existing_model_dir(model_name)
    params.save(model_dir / PARAMS_FILE)
    save_concepts(without_empty_tail(concepts), model_dir / CONCEPTS_FILE)
    return model_dir


def without_empty_tail(concepts: list[Concept]) -> list[Concept]:
    """The UI's concept slots up to the last one that holds anything (slot numbers are kept)."""
    concepts = list(concepts)
    while concepts and concepts[-1] == Concept():
        concepts.pop()
    return concepts


def load_settings(models: ModelsDir, model_name: str) -> tuple[TrainingParams | None, list[Concept] | None]:
    """"Load Params": what the model folder holds (None for a file that is not there).

    Raises ModelError for a missing model, ConfigError for a broken file.
    """
    from .config import load_concepts

    model_dir = models.existing_model_dir(model_name)
    params = TrainingParams.load(model_dir / PARAMS_FILE) if (model_dir / PARAMS_FILE).is_file() else None
    concepts = load_concepts(model_dir / CONCEPTS_FILE) if (model_dir / CONCEPTS_FILE).is_file() else None
    return params, concepts


def used_concepts(concepts: list[Concept]) -> list[Concept]:
    """The UI's concept slots that are filled in. Raises ConfigError when none is."""
    filled = [c for c in concepts if c.is_set]
    if not filled:
        raise ConfigError("Concepts: Concept 1 needs a Dataset Directory (the folder with the pictures to teach)")
    return filled


def train(models: ModelsDir, model_name: str, params: TrainingParams, concepts: list[Concept], *, device=None):
    """"Train": the job that saves the settings beside the model, then trains it.

    The checks that need no weights run here, before the job starts, so a refused run never
    makes the host give up its GPU (the web UI unloads its checkpoint for a training job).
    Raises ConfigError or ModelError (`train.check_before_loading`).
    """
    concepts = used_concepts(concepts)
    try:
        from .train import check_before_loading
    except ImportError as e:
        raise ModelError(f"Train: the training module cannot be loaded ({e})") from None
    check_before_loading(models, model_name, params, concepts, device)

    def job(report: Report, cancel: CancelFlag) -> TrainResult:
        try:
            from .train import train as train_model
        except ImportError as e:
            raise ModelError(f"Train: the training module cannot be loaded ({e})") from None
        save_settings(models, model_name, params, concepts)
        return train_model(models, model_name, params, concepts, report=report, cancel=cancel, device=device)

    return job


QUEUE_JOB = "training queue"


def open_queue(models: ModelsDir):
    """The models' training queue (`<models>/lora_trainer/queue.json`), read afresh."""
    from .training_queue import TrainingQueue

    return TrainingQueue.at(models)


def run_queue(models: ModelsDir, *, device=None):
    """"Run Queue": the job that trains the queue's waiting items one after another; ends with a summary."""
    def job(report: Report, cancel: CancelFlag) -> None:
        from .training_queue import run_queue as run_items

        ran = run_items(models, open_queue(models), report=report, cancel=cancel, device=device)
        summary = "; ".join(item.describe() for item in ran) or "nothing was waiting"
        log.info("Queue finished: %s", summary)
        report(Progress(job="train", message=f"Queue finished: {summary}"))

    return job


def check_memory(models: ModelsDir, model_name: str, params: TrainingParams) -> str:
    """"Check GPU Memory": what `params` hold on a GPU before activations, the predicted peak, and whether
    it fits (no job: file headers and one training step on fake tensors, seconds on the CPU)."""
    from .training.memory import memory_report

    return memory_report(models.existing_model_dir(model_name), params)


def class_images(models: ModelsDir, model_name: str, concepts: list[Concept], *, device=None):
    """"Generate Class Images": the job that makes the missing class pictures of every concept.

    A concept needs no Dataset Directory here when its class prompt and total say what to make.
    Empty slots stay in the list, so Concept N uses the same `classifiers_<N-1>` folder as training.
    """
    if not any(c.is_set or (c.class_prompt.strip() and c.with_prior_preservation) for c in concepts):
        raise ConfigError("Concepts: Concept 1 needs a Class Prompt and a Total Number of Class/Reg Images "
                          "(or a Dataset Directory) to generate class images")

    def job(report: Report, cancel: CancelFlag) -> list[int]:
        from .classimages import generate_class_images, rate_text

        counts = generate_class_images(models, model_name, concepts, device=device, cancel=cancel,
                                       progress=fraction_reporter(report, "class images"))
        message = f"Generated {rate_text(sum(counts), counts.seconds)}" if sum(counts) else "Generated 0 class images"
        report(Progress(job="class images", message=message, step=1, total_steps=1))
        return counts

    return job


def generate_ckpt(models: ModelsDir, model_name: str, *, lora: str = "", half: bool = False, subdir: bool = False,
                  custom_name: str = "", overwrite: bool = False, into: str = "", unet_weight: float = 1.0,
                  text_weight: float = 1.0, fmt: str = "safetensors"):
    """"Generate Ckpt": merge `lora` into the model (or into the checkpoint `into`) with the given
    weights; with no LoRA chosen, write the model itself as a checkpoint."""

    def job(report: Report, cancel: CancelFlag) -> Path:
        progress = fraction_reporter(report, "merge")
        if lora.strip():
            from .merge import merge_lora

            note = lora_of_another_model(models, model_name, lora)
            if note:
                log.warning("%s", note)
                report(Progress(job="merge", message=note, note=note))

            return merge_lora(models, model_name, lora=lora, into=into.strip() or None, unet_weight=unet_weight,
                              text_weight=text_weight, half=half, subdir=subdir, fmt=fmt,
                              custom_name=custom_name or None, overwrite=overwrite, progress=progress)
        if into.strip():
            raise ConfigError("Merge Into: choose a Lora Model to merge into another checkpoint")
        return export_model(models, model_name, half=half, subdir=subdir, custom_name=custom_name, fmt=fmt,
                            overwrite=overwrite, progress=progress)

    return job


def lora_of_another_model(models: ModelsDir, model_name: str, lora: str) -> str:
    """A line saying so when the chosen LoRA was trained on another working model, else "".

    The LoRA's `lora_trainer_model` metadata names its model; a LoRA without it (made by
    another tool) or that cannot be read says nothing here (the merge itself reports that).
    """
    from .merge import find_lora

    try:
        path = find_lora(models, ModelInfo.load(models.existing_model_dir(model_name) / MODEL_INFO_FILE), lora)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            trained_on = (f.metadata() or {}).get("lora_trainer_model", "")
    except Exception:  # noqa: BLE001 - the merge reports an unreadable or missing LoRA with its own error
        return ""
    if trained_on and trained_on != model_name:
        return f"LoRA {path.stem} was trained on {trained_on!r}; merged into {model_name!r}"
    return ""


def export_model(models: ModelsDir, model_name: str, *, half: bool = False, subdir: bool = False, custom_name: str = "",
                 fmt: str = "safetensors", overwrite: bool = False,
                 progress: Callable[[str, float], None] | None = None) -> Path:
    """The working model as one checkpoint `[<name>/]<name>_<lifetime steps>.<fmt>` in Stable-diffusion.

    Raises ModelError for a missing model, ConfigError for a bad name and
    FileExistsError when the file exists and `overwrite` is False.
    """
    from .checkpoint import export_checkpoint
    from .merge import model_yaml, output_path

    model_dir = models.existing_model_dir(model_name)
    info = ModelInfo.load(model_dir / MODEL_INFO_FILE)
    merged_name = output_path(models, info, custom_name=custom_name, subdir=subdir, fmt=fmt)
    out_path = merged_name.with_name(merged_name.name.replace("_lora.", "."))
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; choose another Custom Model Name or tick Overwrite")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"lora_trainer_model": info.model_name, "lora_trainer_lifetime_steps": str(info.lifetime_steps)}
    export_checkpoint(model_dir, out_path, fmt=fmt, half=half, metadata=metadata, overwrite=overwrite,
                      progress=progress or (lambda m, f: None))
    yaml_text = model_yaml(model_dir, info)
    if yaml_text is not None:
        atomic_write_text(out_path.with_suffix(".yaml"), yaml_text)
    log.info("Wrote %s", out_path)
    return out_path
