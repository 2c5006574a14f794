"""The standalone app serves no file outside the folders it shows, and says so when bound beyond this machine."""
from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request

from helpers_browser import free_port

from lora_trainer.cli import build_parser
from lora_trainer.cli import ui as ui_command

import gradio  # noqa: F401  (the UI needs it: requirements.txt)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_file_routes_serve_the_models_folder_and_nothing_else(tmp_path, monkeypatch, reliability):
    work = tmp_path / "work"
    models = work / "models"
    (models / "lora_trainer" / "m").mkdir(parents=True)
    shown = models / "lora_trainer" / "m" / "sample.txt"
    shown.write_text("a sample the app shows")
    (work / "secret.txt").write_text("the user's own notes")  # the folder the app was started in
    (tmp_path / "beside.txt").write_text("a file beside it")
    monkeypatch.chdir(work)
    from lora_trainer.ui import gradio_compat as compat

    host, demo = ui_command.make_app("models")
    compat.queue(demo)
    port = free_port()
    options = ui_command.launch_options("models", "127.0.0.1", port)
    compat.launch(demo, **{**options, "prevent_thread_lock": True, "quiet": True})
    try:
        base = f"http://127.0.0.1:{port}"
        routes = [f"{base}/file=", f"{base}/gradio_api/file="]

        def fetch(path: str) -> list[tuple[int, bytes]]:
            return [_get(route + urllib.parse.quote(path)) for route in routes]

        assert any(status == 200 and body == b"a sample the app shows" for status, body in fetch(str(shown)))
        refused = {}
        for target, secret in (("/etc/passwd", b"root:"), (str(work / "secret.txt"), b"own notes"),
                               ("secret.txt", b"own notes"), (str(models / ".." / "secret.txt"), b"own notes"),
                               (str(tmp_path / "beside.txt"), b"beside it"),
                               (str(models) + "/../../beside.txt", b"beside it")):
            answers = fetch(target)
            assert not any(status == 200 and secret in body for status, body in answers), (target, answers)
            refused[target.replace(str(tmp_path), "...")] = sorted({status for status, _ in answers})
    finally:
        demo.close()
    reliability("Standalone app: requests for files outside the models folder (/etc/passwd, the start folder, "
                "../ paths) on its file routes",
                "none returned; HTTP statuses: " + "; ".join(f"{k} -> {v}" for k, v in refused.items()))


def test_bound_beyond_this_machine_warns_in_the_console(tmp_path, monkeypatch, caplog):
    launched = {}
    monkeypatch.setattr("lora_trainer.ui.gradio_compat.launch", lambda demo, **kwargs: launched.update(kwargs))
    for address, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        args = build_parser().parse_args(["ui", "--models-dir", str(tmp_path / "models"), "--host", address,
                                          "--port", str(free_port())])
        with caplog.at_level(logging.WARNING, logger="lora_trainer"):
            assert ui_command.run(args) == 0
        assert launched["server_name"] == address
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert bool([w for w in warnings if f"Bound to {address}" in w and "127.0.0.1" in w]) == warned, warnings
