"""Stand-in of extensions-builtin/Lora/network.py (v1.10.1): what a loaded Lora holds.

Reduced to the data `networks.load_network` fills in: `NetworkOnDisk` (name and
file), `Network` (its modules by the web UI's layer name, and the keys of the
file that matched no layer) and `NetworkWeights` (one layer's tensors of the file).
"""
from __future__ import annotations

import os
from collections import namedtuple

NetworkWeights = namedtuple('NetworkWeights', ['network_key', 'sd_key', 'w', 'sd_module'])


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"


class Network:  # LoraModule
    def __init__(self, name, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.modules = {}
        self.unmatched_keys = ()
        """state dict keys of the file that name no layer of the model it was loaded for"""


def apply_weight_decompose(updown, orig_weight, dora_scale):
    """DoRA as v1.10.1 applies a `dora_scale` (the body of its `NetworkModule.apply_weight_decompose`, a method
    there): the norm of `W + updown` is taken per input column, whatever the shape of `dora_scale`.
    `updown` already carries alpha / rank; the caller multiplies the result by the Lora's weight."""
    orig_weight = orig_weight.to(updown.dtype)
    dora_scale = dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
    updown = updown.to(orig_weight.device)
    merged_scale1 = updown + orig_weight
    merged_scale1_norm = (
        merged_scale1.transpose(0, 1)
        .reshape(merged_scale1.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(merged_scale1.shape[1], *[1] * (len(merged_scale1.shape) - 1))
        .transpose(0, 1)
    )
    return merged_scale1 * (dora_scale / merged_scale1_norm) - orig_weight
