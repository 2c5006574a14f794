"""Stand-in of extensions-builtin/Lora/networks.py (v1.10.1): the Lora list."""
import os

import webui_standin_calls
from modules import shared

available_networks = {}


def list_available_networks():
    webui_standin_calls.record("networks.list_available_networks")
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _dirs, files in os.walk(shared.cmd_opts.lora_dir):
        for f in files:
            if os.path.splitext(f)[1].lower() in (".safetensors", ".pt", ".ckpt"):
                available_networks[os.path.splitext(f)[0]] = os.path.join(root, f)
