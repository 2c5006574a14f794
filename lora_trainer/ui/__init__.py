"""The gradio face of the trainer: `build_ui(host)` makes the "LoRA Trainer" tab.

Only this package imports gradio. `layout.py` lays out and wires the widgets,
`controller.py` holds what each button does, `fields.py` maps widgets to the
config by name, `gradio_compat.py` holds every gradio version difference.
"""
from .layout import build_ui

__all__ = ["build_ui"]
