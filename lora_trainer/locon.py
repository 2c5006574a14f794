"""LoCon: LoRA on the UNet's convolutions too, chosen and named as kohya sd-scripts does with `conv_dim`.

kohya's networks/lora.py adapts, besides the attention layers, every Conv2d
inside a `ResnetBlock2D`, `Downsample2D` or `Upsample2D` when `conv_dim` is
set: the 3x3 convolutions with `conv_dim` / `conv_alpha`, the 1x1 ones (a
ResNet's `conv_shortcut`) with the LoRA's own rank and alpha. The names are
the usual `lora_unet_<diffusers path>`, e.g.
`lora_unet_down_blocks_0_resnets_0_conv1`, which the web UI maps to its own
layers (`input_blocks_1_0_in_layers_2`, ...); `lora_down` is a convolution with
the base's kernel, `lora_up` a 1x1 one.
"""
from __future__ import annotations

import torch
from torch import nn

from .lora import LoRALinear, wrap_modules

CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def conv_targets(unet: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(path, module) of every Conv2d inside a ResNet block, a downsampler or an upsampler, in module order."""
    out = []
    for parent_path, parent in unet.named_modules():
        if type(parent).__name__ not in CONV_PARENTS:
            continue
        for child_path, child in parent.named_modules():
            if isinstance(child, nn.Conv2d):
                out.append((f"{parent_path}.{child_path}" if parent_path else child_path, child))
    return out


def inject_locon(unet: nn.Module, *, rank: int, alpha: float, conv_rank: int, conv_alpha: float, prefix: str,
                 dtype: torch.dtype = torch.float32, dora: bool = False, rename=None) -> dict[str, LoRALinear]:
    """Wrap the UNet's ResNet, downsampler and upsampler convolutions in adapters (kohya's rule for the rank:
    `conv_rank`/`conv_alpha` for kernels larger than 1x1, `rank`/`alpha` for 1x1). Returns kohya name -> adapter.
    `rename` as for `lora.inject_lora`. Raises ValueError when the UNet has no such convolution."""
    chosen = []
    for path, conv in conv_targets(unet):
        pointwise = tuple(conv.kernel_size) == (1, 1)
        chosen.append((path, conv, rank if pointwise else conv_rank, alpha if pointwise else conv_alpha))
    if not chosen:
        raise ValueError(f"{type(unet).__name__} has no convolution in a {', '.join(CONV_PARENTS)}")
    return wrap_modules(unet, chosen, prefix=prefix, dtype=dtype, dora=dora, rename=rename)
