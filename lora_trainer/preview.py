"""One picture from a checkpoint file: proof that a merged checkpoint loads and draws.

The checkpoint is read the same way "Create Model" reads any checkpoint (its
`.yaml` beside it decides the architecture), into a temporary working model
that is deleted afterwards, so nothing is downloaded and no diffusers config
from the internet is needed.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from .checkpoint import MODEL_INFO_FILE, create_model
from .config import ModelInfo
from .fileio import atomic_path
from .host import ModelsDir
from .pipeline import draw_pictures, load_pipeline

log = logging.getLogger(__name__)


def generate_picture(checkpoint: str | Path, prompt: str, out_path: str | Path, *, seed: int = 0, steps: int = 4,
                     guidance_scale: float = 7.5, negative_prompt: str = "", device: str | None = None,
                     work_dir: str | Path | None = None) -> Path:
    """Draw one picture of `prompt` with `checkpoint` and save it as PNG at `out_path`; return that path.

    `checkpoint` is an original-layout `.safetensors`/`.ckpt` (e.g. a merged
    one) or a working-model folder. The temporary model goes under `work_dir`
    (default: the system's temporary folder; a real model needs a few GB there).
    Raises CheckpointError for an unreadable or unknown checkpoint, ModelError
    for an incomplete model folder. An existing picture at `out_path` is replaced.
    """
    source = Path(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if source.is_dir():
        image = _draw(source, prompt, seed, steps, guidance_scale, negative_prompt, device)
    else:
        with tempfile.TemporaryDirectory(prefix=".lora_trainer-preview-", dir=work_dir) as tmp:
            folder = create_model(ModelsDir.at(tmp), str(source), "preview")
            image = _draw(folder, prompt, seed, steps, guidance_scale, negative_prompt, device)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp_file:
        image.save(tmp_file, format="PNG")
    log.info("Saved a picture of %r from %s to %s", prompt, source.name, out_path)
    return out_path


def _draw(model_dir: Path, prompt: str, seed: int, steps: int, guidance_scale: float, negative_prompt: str, device: str):
    info = ModelInfo.load(model_dir / MODEL_INFO_FILE)
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = load_pipeline(model_dir, device=device, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        return draw_pictures(pipe, prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                             guidance_scale=guidance_scale, height=info.resolution, width=info.resolution,
                             generator=generator)[0]
