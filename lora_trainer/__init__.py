"""LoRA Trainer: teach a Stable Diffusion checkpoint a new subject with low-rank adapters.

The package is the training core: it imports neither gradio nor the web UI.
"""
__version__ = "0.1.0"
