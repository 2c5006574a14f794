"""Named sets of training parameters the "Parameters" tab offers.

A preset changes only the fields it names; everything else keeps the value the
user has. "8 GB GPU" is what the reference material recommends for an 8 GB
NVIDIA card: LoRA, fp16, 8-bit Adam, memory-efficient attention, gradient
checkpointing, cached latents, batch 1, rank 4. "4 GB card" is the same with the frozen base
weights stored in float8 (fp8.py). On a CPU the GPU-only parts
become what runs there: fp16 becomes bf16, and 8-bit Adam plain AdamW unless the
installed bitsandbytes runs on the CPU (>= 0.50), so a preset can be tried anywhere.
"""
from __future__ import annotations

import dataclasses

from .config import TrainingParams
from .errors import ConfigError
from .optional import bitsandbytes_runs_on_cpu

PRESETS: dict[str, dict] = {
    "Defaults": {f.name: f.default for f in dataclasses.fields(TrainingParams) if f.name != "custom_model_name"},
    "8 GB GPU": {
        "use_lora": True, "mixed_precision": "fp16", "use_8bit_adam": True, "attention": "flash_attention",
        "gradient_checkpointing": True, "cache_latents": True, "train_batch_size": 1,
        "gradient_accumulation_steps": 1, "rank": 4, "text_encoder_rank": 4, "lora_alpha": 4.0,
        "text_encoder_alpha": 4.0, "unet_learning_rate": 1e-4, "text_encoder_learning_rate": 5e-5,
        "resolution": 512, "train_text_encoder": True,
    },
    "Low memory (6 GB, no text encoder)": {
        "use_lora": True, "mixed_precision": "fp16", "use_8bit_adam": True, "attention": "flash_attention",
        "gradient_checkpointing": True, "cache_latents": True, "train_batch_size": 1, "rank": 4,
        "resolution": 512, "train_text_encoder": False,
    },
    "4 GB card": {
        "use_lora": True, "mixed_precision": "fp16", "base_weights": "fp8", "use_8bit_adam": True,
        "attention": "flash_attention", "gradient_checkpointing": True, "cache_latents": True,
        "train_batch_size": 1, "gradient_accumulation_steps": 1, "rank": 4, "text_encoder_rank": 4,
        "lora_alpha": 4.0, "text_encoder_alpha": 4.0, "resolution": 512, "train_text_encoder": True,
    },
    "12 GB+ GPU": {
        "use_lora": True, "mixed_precision": "fp16", "use_8bit_adam": False, "attention": "flash_attention",
        "gradient_checkpointing": False, "cache_latents": True, "train_batch_size": 2, "rank": 8,
        "text_encoder_rank": 8, "lora_alpha": 8.0, "text_encoder_alpha": 8.0, "resolution": 512,
        "train_text_encoder": True,
    },
    "CPU / test": {
        "use_lora": True, "mixed_precision": "no", "use_8bit_adam": False, "attention": "default",
        "gradient_checkpointing": False, "cache_latents": True, "train_batch_size": 1, "rank": 2,
        "text_encoder_rank": 2, "lora_alpha": 2.0, "text_encoder_alpha": 2.0, "resolution": 64,
        "num_train_epochs": 1, "max_train_steps": 4, "save_preview_every_n_steps": 0, "save_every_n_steps": 0,
        "use_buckets": False,
    },
}


def preset_names() -> list[str]:
    return list(PRESETS)


def apply_preset(params: TrainingParams, name: str, *, cuda: bool = True) -> TrainingParams:
    """`params` with the fields of preset `name` changed (without `cuda`, GPU-only choices swapped).

    Raises ConfigError for an unknown name.
    """
    if name not in PRESETS:
        raise ConfigError(f"Preset: {name!r} is not one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    if not cuda and values.get("mixed_precision") == "fp16":
        values["mixed_precision"] = "bf16"
    if not cuda and values.get("use_8bit_adam") and not bitsandbytes_runs_on_cpu():
        values["use_8bit_adam"] = False
    return dataclasses.replace(params, **values)
