"""`ui`: the LoRA Trainer tab as a standalone app, no web UI needed.

Serves the same tabs as the extension on http://127.0.0.1:PORT (another
address only when given with --host). The built-in tiny checkpoint is written
into Stable-diffusion/ when it is not there, so "Create Model" has something to
start from on a fresh machine.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from ..errors import ConfigError
from ..hosts import Host
from ..tiny import TINY_NAME, write_tiny_checkpoint
from . import add_models_dir

log = logging.getLogger(__name__)


def web_files_root() -> Path:
    """Where style.css and javascript/ are: the extension folder (a clone, an editable install), else the
    copies an installed wheel carries in lora_trainer/web/ (setup.py puts them there)."""
    package = Path(__file__).resolve().parents[1]
    return package.parent if (package.parent / "style.css").is_file() else package / "web"


STYLE_FILE = web_files_root() / "style.css"
SCRIPTS_DIR = web_files_root() / "javascript"


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


def check_port_free(address: str, port: int) -> None:
    """Raise ConfigError naming the port and --port when `address:port` cannot be served on (before anything
    is written or gradio starts: its own refusal is a long traceback)."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"--host {address}: not an address of this machine ({e}); use 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by an app that just ended is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {address}: not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
            raise port_in_use(address, port, e) from None


def port_in_use(address: str, port: int, error: OSError) -> ConfigError:
    reason = "in use by another program (the web UI?)" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
    return ConfigError(f"port {port} on {address}: {reason}; choose another with --port, e.g. --port {port + 1}")


def run(args) -> int:
    check_port_free(args.host, args.port)
    host, demo = make_app(args.models_dir)
    from ..ui import gradio_compat as compat

    compat.queue(demo)
    log.info("LoRA Trainer on http://%s:%d (models in %s)", args.host, args.port, Path(args.models_dir).resolve())
    try:
        compat.launch(demo, server_name=args.host, server_port=args.port, inbrowser=False, share=False,
                      show_api=False, allowed_paths=[str(Path(args.models_dir).resolve())], quiet=False)
    except OSError as e:
        # Taken between the check and the launch: gradio says "Cannot find empty port in range".
        if "port" not in str(e).lower():
            raise
        raise port_in_use(args.host, args.port, e) from None
    return 0
