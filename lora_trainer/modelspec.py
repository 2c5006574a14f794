"""Stability AI's ModelSpec metadata (`modelspec.*`), which kohya's tools, ComfyUI and civitai read
to tell which base model a checkpoint or a LoRA belongs to.

Values as kohya sd-scripts writes them for SD 1.x/2.x: checkpoints name the
Stability AI implementation, LoRAs `diffusers` and an architecture ending in `/lora`.
"""
from __future__ import annotations

import datetime

from .families import family_of

STABILITY_AI = "https://github.com/Stability-AI/generative-models"


def modelspec(model_type: str, resolution: int, prediction_type: str, title: str, *, lora: bool = False,
              timestamp: float | None = None) -> dict[str, str]:
    """The `modelspec.*` keys of a checkpoint (or, with `lora`, a LoRA) of `model_type` ("sd1", "sd2-v", ...)."""
    when = datetime.datetime.fromtimestamp(timestamp) if timestamp is not None else datetime.datetime.now()
    architecture = family_of(model_type).modelspec_architecture(model_type)
    return {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture + ("/lora" if lora else ""),
            "modelspec.implementation": "diffusers" if lora else STABILITY_AI,
            "modelspec.title": title, "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
            "modelspec.date": when.isoformat(timespec="seconds")}
