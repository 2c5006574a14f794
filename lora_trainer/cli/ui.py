"""`ui`: the LoRA Trainer tab as a standalone app, no web UI needed.

Serves the same tabs as the extension on http://127.0.0.1:PORT (another
address only when given with --host). The built-in tiny checkpoint is written
into Stable-diffusion/ when it is not there, so "Create Model" has something to
start from on a fresh machine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..hosts import Host
from ..tiny import TINY_NAME, write_tiny_checkpoint
from . import add_models_dir

log = logging.getLogger(__name__)
EXTENSION_ROOT = Path(__file__).resolve().parents[2]
STYLE_FILE = EXTENSION_ROOT / "style.css"
SCRIPTS_DIR = EXTENSION_ROOT / "javascript"


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="open the LoRA Trainer tab as a standalone app in the browser",
                       description="Serve the LoRA Trainer UI (Create Model, Parameters, Concepts, Train, "
                                   "Generate Ckpt) without the web UI.")
    add_models_dir(p)
    p.add_argument("--port", type=int, default=7860, metavar="P", help="port to serve on (default: 7860)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    p.set_defaults(run=run)


def ensure_tiny_checkpoint(host: Host) -> Path:
    """The built-in tiny checkpoint in Stable-diffusion/, written when absent (never replaced)."""
    path = host.models.checkpoints / TINY_NAME
    if not path.is_file():
        path = write_tiny_checkpoint(host.models.checkpoints, for_webui=True)
        log.info("Wrote the built-in tiny checkpoint %s", path)
    return path


def make_app(models_dir: str | Path):
    """The standalone Blocks for `models_dir` (folders created as needed)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..ui import build_ui
    from ..ui.standalone import standalone_theme

    host = Host.at(models_dir)
    for folder in (host.models.checkpoints, host.models.lora, host.models.working):
        folder.mkdir(parents=True, exist_ok=True)
    ensure_tiny_checkpoint(host)
    css = STYLE_FILE.read_text(encoding="utf-8") if STYLE_FILE.is_file() else None
    return host, build_ui(host, theme=standalone_theme(), css=css, head=page_scripts())


def page_scripts() -> str | None:
    """The extension's javascript/ files as <script> tags, as the web UI injects them into its page."""
    scripts = sorted(SCRIPTS_DIR.glob("*.js")) if SCRIPTS_DIR.is_dir() else []
    return "".join(f"<script>{p.read_text(encoding='utf-8')}</script>" for p in scripts) or None


def run(args) -> int:
    host, demo = make_app(args.models_dir)
    from ..ui import gradio_compat as compat

    compat.queue(demo)
    log.info("LoRA Trainer on http://%s:%d (models in %s)", args.host, args.port, Path(args.models_dir).resolve())
    compat.launch(demo, server_name=args.host, server_port=args.port, inbrowser=False, share=False,
                  show_api=False, allowed_paths=[str(Path(args.models_dir).resolve())], quiet=False)
    return 0
