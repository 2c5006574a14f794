"""`python -m lora_trainer ui`: flags, binding, and the built-in tiny checkpoint on a fresh models folder."""
from __future__ import annotations

import pytest

from lora_trainer.cli import build_parser

import gradio  # noqa: F401  (the UI needs it: requirements.txt)


def test_ui_binds_this_machine_unless_told():
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.models_dir) == ("127.0.0.1", 7860, "models")
    args = build_parser().parse_args(["ui", "--models-dir", "m", "--port", "7999", "--host", "0.0.0.0"])
    assert (args.host, args.port, args.models_dir) == ("0.0.0.0", 7999, "m")


def test_a_fresh_models_folder_gets_the_tiny_checkpoint_and_an_existing_file_is_kept(tmp_path):
    from lora_trainer.cli.ui import ensure_tiny_checkpoint, make_app
    from lora_trainer.tiny import TINY_NAME

    host, demo = make_app(tmp_path / "models")
    tiny = host.models.checkpoints / TINY_NAME
    assert tiny.is_file() and tiny.with_suffix(".yaml").is_file()
    assert host.models.lora.is_dir() and host.models.working.is_dir()
    assert host.models.list_checkpoints() == [TINY_NAME]
    assert demo is not None

    tiny.write_bytes(b"the user's own file")
    assert ensure_tiny_checkpoint(host) == tiny
    assert tiny.read_bytes() == b"the user's own file"


def test_a_port_in_use_is_one_line_naming_it_and_port_exit_2(tmp_path):
    """Run as `python -m lora_trainer` from the clone (no install), which keeps working beside `lora-trainer`."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as taken:  # as the web UI holds 7860
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "lora_trainer", "ui", "--models-dir", str(tmp_path / "models"),
                               "--port", str(port)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert f"port {port}" in err[0] and "--port" in err[0] and "in use" in err[0]
    assert not (tmp_path / "models").exists()  # refused before anything is written


def test_an_address_of_another_machine_is_named_as_the_host(tmp_path, capsys):
    from lora_trainer.cli import main

    # 192.0.2.1 is TEST-NET-1 (RFC 5737): documentation only, never this machine's.
    assert main(["ui", "--models-dir", str(tmp_path / "models"), "--host", "192.0.2.1", "--port", "7999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --host 192.0.2.1: not an address of this machine; use 127.0.0.1 or 0.0.0.0"]
    assert not (tmp_path / "models").exists()
