"""Named sets of training parameters the "Parameters" tab offers.

A preset changes only the fields it names; everything else keeps the value the
user has. "8 GB GPU" is what the reference material recommends for an 8 GB
NVIDIA card: LoRA, fp16, 8-bit Adam, memory-efficient attention, gradient
checkpointing, cached latents, batch 1, rank 4. "4 GB card" is the same with the frozen base
weights stored in float8 (fp8.py). Without a CUDA GPU a preset picks
what is fastest on the CPU: fp32 (mixed precision only slows a CPU down), no
gradient checkpointing (it trades time for GPU memory), and plain AdamW for 8-bit
Adam unless the installed bitsandbytes runs on the CPU (>= 0.50). Every such
change is named, so the user sees why a field differs from the preset.
"""
from __future__ import annotations

import dataclasses

from .config import TrainingParams, field_meta
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
    # SDXL at its native 1024 px: text encoders frozen, their outputs computed once and moved off the GPU.
    "8 GB GPU (SDXL)": {
        "use_lora": True, "mixed_precision": "fp16", "use_8bit_adam": True, "attention": "flash_attention",
        "gradient_checkpointing": True, "cache_latents": True, "cache_text_encoder_outputs": True,
        "train_text_encoder": False, "train_batch_size": 1, "gradient_accumulation_steps": 1, "rank": 16,
        "lora_alpha": 16.0, "unet_learning_rate": 1e-4, "resolution": 1024, "use_buckets": True,
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
    # Prodigy as its authors advise for LoRA / diffusion models (prodigyopt's README): learning rates 1.0,
    # d_coef 1 (lower it when the run overshoots), decoupled weight decay 0.01, safeguard warmup and bias
    # correction on.
    "Adaptive": {
        "optimizer": "Prodigy", "use_8bit_adam": False, "unet_learning_rate": 1.0, "text_encoder_learning_rate": 1.0,
        "learning_rate": 1.0, "prodigy_d_coef": 1.0, "weight_decay": 0.01, "prodigy_safeguard_warmup": True,
        "prodigy_use_bias_correction": True, "lr_scheduler": "constant",
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
    """`params` with the fields of preset `name` changed (without `cuda`, made fit for the CPU).

    Raises ConfigError for an unknown name.
    """
    return apply_preset_noted(params, name, cuda=cuda)[0]


def apply_preset_noted(params: TrainingParams, name: str, *,
                       cuda: bool = True) -> tuple[TrainingParams, list[str]]:
    """`apply_preset`, plus one note per choice changed because of this machine, e.g.
    "Mixed Precision fp16 -> no (fp32): no CUDA GPU here; fp32 is fastest on a CPU".

    Raises ConfigError for an unknown name.
    """
    if not name:
        raise ConfigError(f"Preset: choose one of {', '.join(PRESETS)}, then press Apply Preset")
    if name not in PRESETS:
        raise ConfigError(f"Preset: {name!r} is not one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    notes: list[str] = []

    def swap(field: str, new, why: str) -> None:
        notes.append(f"{field_meta(TrainingParams, field)['label']} {_shown(field, values[field])} -> {_shown(field, new)}: {why}")
        values[field] = new

    if not cuda:
        if values.get("mixed_precision", "no") != "no":
            swap("mixed_precision", "no", "no CUDA GPU here; fp32 is fastest on a CPU")
        if values.get("gradient_checkpointing"):
            swap("gradient_checkpointing", False, "no CUDA GPU here; on a CPU it only makes each step slower")
        if values.get("use_8bit_adam") and not bitsandbytes_runs_on_cpu():
            swap("use_8bit_adam", False, "no CUDA GPU here and the installed bitsandbytes (< 0.50) needs one")
    return dataclasses.replace(params, **values), notes


def _shown(field: str, value) -> str:
    if field == "mixed_precision" and value == "no":
        return "no (fp32)"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
