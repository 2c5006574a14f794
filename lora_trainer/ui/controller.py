"""What each button and dropdown of the tab does, on named widget values.

Every method takes and returns plain values keyed by widget key (see
`fields.Widgets`); `layout.py` wires them to gradio. Long work runs as a job
of the `JobRunner`; a click only starts it and says so.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .. import presets, tasks
from ..config import (CONCEPTS_FILE, MODEL_INFO_FILE, SECOND_TEXT_ENCODER_FIELDS, ModelInfo, TrainingParams,
                      load_concepts, save_concepts)
from ..errors import LoraTrainerError, ModelError
from ..host import validate_model_name
from ..hosts import Host
from ..jobs import JobBusy, JobRunner, JobState
from ..progress import TrainResult
from . import fields
from .fields import concepts_from_named, params_from_named

log = logging.getLogger(__name__)

INFO_FIELDS = ("model_name", "revision", "lifetime_steps", "model_type", "source_checkpoint")
NO_LORA = ""  # the "Lora Model" choice that exports the model itself
# How long a click waits for its job before answering "Started ...": a refusal comes back as the outcome.
QUICK_SECONDS = 0.5


class Controller:
    """The tab's behaviour for one host; one JobRunner shared by every browser tab."""

    def __init__(self, host: Host, runner: JobRunner | None = None):
        self.host = host
        self.runner = runner or JobRunner(host)
        self.quick_seconds = QUICK_SECONDS

    @property
    def models(self):
        return self.host.models

    # -- lists and model info ----------------------------------------------------
    def model_choices(self) -> list[str]:
        return self.models.list_models()

    def lora_choices(self) -> list[str]:
        return [NO_LORA] + self.models.list_loras()

    def source_choices(self) -> list[str]:
        return self.models.list_checkpoints()

    def model_info(self, model_name: str) -> ModelInfo | None:
        if not model_name or model_name not in self.model_choices():
            return None
        try:
            return ModelInfo.load(self.models.model_dir(model_name) / MODEL_INFO_FILE)
        except LoraTrainerError as e:
            log.warning("%s", e)
            return None

    def info_values(self, model_name: str) -> dict[str, str]:
        """The left column's model info, keyed "info.<field>"; blank for no model."""
        info = self.model_info(model_name)
        return {f"info.{name}": "" if info is None else str(getattr(info, name)) for name in INFO_FIELDS}

    def shown_params(self, model_name: str) -> dict[str, bool]:
        """Whether each Parameters widget that only some models use is shown for `model_name`: the Lora
        Text Encoder 2 fields for models with two text encoders (SDXL), and while no model is chosen."""
        info = self.model_info(model_name)
        two = info is None or len(info.family.text_encoders) > 1
        return {fields.params_key(name): two for name in SECOND_TEXT_ENCODER_FIELDS}

    def latest_lora(self, model_name: str) -> str:
        """The model's newest LoRA as a "Lora Model" choice, or NO_LORA when it has none."""
        info = self.model_info(model_name)
        if info is None:
            return NO_LORA
        from ..merge import find_lora

        try:
            path = find_lora(self.models, info)
        except LoraTrainerError:
            return NO_LORA
        try:
            return path.resolve().relative_to(self.models.lora.resolve()).as_posix()
        except ValueError:
            return str(path)

    def settings_values(self, model_name: str, keys: list[str]) -> tuple[str, dict[str, Any]]:
        """The Parameters and Concepts widgets among `keys` as `model_name` holds them, and a message.

        A model without saved parameters gets its defaults (`ModelInfo.default_params`) and
        empty concepts, so nothing of the previously chosen model is carried over (and
        written into this one by Train). The message is empty unless a saved file is broken.
        """
        info = self.model_info(model_name)
        params, concepts, message = None, None, ""
        if info is not None:
            try:
                params, concepts = tasks.load_settings(self.models, model_name)
            except LoraTrainerError as e:
                message = f"Error: {e}"
        if params is None:
            params = TrainingParams() if info is None else info.default_params()
        values = fields.named_from_params(params, keys)
        try:
            values.update(fields.named_from_concepts(concepts or [], keys))
        except LoraTrainerError as e:
            message = f"Error: {e}"
            values.update(fields.named_from_concepts([], keys))
        return message, values

    # -- jobs --------------------------------------------------------------------
    def _start(self, kind: str, name: str, make_job) -> str:
        """Build the job (which may raise for bad settings), then start it; say what happened.

        A job that ends within QUICK_SECONDS (a refusal, a small export) is answered with its
        outcome at once, so the message never says "Started" about a job that has already ended.
        """
        try:
            job = make_job()
            self.runner.start(kind, name, job)
        except JobBusy as e:
            return str(e)
        except LoraTrainerError as e:
            return f"Error: {e}"
        if self.runner.wait(self.quick_seconds):
            return self.outcome(self.state())
        return f"Started {name}. Progress is on the Train tab."

    def answered_by_click(self, state: JobState) -> bool:
        """Whether the click that started `state`'s job answered with its outcome itself.

        The click waits `quick_seconds` from after the job's start, so a job that ended within
        `quick_seconds` of its start was always answered there; the poll then leaves the Message
        box alone (a late poll would otherwise put the outcome back over the user's next click).
        """
        return bool(state.started and state.finished and state.finished - state.started < self.quick_seconds)

    @staticmethod
    def outcome(state: JobState) -> str:
        """The Message box's line for an ended job: what it wrote, or its one-line error."""
        return state.status[:1].upper() + state.status[1:]

    def create(self, named: dict[str, Any]) -> str:
        source, name = (named.get("create.source") or "").strip(), (named.get("create.name") or "").strip()
        if not source:
            return "Error: Source Checkpoint: choose a checkpoint"
        return self._start("create", f"create model '{name}'",
                           lambda: tasks.create(self.models, source, validate_model_name(name),
                                                extract_ema=bool(named.get("create.extract_ema")),
                                                overwrite=bool(named.get("create.overwrite"))))

    def train(self, named: dict[str, Any]) -> str:
        model = _chosen_model(named)
        return self._start("train", f"train '{model}'", lambda: tasks.train(
            self.models, _existing(self.models, model), params_from_named(named), concepts_from_named(named)))

    def add_to_queue(self, named: dict[str, Any]) -> str:
        """"Add to Queue": the chosen model with the tab's settings joins the queue, which starts when idle."""
        try:
            model = _existing(self.models, _chosen_model(named))
            tasks.open_queue(self.models).add(model, params_from_named(named),
                                               tasks.used_concepts(concepts_from_named(named)))
        except LoraTrainerError as e:
            return f"Error: {e}"
        return self.run_queue(added=model)

    def run_queue(self, added: str | None = None) -> str:
        """"Run Queue": train the queue's waiting items one after another (those left by a restart too)."""
        queue = tasks.open_queue(self.models)
        waiting = len(queue.pending())
        head = f"Added '{added}' to the queue. " if added else ""
        if not waiting:
            return head + "The queue is empty."
        state = self.runner.snapshot()
        if state.running and state.name == tasks.QUEUE_JOB:
            return head + f"{waiting} waiting; they run after the current one."
        if state.running:
            return head + f"{waiting} waiting; press Run Queue when {state.name} has ended."
        return head + self._start("train", tasks.QUEUE_JOB, lambda: tasks.run_queue(self.models))

    def class_images(self, named: dict[str, Any]) -> str:
        model = _chosen_model(named)
        return self._start("class images", f"generate class images for '{model}'", lambda: tasks.class_images(
            self.models, _existing(self.models, model), concepts_from_named(named)))

    def generate_ckpt(self, named: dict[str, Any]) -> str:
        model = _chosen_model(named)
        return self._start("merge", f"generate ckpt of '{model}'", lambda: tasks.generate_ckpt(
            self.models, _existing(self.models, model), lora=named.get("lora") or NO_LORA,
            half=bool(named.get("half")), subdir=bool(named.get("subdir")),
            custom_name=named.get("custom_model_name") or "", overwrite=bool(named.get("generate_ckpt.overwrite")),
            into=named.get("into") or "", unet_weight=_number(named, "unet_weight", 1.0),
            text_weight=_number(named, "text_weight", 1.0), fmt=named.get("fmt") or "safetensors"))

    def check_memory(self, named: dict[str, Any]) -> str:
        """What the chosen parameters hold on the GPU before activations, and whether that fits."""
        try:
            return tasks.check_memory(self.models, _existing(self.models, _chosen_model(named)), params_from_named(named))
        except LoraTrainerError as e:
            return f"Error: {e}"

    def cancel(self) -> str:
        """Ask the job to stop: "Cancelling ..."; the poll replaces it with the outcome when the job ends."""
        if not self.runner.cancel():
            return "No job is running."
        return f"Cancelling {self.state().name}."

    def state(self) -> JobState:
        return self.runner.snapshot()

    # -- settings ----------------------------------------------------------------
    def save_params(self, named: dict[str, Any]) -> str:
        try:
            model_dir = tasks.save_settings(self.models, _existing(self.models, _chosen_model(named)),
                                            params_from_named(named),
                                            concepts_from_named(named))
        except LoraTrainerError as e:
            return f"Error: {e}"
        return f"Saved parameters and concepts to {model_dir}"

    def load_params(self, named: dict[str, Any], keys: list[str]) -> tuple[str, dict[str, Any]]:
        """Message and the new values of `keys` (params and concept widgets) from the model folder."""
        try:
            params, concepts = tasks.load_settings(self.models, _existing(self.models, _chosen_model(named)))
        except LoraTrainerError as e:
            return f"Error: {e}", {}
        if params is None and concepts is None:
            return f"Model {named.get('model')!r} has no saved parameters yet; press Save Params or Train first.", {}
        values = {}
        if params is not None:
            values.update(fields.named_from_params(params, keys))
        if concepts is not None:
            try:
                values.update(fields.named_from_concepts(concepts, keys))
            except LoraTrainerError as e:
                return f"Error: {e}", {}
        return f"Loaded the parameters of {named.get('model')!r}", values

    def apply_preset(self, preset: str, named: dict[str, Any], keys: list[str],
                     disabled: dict[str, dict[Any, str]], *, cuda: bool = True) -> tuple[str, dict[str, Any]]:
        """The params widgets with preset `preset` applied; the message names every choice changed
        because of this machine and every option left out because it cannot run here."""
        try:
            params, notes = presets.apply_preset_noted(params_from_named(named), preset, cuda=cuda)
        except LoraTrainerError as e:
            return f"Error: {e}", {}
        params, left_out = _without_disabled(params, disabled)
        message = f"Applied preset {preset!r}."
        if notes:
            message += " Changed for this machine: " + "; ".join(notes) + "."
        message += "".join(f" {n}" for n in left_out)
        return message, fields.named_from_params(params, keys)

    def concepts_path(self, named: dict[str, Any]) -> Path:
        text = (named.get("concepts_file") or "").strip()
        if text:
            return Path(text).expanduser()
        return self.models.existing_model_dir(_existing(self.models, _chosen_model(named))) / CONCEPTS_FILE

    def load_concepts(self, named: dict[str, Any], keys: list[str]) -> tuple[str, dict[str, Any]]:
        try:
            path = self.concepts_path(named)
            values = fields.named_from_concepts(load_concepts(path), keys)
        except LoraTrainerError as e:
            return f"Error: {e}", {}
        return f"Loaded concepts from {path}", values

    def save_concepts(self, named: dict[str, Any]) -> str:
        try:
            path = self.concepts_path(named)
            concepts = tasks.without_empty_tail(concepts_from_named(named))
            save_concepts(concepts, path)
        except LoraTrainerError as e:
            return f"Error: {e}"
        return f"Saved {len(concepts)} concept(s) to {path}"

    # -- after a job -----------------------------------------------------------------
    def selection_after(self, state: JobState) -> dict[str, str]:
        """Which model and LoRA to select once `state`'s job has ended."""
        out = {}
        if state.error:
            return out
        if state.kind == "create" and isinstance(state.result, Path):
            out["model"] = state.result.name
        if state.kind == "train" and isinstance(state.result, TrainResult) and state.result.lora_path:
            try:
                out["lora"] = Path(state.result.lora_path).resolve().relative_to(self.models.lora.resolve()).as_posix()
            except ValueError:
                out["lora"] = str(state.result.lora_path)
        return out


def _number(named: dict[str, Any], key: str, default: float) -> float:
    value = named.get(key)
    return default if value is None or value == "" else float(value)


def _chosen_model(named: dict[str, Any]) -> str:
    return (named.get("model") or "").strip()


def _existing(models, model: str) -> str:
    """The model's name when it exists; raises ModelError saying what to do otherwise."""
    if not model:
        raise ModelError("Model: choose a model (make one on the Create Model tab)")
    models.existing_model_dir(model)
    return model




def _without_disabled(params: TrainingParams, disabled: dict[str, dict[Any, str]]) -> tuple[TrainingParams, list[str]]:
    """Options that cannot run here switched back to their default, with a note for each."""
    changes, notes = {}, []
    defaults = TrainingParams()
    for name, blocked in disabled.items():
        if getattr(params, name) in blocked:
            changes[name] = getattr(defaults, name)
            notes.append(f"{blocked[getattr(params, name)]}; left at {changes[name]!r}.")
    return dataclasses.replace(params, **changes), notes
