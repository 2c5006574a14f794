"""The look of the standalone app: gradio's default theme with the system's fonts.

The default theme loads its fonts from the internet; the app must work with no
network, so it names fonts every system has.
"""
from __future__ import annotations

import gradio as gr

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO = ("ui-monospace", "Consolas", "monospace")


def standalone_theme():
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)
