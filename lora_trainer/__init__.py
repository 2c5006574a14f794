"""LoRA Trainer: teach a Stable Diffusion checkpoint a new subject with low-rank adapters.

The package is the training core: it imports neither gradio nor the web UI.
"""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes >= 0.50 (its 8-bit AdamW runs on the CPU) warns at import, which diffusers does when
# it is installed, about 4-bit CPU kernels that nothing here uses.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
