"""Shared pieces of the browser tests: Debian's chromium, a free port, opening a tab by its exact name."""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LORA_TRAINER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tab_button(page, name: str):
    """A tab's button by its exact name: role=tab from gradio 4 on, a plain button in .tab-nav in gradio 3.

    Exact, so "Train" never finds "LoRA Trainer" while the sub-tabs are still being drawn; clicking it
    waits until the button is there.
    """
    exact = re.compile(rf"^\s*{re.escape(name)}\s*$")
    return page.locator("[role=tab], .tab-nav button").filter(has_text=exact).first


def open_tab(page, name: str) -> None:
    tab_button(page, name).click()
