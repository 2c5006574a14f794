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
