"""Helpers that run the extension inside the stand-in web UI (tests/webui_standin).

`StandinWebUI` imports the stand-in `modules` afresh for one test, with its
folders under a temporary root and the given command line, sets up the
built-in Lora extension as the web UI would, and loads `scripts/` by path the
way modules/scripts.py `load_scripts` does.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "webui_standin"
BUILTIN_LORA = STANDIN / "extensions-builtin" / "Lora"
SCRIPT = REPO / "scripts" / "lora_trainer_tab.py"

_STANDIN_MODULES = ("modules", "networks", "network", "ui_extra_networks_lora", "webui_standin_calls",
                    "lora_trainer_tab.py", "lora_trainer.ui.webui_host")


def forget_standin_modules() -> None:
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in _STANDIN_MODULES):
            del sys.modules[name]


class StandinWebUI:
    def __init__(self, root: Path, args: str = "", *, builtin_lora: bool = True):
        self.root = root
        self.args = args
        self.builtin_lora = builtin_lora

    def __enter__(self) -> "StandinWebUI":
        self._saved_path = list(sys.path)
        self._saved_env = {k: os.environ.get(k) for k in ("WEBUI_STANDIN_ROOT", "WEBUI_STANDIN_ARGS")}
        os.environ["WEBUI_STANDIN_ROOT"] = str(self.root)
        os.environ["WEBUI_STANDIN_ARGS"] = self.args
        forget_standin_modules()
        sys.path.insert(0, str(STANDIN))
        self.calls = importlib.import_module("webui_standin_calls")
        self.shared = importlib.import_module("modules.shared")
        self.paths = importlib.import_module("modules.paths")
        self.sd_models = importlib.import_module("modules.sd_models")
        self.script_callbacks = importlib.import_module("modules.script_callbacks")
        self.ui_extra_networks = importlib.import_module("modules.ui_extra_networks")
        (Path(self.paths.models_path) / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
        if self.builtin_lora:
            self._start_builtin_lora()
        return self

    def __exit__(self, *exc) -> None:
        sys.path[:] = self._saved_path
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        forget_standin_modules()

    def _start_builtin_lora(self) -> None:
        """What extensions-builtin/Lora/scripts/lora_script.py does in `before_ui`."""
        sys.path.insert(0, str(BUILTIN_LORA))
        page_module = importlib.import_module("ui_extra_networks_lora")
        self.networks = importlib.import_module("networks")
        self.ui_extra_networks.register_page(page_module.ExtraNetworksPageLora())

    def load_extension_script(self, path: Path = SCRIPT):
        """modules/scripts.py load_scripts: extension folder on sys.path only while loading, load by path."""
        from modules import script_loading

        syspath = sys.path
        try:
            sys.path = [str(path.parent.parent)] + sys.path
            return script_loading.load_module(str(path))
        finally:
            sys.path = syspath

    def load_model(self):
        """The web UI loads its checkpoint on the first use of shared.sd_model."""
        ckpt = Path(self.sd_models.model_path) / "host-model.safetensors"
        ckpt.write_bytes(b"standin")
        self.sd_models.list_models()
        model = self.shared.sd_model
        self.calls.reset()
        return model

    def errors(self) -> list[tuple]:
        return [c for c in self.calls.calls if c[0] == "errors.report"]
