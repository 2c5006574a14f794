"""Helpers for the LoRA tests: adapters with non-zero weights, and independent readers of the written file."""
from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import torch

from lora_trainer.config import ModelInfo, TrainingParams
from lora_trainer.lora import TEXT_TARGETS, UNET_TARGETS, inject_lora, lora_metadata


def inject_both(unet, text, *, rank: int = 4, alpha: float = 2.0, text_rank: int | None = None):
    """Adapters on the UNet and text-encoder attention projections, as training injects them."""
    return (inject_lora(unet, UNET_TARGETS, rank=rank, alpha=alpha, prefix="lora_unet"),
            inject_lora(text, TEXT_TARGETS, rank=text_rank or rank, alpha=alpha, prefix="lora_te"))


def randomize(injected: dict, seed: int = 0, up_scale: float = 0.3) -> None:
    """Give every adapter random, non-zero down and up weights (a trained LoRA, not step 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in injected.values():
            for weight, scale in ((adapter.lora_down.weight, 1 / adapter.in_features ** 0.5),
                                  (adapter.lora_up.weight, up_scale / adapter.rank ** 0.5)):
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def metadata_for(model_dir: Path, params: TrainingParams | None = None, **kwargs) -> dict[str, str]:
    info = ModelInfo.load(model_dir / "model_info.json")
    now = time.time()
    values = dict(steps=10, epochs=2, num_images=5, started_at=now - 60, finished_at=now,
                  output_name=f"{info.model_name}_{info.lifetime_steps}")
    values.update(kwargs)
    return lora_metadata(info, params or TrainingParams(), **values)


def header_of(path: Path) -> dict:
    """The JSON header of a .safetensors file, read by hand."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def independent_addnet_hash(path: Path) -> str:
    """sha256 of the bytes after the 8-byte length and the header, read in one go."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + length:]).hexdigest()


def independent_legacy_hash(path: Path) -> str:
    data = Path(path).read_bytes()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def peft_backend_problem() -> str | None:
    """Why diffusers' `load_lora_weights` cannot run here (its peft backend), or None when it can."""
    try:
        import peft  # noqa: F401
        from diffusers.utils import USE_PEFT_BACKEND
    except ImportError as e:
        return f"diffusers' peft backend is not usable here ({e})"
    return None if USE_PEFT_BACKEND else "diffusers.utils.USE_PEFT_BACKEND is false (peft or transformers too old)"
