"""Named option sets: the how-to's settings for an 8 GB NVIDIA card.

`PRESET_8GB` is what WORKFLOW.md step 4 tells users to tick; on a CPU the
GPU-only parts (fp16, 8-bit Adam) are swapped for what the CPU can do, so the
same preset can be tried anywhere. If it still runs out of memory, untick
Train Text Encoder (`PRESET_8GB_NO_TEXT`).
"""
from __future__ import annotations

import dataclasses

from ..config import TrainingParams

PRESET_8GB = {"use_lora": True, "mixed_precision": "fp16", "attention": "flash_attention", "use_8bit_adam": True,
              "gradient_checkpointing": True, "cache_latents": True, "train_batch_size": 1, "train_text_encoder": True}
PRESET_8GB_NO_TEXT = {**PRESET_8GB, "train_text_encoder": False}
CPU_SWAPS = {"mixed_precision": "bf16", "use_8bit_adam": False}


def with_preset(params: TrainingParams, preset: dict, *, cuda: bool = True) -> TrainingParams:
    """`params` with the preset's values (on a CPU, fp16 and 8-bit Adam become bf16 and plain AdamW)."""
    values = {**preset, **({} if cuda else {k: v for k, v in CPU_SWAPS.items() if k in preset})}
    return dataclasses.replace(params, **values)
