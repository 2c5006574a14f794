"""Registers the "LoRA Trainer" tab and its settings with the web UI; everything else lives in lora_trainer/.

The web UI loads this file by path (modules/script_loading.py) with the
extension's folder on a copy of sys.path that it drops after loading; the
package must stay importable by name afterwards (jobs import parts of it later,
worker processes started by spawning import it afresh), so the folder is added
again when the tab is built, to the restored sys.path. It goes at the end, so
that our `scripts/` and `tests/` folders never stand in for another extension's.
"""
import logging
import os
import sys

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keep_importable():
    if EXTENSION_ROOT not in sys.path:
        sys.path.append(EXTENSION_ROOT)


keep_importable()
import lora_trainer  # noqa: E402,F401  (needs EXTENSION_ROOT on sys.path)
from modules import script_callbacks  # noqa: E402

TAB_TITLE = "LoRA Trainer"
TAB_ID = "lora_trainer"

log = logging.getLogger("lora_trainer")


def unsupported_reason():
    """Why the extension cannot run in this web UI, or None (the check itself lives in lora_trainer.hostcheck)."""
    try:
        from lora_trainer.hostcheck import unsupported_host_reason

        return unsupported_host_reason()
    except Exception as exc:  # noqa: BLE001 - a broken install must not take the web UI down
        log.exception("LoRA Trainer: checking this web UI failed")
        return f"LoRA Trainer could not check this web UI ({exc}); see the console, then restart the web UI."


def message_tab(message):
    """A tab that says why the extension is not available, instead of a traceback in the console only."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(f"**LoRA Trainer is not available here.**\n\n{message}", elem_id="lora_trainer_not_loaded")
    return blocks


def trainer_tab():
    keep_importable()
    try:
        from lora_trainer.ui.webui_host import build_webui_tab

        blocks = build_webui_tab()
    except Exception as exc:  # noqa: BLE001 - show it in the tab, not only in the console
        log.exception("LoRA Trainer: building the tab failed")
        blocks = message_tab(f"Building the tab failed: {exc}. The console has the details.")
    return [(blocks, TAB_TITLE, TAB_ID)]


def register_settings():
    from lora_trainer.ui.settings import register_settings as register

    register()


def register_model_configs():
    """Our tiny models' architectures with the web UI's model builders, before it loads a checkpoint."""
    try:
        from lora_trainer.ui.webui_host import register_open_clip_configs

        log.debug("LoRA Trainer: registered open_clip architectures %s", register_open_clip_configs())
    except Exception:  # noqa: BLE001 - a failure here only keeps the tiny SDXL model from loading
        log.exception("LoRA Trainer: registering the tiny open_clip architectures failed")


REASON = unsupported_reason()
if REASON:
    log.warning("LoRA Trainer: %s", REASON)
    script_callbacks.on_ui_tabs(lambda: [(message_tab(REASON), TAB_TITLE, TAB_ID)])
else:
    register_model_configs()
    script_callbacks.on_ui_tabs(trainer_tab)
    script_callbacks.on_ui_settings(register_settings)
