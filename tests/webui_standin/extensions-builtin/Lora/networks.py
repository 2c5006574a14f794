"""Stand-in of extensions-builtin/Lora/networks.py (v1.10.1): the Lora list, and loading one Lora's file.

`load_network` matches a file's keys to the loaded model's layers the way the
real one does for SD 1.x and 2.x: the kohya module name (diffusers spelling) is
turned into the web UI's layer name by `convert_diffusers_name_to_compvis`,
then looked up in `sd_model.network_layer_mapping`; SD 1.x LoRAs that already
use the web UI's names are looked up as they are. Here the layer mapping is
built from the loaded checkpoint's keys (the real one walks the model's
modules: the same names for every layer that holds a weight), and a "layer" is
a stand-in with `.weight` on the meta device, enough to check shapes.
"""
import os
import re
from types import SimpleNamespace

import network
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


_RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                    "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def convert_diffusers_name_to_compvis(key, is_sd2):
    """A kohya module name in diffusers spelling -> the web UI's layer name (`key` itself when no rule fits)."""
    def block(kind, rest):
        return _RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{block(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{block(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{block(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    ]
    for pattern, build in rules:
        m = re.match(pattern, key)
        if m:
            return build(m)
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        layer, rest = m[1], m[2]
        if not is_sd2:
            return f"transformer_text_model_encoder_layers_{layer}_{rest}"
        rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"model_transformer_resblocks_{layer}_{rest}"
    return key


def assign_network_names_to_compvis_modules(sd_model):
    """Layer name -> layer of the loaded model, from its checkpoint's weight keys."""
    from safetensors import safe_open
    import torch

    mapping = {}
    with safe_open(sd_model.sd_model_checkpoint, framework="pt") as f:
        for key in f.keys():
            for prefix in ("model.", "cond_stage_model."):
                if key.startswith(prefix) and key.endswith((".weight", ".in_proj_weight")):
                    name = key[len(prefix):].rsplit(".", 1)[0].replace(".", "_")
                    shape = f.get_slice(key).get_shape()
                    mapping[name] = SimpleNamespace(weight=torch.empty(shape, device="meta"))
    sd_model.network_layer_mapping = mapping


def load_network(name, network_on_disk):
    """Read a Lora file and match each key to a layer of `shared.sd_model`."""
    from safetensors.torch import load_file

    webui_standin_calls.record("networks.load_network")
    net = network.Network(name, network_on_disk)
    sd = load_file(network_on_disk.filename)
    if not hasattr(shared.sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(shared.sd_model)
    mapping = shared.sd_model.network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in " ".join(mapping)
    failed = {}
    for key_network, weight in sd.items():
        key_network_without_network_parts, _, network_part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(key_network_without_network_parts, is_sd2)
        sd_module = mapping.get(key)
        if sd_module is None:
            m = re.match(r"(.*)_([qkv]_proj)$", key)  # SD 2.x: q/k/v are rows of one in_proj weight
            if m:
                sd_module = mapping.get(m.group(1))
        if sd_module is None and "lora_te1_text_model" in key_network_without_network_parts:
            key = key_network_without_network_parts.replace("lora_te1_text_model", "transformer_text_model")
            sd_module = mapping.get(key)
        if sd_module is None:
            failed[key_network] = key
            continue
        if key not in net.modules:
            net.modules[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
        net.modules[key].w[network_part] = weight
    net.unmatched_keys = tuple(failed)
    return net
