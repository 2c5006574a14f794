"""Kohya-format LoRA files: reading them, and finding the weight each of their modules adapts.

A kohya LoRA holds, per adapted module, `<name>.lora_down.weight`,
`<name>.lora_up.weight` and optionally `<name>.alpha` (absent or 0: the rank,
as kohya and the web UI read it) and `<name>.dora_scale` (DoRA: the magnitude
per input column, [1, in, ...], which is what the web UI v1.10.1 applies, or per
output row, [out, 1, ...], as some newer tools write it; the web UI v1.10.1
divides even those by column norms, see `LoraModule.delta`). LoCon modules adapt convolutions: `lora_down`
has the kernel, `lora_up` is 1x1. `<name>` is `lora_unet_` or `lora_te_` plus
the module's path with '.' replaced by '_'. Tools spell the path differently:

- the diffusers UNet path (`lora_unet_down_blocks_0_attentions_0_...`), which is
  what kohya, the web UI and this project write;
- the original (ldm) UNet path (`lora_unet_input_blocks_1_1_...`);
- the CLIP path with or without `text_model_` (transformers >= 5 drops it), and
  `lora_te1_` instead of `lora_te_` (diffusers' `convert_state_dict_to_kohya`);
- the original text-encoder path (`lora_te_transformer_text_model_...` for SD 1.x,
  `lora_te_model_transformer_resblocks_0_attn_q_proj` for SD 2.x, the web UI's way).

Names are never parsed: `target_table` lists every Linear and Conv2d of the
architecture (built on the meta device, so it costs no memory) under every
spelling, and a LoRA's names are looked up in it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import keymap
from .checkpoint_io import CheckpointReader
from .compat import CLIP_PREFIX, canonical_clip_name
from .errors import ModelError
from .families import FAMILIES, UNET_PREFIX, ModelSpec, family_named

LEAVES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


@dataclass
class LoraModule:
    """One adapted module of a LoRA file."""

    name: str
    down: torch.Tensor   # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor     # [out, rank] or [out, rank, 1, 1]
    alpha: float
    dora_scale: torch.Tensor | None = None   # DoRA: [out, 1, ...] or [1, in, ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def keys(self) -> list[str]:
        extra = [] if self.dora_scale is None else [f"{self.name}.dora_scale"]
        return [f"{self.name}.lora_down.weight", f"{self.name}.lora_up.weight", *extra]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """(alpha / rank) * up @ down in fp32, shaped [out, in] or [out, in, kh, kw].

        A DoRA module's delta depends on the weight it adapts, `base` (required
        then, any shape with the delta's number of elements): `dora_scale * (W + d) /
        |W + d| - W`, norms over the axes `dora_scale` has size 1 in: for [1, in, ...]
        (what this project writes) that is network.py `apply_weight_decompose` of the
        web UI v1.10.1; a per-row [out, 1, ...] scale is normalised per row here, as
        the tools that write it mean it (the web UI v1.10.1 divides it by column
        norms). Raises ModelError when `dora_scale` fits neither the rows nor the
        columns of the weight.
        """
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        delta = product.reshape(self.delta_shape) * (self.alpha / self.rank)
        if self.dora_scale is None:
            return delta
        if base is None:
            raise ValueError(f"DoRA module {self.name}: the delta needs the weight it adapts")
        weight = base.float().reshape(delta.shape)
        scale = self.dora_scale.float()
        merged = weight + delta
        same_rank = scale.dim() == merged.dim()
        if same_rank and scale.shape[0] == merged.shape[0] and scale.numel() == merged.shape[0]:
            norms = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(scale.shape)
        elif same_rank and scale.shape[0] == 1 and scale.shape[1] == merged.shape[1] and scale.numel() == merged.shape[1]:
            norms = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(scale.shape)
        else:
            raise ModelError(f"module {self.name}: dora_scale {tuple(scale.shape)} fits neither the rows nor the "
                             f"columns of its weight {tuple(merged.shape)}; the file is broken, save the LoRA again")
        return merged * (scale / norms.clamp_min(torch.finfo(norms.dtype).eps)) - weight  # as LoRALinear.dora_weight


@dataclass
class KohyaLora:
    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str]

    def family(self) -> str | None:
        """The family name ('sd1', 'sd2', ...) from the metadata or the shapes; None when neither tells."""
        return family_from_metadata(self.metadata) or family_from_shapes(self.modules.values())


def read_kohya_lora(path: str | Path) -> KohyaLora:
    """Read a kohya-format LoRA (.safetensors, or a .ckpt/.pt loaded safely).

    Raises CheckpointError for an unreadable file, ModelError for one that is
    not a plain LoRA (LoHa/LoKr/DoRA keys, a module without up or down, shapes
    that do not fit together).
    """
    path = Path(path)
    with CheckpointReader(path) as reader:
        tensors = {key: reader.get(key) for key in reader.keys()}
        metadata = dict(reader.metadata)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in tensors.items():
        name, _, leaf = key.partition(".")
        if leaf in LEAVES:
            groups.setdefault(name, {})[leaf] = tensor
        else:
            foreign.append(key)
    if foreign:
        raise ModelError(f"{path.name}: {len(foreign)} keys are not plain LoRA weights (e.g. {', '.join(sorted(foreign)[:3])}); "
                         "LoHa and LoKr files cannot be merged, use a kohya LoRA, LoCon or DoRA")
    if not groups:
        raise ModelError(f"{path.name}: holds no LoRA weights (*.lora_down.weight / *.lora_up.weight)")
    modules = {name: _module(path, name, parts) for name, parts in sorted(groups.items())}
    return KohyaLora(path, modules, metadata)


def _module(path: Path, name: str, parts: dict[str, torch.Tensor]) -> LoraModule:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_up.weight" if up is None else "lora_down.weight"
        raise ModelError(f"{path.name}: module {name} has no {missing}; the file is incomplete, save the LoRA again")
    fits = (down.dim() in (2, 4) and up.dim() == down.dim() and up.shape[1] == down.shape[0]
            and tuple(up.shape[2:]) in ((), (1, 1)))
    if not fits:
        raise ModelError(f"{path.name}: module {name}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
    alpha = float(parts["alpha"].float().reshape(-1)[0]) if "alpha" in parts else 0.0
    # kohya and the web UI both read a missing or zero alpha as "alpha = rank" (scale 1).
    return LoraModule(name, down, up, alpha if alpha else float(down.shape[0]), parts.get("dora_scale"))


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The base family a LoRA's kohya (`ss_*`) or `modelspec.*` metadata names, if any."""
    version = metadata.get("ss_base_model_version", "").lower()
    architecture = metadata.get("modelspec.architecture", "").lower()
    for family in FAMILIES:
        if any(version.startswith(prefix) for prefix in family.lora_versions):
            return family.name
    for family in FAMILIES:
        if architecture.startswith(family.modelspec_prefix):
            return family.name
    ss_v2 = metadata.get("ss_v2", "").lower()
    if ss_v2 in ("true", "false"):
        return next(f.name for f in FAMILIES if f.ss_v2 == (ss_v2 == "true"))
    return None


def family_from_shapes(modules) -> str | None:
    """The family of the UNet's cross-attention width, for LoRAs without metadata (real model sizes only)."""
    second_encoder = {te.kohya_prefix + "_": f.name for f in FAMILIES for te in f.text_encoders[1:]}
    widths = {f.context_width: f.name for f in FAMILIES}
    for module in modules:
        for prefix, family in second_encoder.items():
            if module.name.startswith(prefix):
                return family
        if re.search(r"attn2_to_[kv]$", module.name) and module.down.shape[1] in widths:
            return widths[module.down.shape[1]]
    return None


@dataclass(frozen=True)
class Target:
    """The weight one LoRA module adapts, in both layouts."""

    part: str                       # "unet" | "text_encoder" | "text_encoder_2"
    diffusers_key: str              # key in the diffusers part, as the installed library spells it
    original_key: str               # key in an original-layout checkpoint
    rows: tuple[int, int] | None    # rows of original_key this weight is (OpenCLIP fused q/k/v), None: all
    shape: tuple[int, ...]          # the weight's shape


def target_table(spec: ModelSpec) -> dict[str, Target]:
    """Every kohya module name a LoRA for this architecture may use -> the weight it adapts."""
    table: dict[str, Target] = {}
    targets = _unet_targets(spec)
    for te in spec.family.text_encoders:
        targets += _text_targets(spec, te)
    for name, target in targets:
        table.setdefault(name.replace(".", "_"), target)
    return table


def _adaptable(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _unet_targets(spec: ModelSpec) -> list[tuple[str, Target]]:
    model = keymap.meta_model(spec, "unet")
    links = {link.diffusers[0]: link for link in keymap.unet_links(spec, model)}
    out = []
    for name, module in _adaptable(model):
        key = name + ".weight"
        original = links[key].original[0]
        target = Target("unet", key, original, None, tuple(module.weight.shape))
        out.append(("lora_unet_" + name, target))
        out.append(("lora_unet_" + original[len(UNET_PREFIX):-len(".weight")], target))
    return out


def _text_targets(spec: ModelSpec, te) -> list[tuple[str, Target]]:
    model = keymap.meta_model(spec, te.part)
    links = {key: link for link in keymap.text_links(spec, model, part=te.part) for key in link.diffusers}
    out = []
    for name, module in _adaptable(model):
        key = name + ".weight"
        link = links[key]
        original = link.original[0]
        shape = tuple(module.weight.shape)
        canonical = canonical_clip_name(name)
        if link.kind == "split3":
            index = link.diffusers.index(key)
            rows = (index * shape[0], (index + 1) * shape[0])
            original_name = original[:-len("in_proj_weight")] + "qkv"[index] + "_proj"
        else:
            rows, original_name = None, original[:-len(".weight")]
        target = Target(te.part, key, original, rows, shape)
        for path in (canonical, canonical[len(CLIP_PREFIX):] if canonical.startswith(CLIP_PREFIX) else canonical):
            out += [(prefix + "_" + path, target) for prefix in (te.kohya_prefix, *te.kohya_aliases)]
        if te.webui_strip:
            out.append((te.kohya_prefix + "_" + original_name[len(te.webui_strip):], target))
    return out


def shapes_fit(delta_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Same shape, or a Linear LoRA on a 1x1 convolution (and the reverse): SD 1.x and 2.x differ there."""
    if delta_shape == weight_shape:
        return True
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return squeeze(delta_shape) == squeeze(weight_shape)


def resolve(lora: KohyaLora, table: dict[str, Target], *, family: str, where: str) -> dict[str, Target]:
    """Map each module of `lora` to its target weight in `table`.

    `family` is the target's family name ('sd1', 'sd2', ...), `where` names it in messages.
    Raises ModelError when the LoRA is for another family (by name), when keys
    match no weight (with their count and examples) or when shapes do not fit.
    """
    lora_family = lora.family()
    if lora_family and lora_family != family:
        theirs, ours = family_named(lora_family).title, family_named(family).title
        raise ModelError(f"{lora.path.name}: this LoRA is for {theirs}, {where} is "
                         f"{ours}; choose a LoRA trained on an {ours} model")
    unmatched = [key for name, module in lora.modules.items() if name not in table for key in module.keys]
    if unmatched:
        raise ModelError(f"{lora.path.name}: {len(unmatched)} LoRA keys match no weight of {where} "
                         f"(e.g. {', '.join(unmatched[:3])}); is this LoRA for another model?")
    wrong = [(name, m.delta_shape, table[name].shape) for name, m in lora.modules.items()
             if not shapes_fit(m.delta_shape, table[name].shape)]
    if wrong:
        name, have, want = wrong[0]
        raise ModelError(f"{lora.path.name}: {len(wrong)} LoRA modules do not fit the weights of {where} "
                         f"(e.g. {name}: {have} vs {want}); is this LoRA for another model?")
    return {name: table[name] for name in lora.modules}
