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
