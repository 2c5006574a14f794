"""Key maps between the original (ldm) checkpoint layout and diffusers / transformers models.

A map is a list of `Link`s, one per diffusers tensor (or per group of them),
built from the keys of the diffusers model itself (instantiated on the meta
device, so it costs no memory). Converting in either direction walks the same
list, which is what makes original -> diffusers -> original exact.

Kinds of link:
- "same":    one tensor, renamed;
- "conv1x1": VAE attention weights, [c, c, 1, 1] in the original, [c, c] in diffusers;
- "split3":  OpenCLIP's fused attention in-projection <-> separate q, k, v;
- "transpose": OpenCLIP's `text_projection` (used as x @ P) <-> a Linear's weight (P transposed).

Where each part lives in the original layout is the family's (`families`);
the text-encoder maps are chosen by the part's `TextEncoder.kind`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .families import UNET_PREFIX, VAE_PREFIX, ModelSpec
from .compat import canonical_clip_name


@dataclass(frozen=True)
class Link:
    original: tuple[str, ...]
    diffusers: tuple[str, ...]
    kind: str = "same"


def build_unet(spec: ModelSpec, device="meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device), _no_init_on_meta(device):
        return UNet2DConditionModel(**spec.unet)


def build_vae(spec: ModelSpec, device="meta"):
    from diffusers import AutoencoderKL

    with torch.device(device), _no_init_on_meta(device):
        return AutoencoderKL(**spec.vae)


def build_text_encoder(spec: ModelSpec, device="meta", part: str = "text_encoder"):
    """The CLIPTextModel (or CLIPTextModelWithProjection, as the family says) of text-encoder `part`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if spec.family.text_encoder(part).with_projection else CLIPTextModel
    with torch.device(device), _no_init_on_meta(device):
        return cls(CLIPTextConfig(**spec.text_config(part)))


# torch.nn.init's in-place initialisers (kaiming_uniform_, normal_, zeros_, ...).
_INITIALISERS = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
_SKIPPING = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCHED: dict[str, Callable] = {}
_PATCH_USERS = [0]


@contextlib.contextmanager
def _no_init_on_meta(device) -> Iterator[None]:
    """While a model is built on the meta device, torch.nn.init's initialisers do nothing in this thread.

    A meta tensor holds no values to fill, yet each initialiser goes through torch's dispatch for it:
    skipping them halves the time a full-size UNet takes to build (0.29 s -> 0.15 s with its VAE and text
    encoder). The initialisers are replaced while any thread is inside, by ones that skip only in a
    thread inside: a model built at the same time in another thread is initialised as always.
    """
    if torch.device(device).type != "meta":
        yield
        return
    with _PATCH_LOCK:
        if _PATCH_USERS[0] == 0:
            for name in _INITIALISERS:
                _PATCHED[name] = getattr(torch.nn.init, name)
                setattr(torch.nn.init, name, _skipped_here(_PATCHED[name]))
        _PATCH_USERS[0] += 1
    was = getattr(_SKIPPING, "on", False)
    _SKIPPING.on = True
    try:
        yield
    finally:
        _SKIPPING.on = was
        with _PATCH_LOCK:
            _PATCH_USERS[0] -= 1
            if _PATCH_USERS[0] == 0:
                for name, original in _PATCHED.items():
                    setattr(torch.nn.init, name, original)
                _PATCHED.clear()


def _skipped_here(initialiser: Callable) -> Callable:
    @functools.wraps(initialiser)
    def initialise(tensor, *args, **kwargs):
        return tensor if getattr(_SKIPPING, "on", False) else initialiser(tensor, *args, **kwargs)

    return initialise


def meta_model(spec: ModelSpec, part: str):
    """Part `part` of `spec` built on the meta device, shared by every key map and LoRA target table of the
    same configuration (a merge needs the UNet's twice; building it takes a third of a second). Read only:
    what loads weights into a model builds its own."""
    if part == "unet":
        config, build = spec.unet, build_unet
    elif part == "vae":
        config, build = spec.vae, build_vae
    else:
        config, build = spec.text_config(part), functools.partial(build_text_encoder, part=part)
        part += ":projection" if spec.family.text_encoder(part).with_projection else ""
    key = (part, json.dumps(config, sort_keys=True, default=str))
    model = _META_MODELS.get(key)
    if model is None:
        model = build(spec)
        if len(_META_MODELS) >= 8:
            _META_MODELS.pop(next(iter(_META_MODELS)))
        _META_MODELS[key] = model
    return model


_META_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
               "mid_block.resnets.1": "middle_block.2",
               # SDXL's size/crop ("text_time") additional embedding
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def unet_module_to_original(name: str, config) -> str:
    """Original (ldm) module path, without `model.diffusion_model.`, of a diffusers UNet module path."""
    per = config["layers_per_block"]
    for prefix, original in _UNET_FIXED.items():
        if name == prefix or name.startswith(prefix + "."):
            return original + _resnet_rest(name[len(prefix):], prefix)
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(.*)", name)
    if not m:
        raise KeyError(name)
    side, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down":
        if part == "downsamplers":
            return f"input_blocks.{(block + 1) * (per + 1)}.0.op" + rest[len(".conv"):]
        slot = 1 + block * (per + 1) + index
    else:
        if part == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][block]
            return f"output_blocks.{block * (per + 1) + per}.{2 if has_attention else 1}.conv" + rest[len(".conv"):]
        slot = block * (per + 1) + index
    group = "input_blocks" if side == "down" else "output_blocks"
    if part == "resnets":
        return f"{group}.{slot}.0" + _resnet_rest(rest, "resnets")
    return f"{group}.{slot}.1{rest}"


def _resnet_rest(rest: str, prefix: str) -> str:
    if "resnets" not in prefix or not rest:
        return rest
    head, _, tail = rest[1:].partition(".")
    return "." + _UNET_RESNET.get(head, head) + ("." + tail if tail else "")


def unet_links(spec: ModelSpec, model=None) -> list[Link]:
    model = model if model is not None else meta_model(spec, "unet")
    links = []
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        links.append(Link((UNET_PREFIX + unet_module_to_original(module, spec.unet) + "." + leaf,), (key,)))
    return links


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_original(key: str, config) -> tuple[str, str]:
    """(original key without `first_stage_model.`, link kind) of a diffusers VAE key."""
    levels = len(config["block_out_channels"])
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"),
    ]
    for pattern, make in rules:
        m = re.fullmatch(pattern, key)
        if m:
            original = make(m)
            conv = ".mid_block.attentions." in key and key.endswith(".weight") and "group_norm" not in key
            return original, "conv1x1" if conv else "same"
    return key, "same"  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _VAE_RESNET.get(head, head) + ("." + tail if tail else "")


def vae_links(spec: ModelSpec, model=None) -> list[Link]:
    model = model if model is not None else meta_model(spec, "vae")
    links = []
    for key in model.state_dict():
        original, kind = vae_key_to_original(key, spec.vae)
        links.append(Link((VAE_PREFIX + original,), (key,), kind))
    return links


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def text_links(spec: ModelSpec, model=None, part: str = "text_encoder") -> list[Link]:
    """Links for text-encoder `part`; diffusers-side keys are as the installed transformers spells them."""
    te = spec.family.text_encoder(part)
    model = model if model is not None else meta_model(spec, part)
    keys = list(model.state_dict())
    if te.kind == "clip":
        return [Link((te.prefix + canonical_clip_name(k),), (k,)) for k in keys]
    prefix = te.prefix
    by_canonical = {canonical_clip_name(k): k for k in keys}
    links, done = [], set()
    for canonical, key in by_canonical.items():
        if canonical == "text_projection.weight":
            links.append(Link((prefix + "text_projection",), (key,), "transpose"))
            continue
        name = canonical[len("text_model."):]
        if name == "embeddings.position_ids":
            continue  # OpenCLIP stores no position ids; the model's own default is used
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name)
        if m:
            layer, leaf = m[1], m[3]
            if (layer, leaf) in done:
                continue
            done.add((layer, leaf))
            parts = tuple(by_canonical[f"text_model.encoder.layers.{layer}.self_attn.{x}_proj.{leaf}"] for x in "qkv")
            links.append(Link((f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}",), parts, "split3"))
            continue
        links.append(Link((prefix + _openclip_name(name),), (key,)))
    return links


def _openclip_name(name: str) -> str:
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", name)
    if not m:
        raise KeyError(name)
    return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"


def to_diffusers(links: list[Link], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-layout tensors from original-layout ones (`get` reads one by key)."""
    out = {}
    for link in links:
        tensor = get(link.original[0])
        if link.kind == "same":
            out[link.diffusers[0]] = tensor
        elif link.kind == "conv1x1":
            out[link.diffusers[0]] = tensor.reshape(tensor.shape[0], tensor.shape[1])
        elif link.kind == "split3":
            for key, part in zip(link.diffusers, tensor.chunk(3, dim=0)):
                out[key] = part.clone()
        elif link.kind == "transpose":
            out[link.diffusers[0]] = tensor.t().contiguous()
    return out


def to_original(links: list[Link], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout tensors from diffusers-layout ones (`get` reads one by key)."""
    out = {}
    for link in links:
        if link.kind == "same":
            out[link.original[0]] = get(link.diffusers[0])
        elif link.kind == "conv1x1":
            tensor = get(link.diffusers[0])
            out[link.original[0]] = tensor.reshape(*tensor.shape, 1, 1)
        elif link.kind == "split3":
            out[link.original[0]] = torch.cat([get(k) for k in link.diffusers], dim=0)
        elif link.kind == "transpose":
            out[link.original[0]] = get(link.diffusers[0]).t().contiguous()
    return out


def original_keys(links: list[Link]) -> set[str]:
    return {k for link in links for k in link.original}
