"""The web UI as our host: its folders, its GPU memory, its model lists, its Interrupt.

Everything here calls the AUTOMATIC1111 web UI's `modules` (v1.10.1 API) or,
on Forge, its memory manager. `WebUIHost.from_modules()` is called from the
tab's `on_ui_tabs` callback, when the web UI has parsed its command line and
loaded its settings.

Why the loaded model is read from `sd_models.model_data.sd_model` and not from
`shared.sd_model`: the latter is a property that *loads* a checkpoint when none
was loaded yet, and freeing memory must never start by filling it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

from ..host import ModelsDir
from ..hosts import Host
from .settings import KEEP_HOST_MODEL, REFRESH_HOST_LISTS, WORKING_DIR, setting

if TYPE_CHECKING:
    import gradio as gr

    from ..jobs import JobRunner

log = logging.getLogger(__name__)

# Forge's memory manager, newest first: backend/ (Forge 2, gradio 4), ldm_patched/ (Forge 1).
FORGE_MEMORY_MODULES = ("backend.memory_management", "ldm_patched.modules.model_management")


OPEN_CLIP_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "open_clip"


def register_open_clip_configs() -> list[str]:
    """Make open_clip know our tiny text-encoder architectures (configs/open_clip/*.json); return their names.

    The web UI's SDXL loader builds the second text encoder with
    `open_clip.create_model_and_transforms(<arch of the yaml>)` (weights come from
    the checkpoint), so the tiny SDXL model's yaml names an architecture open_clip
    must know. Called when the extension loads, before the web UI loads a model.
    Nothing happens where open_clip is not installed.
    """
    try:
        import open_clip
    except ImportError:
        return []
    open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    return sorted(path.stem for path in OPEN_CLIP_CONFIGS.glob("*.json"))


def host_models_dir(models_path: str, cmd_opts: Any, opts: Any) -> ModelsDir:
    """The folders the web UI itself uses, so our files appear in its lists.

    Checkpoints: `--ckpt-dir` if given, else models/Stable-diffusion. LoRA files:
    the built-in Lora's `--lora-dir` (default models/Lora). Working models: the
    "LoRA Trainer" setting, else models/lora_trainer.
    """
    root = Path(models_path)
    checkpoints = getattr(cmd_opts, "ckpt_dir", None) or root / "Stable-diffusion"
    lora = getattr(cmd_opts, "lora_dir", None) or root / "Lora"
    working = setting(opts, WORKING_DIR, "") or root / "lora_trainer"
    return ModelsDir(Path(checkpoints), Path(lora), Path(working).expanduser(), known_sha256=webui_known_sha256)


def webui_known_sha256(checkpoint: Path) -> Optional[str]:
    """The SHA-256 the web UI already knows for `checkpoint`, else None.

    The web UI hashes a checkpoint when it loads it and keeps the hash in its cache under the
    checkpoint's title; `CheckpointInfo` reads it back, checked against the file's time
    (`modules.hashes.sha256_from_cache`). Create Model of the loaded checkpoint then reads it
    only to convert it, not a second time to hash it.
    """
    from modules import sd_models

    return getattr(sd_models.CheckpointInfo(str(checkpoint)), "sha256", None)


def forge_memory_manager() -> Optional[ModuleType]:
    """Forge's model memory manager when running inside Forge, else None."""
    if importlib.util.find_spec("modules_forge") is None:
        return None
    for name in FORGE_MEMORY_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    log.warning("LoRA Trainer: Forge detected but none of %s imports; the checkpoint stays loaded while training",
                ", ".join(FORGE_MEMORY_MODULES))
    return None


class WebUIHost(Host):
    """`Host` hooks implemented with the web UI's own functions."""

    name = "webui"

    def __init__(self, models: ModelsDir, *, shared: ModuleType, sd_models: ModuleType,
                 forge_memory: Optional[ModuleType] = None, call_queue: Optional[ModuleType] = None):
        super().__init__(models)
        self._shared = shared
        self._sd_models = sd_models
        self._forge_memory = forge_memory
        self._call_queue = call_queue
        self._released: Any = None
        if forge_memory is not None:
            self.name = "forge"

    @classmethod
    def from_modules(cls) -> "WebUIHost":
        """Build the host from the running web UI's `modules` package."""
        from modules import call_queue, paths, sd_models, shared

        models = host_models_dir(paths.models_path, shared.cmd_opts, shared.opts)
        return cls(models, shared=shared, sd_models=sd_models, forge_memory=forge_memory_manager(),
                   call_queue=call_queue)

    def _model_lock(self):
        """The web UI's queue lock: held by txt2img/img2img while they run and by its own checkpoint
        switches, so the model is never moved under a running generation. Held only while moving."""
        lock = getattr(self._call_queue, "queue_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    # --- GPU memory -------------------------------------------------------

    def release_gpu(self) -> None:
        """Move the web UI's loaded checkpoint to the CPU (Forge: unload all its models)."""
        if setting(self._shared.opts, KEEP_HOST_MODEL, False):
            return
        with self._model_lock():
            if self._forge_memory is not None:
                self._forge_memory.unload_all_models()
                self._forge_memory.soft_empty_cache()
                log.info("LoRA Trainer: unloaded Forge's models for the job; Forge loads them again "
                         "at its next generation")
                return
            model = self._sd_models.model_data.sd_model
            if model is None:
                return
            self._sd_models.unload_model_weights(model)
            self._released = model
        log.info("LoRA Trainer: moved the web UI's checkpoint to the CPU for the job")

    def restore_gpu(self) -> None:
        """Bring back what `release_gpu` moved; never raises (it runs while a job's error propagates).

        Forge needs nothing: its memory manager loads models on the next generation.
        If the user switched checkpoints meanwhile, the new one is where the web UI put it.
        """
        model, self._released = self._released, None
        if model is None:
            return
        with self._model_lock():
            if self._sd_models.model_data.sd_model is not model:
                log.info("LoRA Trainer: the web UI loaded another checkpoint during the job; left as it is")
                return
            try:
                self._sd_models.send_model_to_device(model)
                log.info("LoRA Trainer: moved the web UI's checkpoint back to the GPU")
            except Exception as exc:  # noqa: BLE001 - fall back to the web UI's own reload
                log.warning("LoRA Trainer: moving the checkpoint back to the GPU failed (%s); reloading it", exc)
                try:
                    self._sd_models.reload_model_weights(forced_reload=True)
                    log.info("LoRA Trainer: reloaded the web UI's checkpoint")
                except Exception:  # noqa: BLE001
                    log.exception("LoRA Trainer: reloading the web UI's checkpoint failed; "
                                  "choose it again in 'Stable Diffusion checkpoint'")

    # --- lists ------------------------------------------------------------

    def checkpoints_changed(self) -> None:
        """Re-read the checkpoint folders, as the refresh button beside "Stable Diffusion checkpoint" does."""
        if not setting(self._shared.opts, REFRESH_HOST_LISTS, True):
            return
        try:
            self._sd_models.list_models()
        except Exception:  # noqa: BLE001 - the file is written; a stale list is not a failed job
            log.exception("LoRA Trainer: refreshing the web UI's checkpoint list failed; press its refresh button")

    def loras_changed(self) -> None:
        """Re-read the Lora folder through the built-in Lora extension, if it is enabled."""
        if not setting(self._shared.opts, REFRESH_HOST_LISTS, True):
            return
        try:
            refresh = _lora_list_refresh()
            if refresh is not None:
                refresh()
        except Exception:  # noqa: BLE001
            log.exception("LoRA Trainer: refreshing the Lora list failed; press Refresh in the Lora tab")

    # --- Interrupt --------------------------------------------------------

    def interrupted(self) -> bool:
        state = self._shared.state
        return bool(state is not None and state.interrupted)

    def clear_interrupt(self) -> None:
        state = self._shared.state
        if state is not None:
            state.interrupted = False


def _lora_list_refresh():
    """The built-in Lora's list refresh: its Extra Networks page, else its `networks` module; None if absent."""
    from modules import ui_extra_networks

    for page in getattr(ui_extra_networks, "extra_pages", []):
        if getattr(page, "name", "") == "lora":
            return page.refresh
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        return networks.list_available_networks
    return None


_runner: Optional["JobRunner"] = None


def shared_job_runner(host: Host) -> "JobRunner":
    """The web UI process's one JobRunner.

    "Reload UI" runs the script and builds the tab again, but this module stays
    imported: the runner, and a job it is running, outlive the old tab, so the
    new tab shows that job's progress and refuses a second job beside it.
    The host is replaced only while nothing runs (the folders may have changed).
    """
    global _runner
    from ..jobs import JobRunner

    if _runner is None:
        _runner = JobRunner(host)
    elif not _runner.running:
        _runner.host = host
    return _runner


def build_webui_tab() -> "gr.Blocks":
    """The "LoRA Trainer" tab for the running web UI (called from its on_ui_tabs callback)."""
    from . import build_ui
    from .controller import Controller

    host = WebUIHost.from_modules()
    show_console_lines()
    return build_ui(host, controller=Controller(host, runner=shared_job_runner(host)), page_polls=True)


def show_console_lines() -> None:
    """Print our INFO lines (`Concept requires N images.`, `Training finished. ...`) on the web UI's console.

    The web UI configures logging only when started with --loglevel; without it
    nothing below WARNING would reach the console. Our own handler is added only
    then, and once, so lines are never printed twice.
    """
    logger = logging.getLogger("lora_trainer")
    if logging.getLogger().handlers or any(getattr(h, "_lora_trainer_console", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._lora_trainer_console = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
