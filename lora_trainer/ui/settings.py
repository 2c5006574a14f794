"""The extension's page in the web UI's Settings: a "LoRA Trainer" section under "Training".

Registered through `script_callbacks.on_ui_settings(register_settings)`; read
by `WebUIHost`. Standalone there are no settings: the defaults apply.
"""
from __future__ import annotations

SECTION = ("lora_trainer", "LoRA Trainer", "training")

WORKING_DIR = "lora_trainer_working_dir"
KEEP_HOST_MODEL = "lora_trainer_keep_host_model"
REFRESH_HOST_LISTS = "lora_trainer_refresh_host_lists"


def register_settings() -> None:
    """Add the section's options to `shared.opts` (called by the web UI before it builds Settings)."""
    from modules import shared

    options = shared.options_section(SECTION, {
        WORKING_DIR: shared.OptionInfo(
            "", "Folder for working models made by Create Model (empty: models/lora_trainer)",
        ).info("several GB per model; delete a model's folder when you are done with it").needs_reload_ui(),
        KEEP_HOST_MODEL: shared.OptionInfo(
            False, "Keep the web UI's checkpoint on the GPU while training or generating class images",
        ).info("off frees its memory for training and brings it back afterwards; on needs more GPU memory"),
        REFRESH_HOST_LISTS: shared.OptionInfo(
            True, "Refresh the web UI's checkpoint list after Generate Ckpt and its Lora list after training",
        ),
    })
    for key, info in options.items():
        shared.opts.add_option(key, info)


def setting(opts, key: str, default):
    """An option's value, or `default` when the option is not registered (settings not loaded yet)."""
    try:
        return getattr(opts, key)
    except AttributeError:
        return default
