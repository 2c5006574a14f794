"""The LoRA adapters training injects, and the kohya-format file they are saved as.

`inject_lora` wraps chosen `nn.Linear` modules of a UNet or CLIP text encoder in
`LoRALinear`: the frozen base plus `up(down(x)) * alpha / rank * multiplier`,
with `up` starting at zero so that step 0 is the base model exactly. Each
adapter is named as kohya sd-scripts and the web UI's built-in Lora name it
(`lora_unet_<diffusers path>`, `lora_te_text_model_<path>`; '.' -> '_'), so the
names `lora_state_dict` gives are the keys of the file, and the file is read
back by `kohya.read_kohya_lora` / `kohya.resolve` (merging) and by the web UI.

`save_lora` writes the file atomically with `sshs_model_hash` and
`sshs_legacy_hash` in its metadata: the hashes the web UI and the
additional-networks extension would otherwise compute by reading the file.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from .compat import canonical_clip_name
from .config import ModelInfo, TrainingParams
from .errors import ModelError
from .kohya import read_kohya_lora
from .modelspec import modelspec
from .safetensors_stream import encode_header, tensor_bytes, write_safetensors

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
NETWORK_MODULE = "networks.lora"
# The web UI's legacy ("old") hash reads this many bytes at this offset (modules/sd_models.py model_hash).
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_SIZE = 0x10000


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a [out, in] or [out, in, kh, kw] weight, shaped [1, in] / [1, in, 1, 1]."""
    per_column = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_column.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a low-rank update: base(x) + up(down(x)) * alpha / rank * multiplier.

    The adapter keeps its own dtype (fp32 adapters on an fp16/bf16 base): the
    input is cast to it and the update cast back to the base's output dtype.
    With `dora` (DoRA, weight-decomposed LoRA) the layer also learns a magnitude
    per input column, `dora_scale` ([1, in], [1, in, 1, 1] for a convolution,
    starting at the base's column norms): the weight used is
    `W + multiplier * (dora_scale * (W + dW) / |W + dW| - W)` with the norm over
    every axis but the input one, as the web UI v1.10.1's built-in Lora
    (network.py `apply_weight_decompose`) computes it whatever the shape of
    `dora_scale`: a per-row magnitude would be divided there by column norms and
    give another picture than training saw (seen in the real web UI).
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dtype: torch.dtype = torch.float32,
                 dora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1; got {rank}")
        self.base = base
        self.base_requires_grad = base.weight.requires_grad
        base.requires_grad_(False)
        device = base.weight.device
        self.lora_down, self.lora_up = self._low_rank(base, rank, device, dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as kohya's networks/lora.py
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.multiplier = 1.0
        self.dora_scale = None
        if dora:
            self.dora_scale = nn.Parameter(column_norms(self.base_weight(dtype).detach()))

    @staticmethod
    def _low_rank(base: nn.Module, rank: int, device, dtype) -> tuple[nn.Module, nn.Module]:
        return (nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype),
                nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads `.weight.dtype` / `.device` of a projection keeps working)."""
        return self.base.weight

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen base weight in `dtype`; a base stored in float8 gives its values times its scale."""
        dequantized = getattr(self.base, "dequantized", None)
        return dequantized(dtype) if dequantized is not None else self.base.weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in the adapter's dtype, shaped like the base weight."""
        product = self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)
        return product.reshape(self.base.weight.shape) * self.scale

    def dora_weight(self) -> torch.Tensor:
        """The weight DoRA uses (see the class docstring), in the adapter's dtype."""
        base = self.base_weight(self.lora_down.weight.dtype)
        merged = base + self.delta_weight()
        # No division by an all-zero column; any other norm is used as it is, so before the first step (W + dW = W,
        # dora_scale = |W|) the scale is exactly 1 and the layer computes exactly what its base does.
        norms = column_norms(merged).clamp_min(torch.finfo(merged.dtype).eps)
        return base + (merged * (self.dora_scale / norms) - base) * self.multiplier

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.base.bias is None else self.base.bias.to(weight.dtype)
        return nn.functional.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora_scale is not None:
            return self._apply_weight(x.to(self.lora_down.weight.dtype), self.dora_weight()).to(x.dtype)
        out = self.base(x)
        update = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (update * (self.scale * self.multiplier)).to(out.dtype)


class LoRAConv2d(LoRALinear):
    """A frozen `nn.Conv2d` plus a low-rank update, as kohya's LoCon (networks/lora.py with conv_dim) shapes it:
    `lora_down` a convolution with the base's kernel, stride and padding, `lora_up` a 1x1 convolution."""

    @staticmethod
    def _low_rank(base: nn.Module, rank: int, device, dtype) -> tuple[nn.Module, nn.Module]:
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                         bias=False, device=device, dtype=dtype)
        up = nn.Conv2d(rank, base.out_channels, (1, 1), bias=False, device=device, dtype=dtype)
        return down, up

    @property
    def in_features(self) -> int:
        return self.base.in_channels

    @property
    def out_features(self) -> int:
        return self.base.out_channels

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        return nn.functional.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)


def is_target(path: str, targets: tuple[str, ...]) -> bool:
    """Whether the module at `path` is one LoRA adapts: its path ends with one of `targets`."""
    return any(path == t or path.endswith("." + t) for t in targets)


def kohya_module_name(prefix: str, path: str) -> str:
    """`lora_unet_<path>` / `lora_te_text_model_<path>` with '.' -> '_' (text encoders: canonical `text_model.` path)."""
    if prefix.startswith("lora_te"):
        path = canonical_clip_name(path)
    return f"{prefix}_{path.replace('.', '_')}"


def inject_lora(model: nn.Module, targets: tuple[str, ...], *, rank: int, alpha: float, prefix: str,
                dtype: torch.dtype = torch.float32, rename=None, dora: bool = False) -> dict[str, LoRALinear]:
    """Wrap every `nn.Linear` of `model` whose path ends with one of `targets` in a `LoRALinear`.

    `prefix` is "lora_unet", "lora_te", "lora_te1" or "lora_te2"; `rename(path)` gives the path
    the name is made of (the family's `unet_lora_path`; default the module's own); returns kohya module name -> adapter,
    in the model's module order (`dora`: DoRA adapters). The base weights stop requiring gradients; the
    adapters are made in `dtype` on the base weight's device: give the model its
    device and dtype first, as a later `model.to(dtype)` casts the adapters too.
    Raises RuntimeError when `model` already holds adapters and ValueError when
    no module matches `targets`.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise RuntimeError(f"{type(model).__name__} already holds LoRA adapters; call remove_lora(model) before injecting again")
    chosen = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(path, targets)]
    if not chosen:
        raise ValueError(f"no nn.Linear of {type(model).__name__} ends with any of {', '.join(targets)}")
    return wrap_modules(model, [(path, m, rank, alpha) for path, m in chosen], prefix=prefix, dtype=dtype, dora=dora,
                        rename=rename)


def wrap_modules(model: nn.Module, chosen: list[tuple[str, nn.Module, int, float]], *, prefix: str,
                 dtype: torch.dtype, dora: bool, rename=None) -> dict[str, LoRALinear]:
    """Wrap each (path, Linear or Conv2d, rank, alpha) of `model` in its adapter; kohya name -> adapter
    (named from `rename(path)` when given)."""
    injected: dict[str, LoRALinear] = {}
    for path, module, rank, alpha in chosen:
        kind = LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear
        adapter = kind(module, rank=rank, alpha=alpha, dtype=dtype, dora=dora)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, adapter)
        injected[kohya_module_name(prefix, rename(path) if rename else path)] = adapter
    return injected


def remove_lora(model: nn.Module) -> None:
    """Put the base `nn.Linear` back in place of every `LoRALinear` of `model` (with its requires_grad as before)."""
    wrapped = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    for path, adapter in wrapped:
        adapter.base.requires_grad_(adapter.base_requires_grad)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, adapter.base)


def lora_parameters(injected: dict[str, LoRALinear]) -> list[nn.Parameter]:
    """The trainable weights (down, up, and DoRA's magnitude) of the adapters, in name order."""
    return [p for name in injected for p in _trained(injected[name])]


def _trained(adapter: LoRALinear) -> list[nn.Parameter]:
    extra = [] if adapter.dora_scale is None else [adapter.dora_scale]
    return [adapter.lora_down.weight, adapter.lora_up.weight, *extra]


def lora_state_dict(*injected: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The kohya tensors of the adapters: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`
    (and `<name>.dora_scale` for DoRA adapters).

    Detached, contiguous CPU copies in the adapters' dtype; alpha is a scalar fp32 tensor.
    """
    out: dict[str, torch.Tensor] = {}
    for group in injected:
        for name, adapter in group.items():
            if f"{name}.alpha" in out:
                raise ValueError(f"LoRA module {name} appears twice; use different prefixes for UNet and text encoder")
            out[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach().to("cpu", copy=True).contiguous()
            out[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach().to("cpu", copy=True).contiguous()
            out[f"{name}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
            if adapter.dora_scale is not None:
                out[f"{name}.dora_scale"] = adapter.dora_scale.detach().to("cpu", copy=True).contiguous()
    return out


def load_lora_state_dict(injected: dict[str, LoRALinear], tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy saved adapter weights into `injected` (to resume training); every key must match exactly.

    Raises ModelError naming `source` when keys are missing or unexpected, when
    a shape differs (another rank) or when a saved alpha differs from the adapter's.
    """
    expected = {f"{name}.{leaf}": adapter for name, adapter in injected.items()
                for leaf in ("lora_down.weight", "lora_up.weight", "alpha")
                + (("dora_scale",) if adapter.dora_scale is not None else ())}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                 for keys, what in ((missing, "keys missing"), (unexpected, "unexpected keys")) if keys]
        raise ModelError(f"{source}: does not fit the adapters being trained: {'; '.join(parts)}; "
                         "the LoRA was saved with other settings (targets, Train Text Encoder, LoCon or DoRA): "
                         "restore them or train a new model")
    shapes = {key: (tuple(tensors[key].shape), tuple(_leaf(adapter, key).shape))
              for key, adapter in expected.items() if not key.endswith(".alpha")}
    wrong = [(key, have, want) for key, (have, want) in shapes.items() if have != want]
    if wrong:
        key, have, want = wrong[0]
        if all(k.endswith(".dora_scale") for k, _, _ in wrong):  # saved before DoRA's magnitude became per column
            raise ModelError(f"{source}: its DoRA magnitudes are per output row (e.g. {key}: {have}); this version "
                             f"learns them per input column ({want}), as the web UI applies them: train a new model")
        raise ModelError(f"{source}: {len(wrong)} tensors have another shape than the adapters (e.g. {key}: {have} vs {want}); "
                         "the rank changed since it was saved: set it back or train a new model")
    alphas = [(key, float(tensors[key].float().reshape(-1)[0]), expected[key].alpha)
              for key in expected if key.endswith(".alpha")]
    changed = [(key, have, want) for key, have, want in alphas if not math.isclose(have, want, rel_tol=1e-3)]
    if changed:
        key, have, want = changed[0]
        raise ModelError(f"{source}: saved with alpha {have:g} (e.g. {key}), the settings say {want:g}; "
                         "set the alpha back or train a new model")
    with torch.no_grad():
        for key, adapter in expected.items():
            if not key.endswith(".alpha"):
                _leaf(adapter, key).copy_(tensors[key])


def _leaf(adapter: LoRALinear, key: str) -> nn.Parameter:
    if key.endswith(".dora_scale"):
        return adapter.dora_scale
    return adapter.lora_down.weight if key.endswith(".lora_down.weight") else adapter.lora_up.weight


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a kohya LoRA `.safetensors` atomically; return its path.

    Floating tensors are cast to `dtype` when given. The metadata gets
    `sshs_model_hash` (the web UI's "addnet" hash: sha256 of everything after
    the 8-byte length and JSON header, which it shows as the LoRA's hash) and
    `sshs_legacy_hash` (sha256 of the 0x10000 bytes at offset 0x100000, first 8
    hex digits: the additional-networks extension's legacy hash), both of the
    file as written. Both have a fixed length, so the header's length and with
    it every data offset are known before they are filled in. When the
    metadata is so large that the header reaches offset 0x100000, the legacy
    hash would cover itself and is left out.
    Raises FileExistsError when `path` exists and `overwrite` is False; a
    failure leaves nothing under `path`.
    """
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"LoRA metadata values must be strings; not so for {', '.join(map(str, bad[:3]))}")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    placeholder = {**metadata, "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
    data_start = 8 + len(encode_header(layout, placeholder))
    model_hash, legacy_hash = _data_hashes(tensors.values(), data_start)
    final = {**metadata, "sshs_model_hash": model_hash}
    if data_start <= LEGACY_HASH_OFFSET:
        final["sshs_legacy_hash"] = legacy_hash
    else:
        final = {k: v for k, v in final.items() if k != "sshs_legacy_hash"}
    return write_safetensors(path, layout, tensors.items(), metadata=final, overwrite=overwrite)


def _data_hashes(tensors, data_start: int) -> tuple[str, str]:
    """(addnet hash, legacy hash) of a file whose data section (these tensors in order) starts at `data_start`."""
    whole = hashlib.sha256()
    window = bytearray()
    position = data_start
    begin, end = LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_SIZE
    for tensor in tensors:
        data = tensor_bytes(tensor)
        whole.update(data)
        low, high = max(begin, position), min(end, position + len(data))
        if low < high:
            window += data[low - position:high - position]
        position += len(data)
    return whole.hexdigest(), hashlib.sha256(bytes(window)).hexdigest()[:8]


def addnet_hash(path: str | Path) -> str:
    """The web UI's hash of a `.safetensors` LoRA (modules/hashes.py addnet_hash_safetensors): sha256 of the data section."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        f.seek(8 + length)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def legacy_hash(path: str | Path) -> str:
    """The web UI's old model hash (modules/sd_models.py model_hash): sha256 of 64 KiB at 1 MiB, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(LEGACY_HASH_SIZE)).hexdigest()[:8]


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (kohya keys, every module with its alpha) and metadata of a LoRA file.

    A missing or zero alpha reads as the rank, as kohya and the web UI read it.
    Raises CheckpointError for an unreadable file, ModelError for one that is not a plain LoRA.
    """
    lora = read_kohya_lora(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in lora.modules.items():
        tensors[f"{name}.lora_down.weight"] = module.down
        tensors[f"{name}.lora_up.weight"] = module.up
        tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
        if module.dora_scale is not None:
            tensors[f"{name}.dora_scale"] = module.dora_scale
    return tensors, lora.metadata


def lora_metadata(info: ModelInfo, params: TrainingParams, *, steps: int, epochs: int, num_images: int,
                  started_at: float, finished_at: float, output_name: str, seed: int | None = None,
                  source_checkpoint: str | Path | None = None) -> dict[str, str]:
    """The metadata of a LoRA file: kohya's `ss_*` keys plus this project's `lora_trainer_*`.

    What the web UI v1.10.1's built-in Lora reads of it: `ss_output_name` (the
    name it shows and accepts in `<lora:...>`, unless set to show file names;
    two files with one name lose it, so pass the file's stem, steps included),
    `ss_base_model_version` (a value starting with "sdxl_" files it under SDXL)
    and `ss_v2` ("True" files it under SD2, otherwise SD1: its Lora tab hides
    LoRAs of another family than the loaded checkpoint unless set to show all), `sshs_model_hash` (its hash,
    written by `save_lora`); its metadata editor shows `ss_sd_model_name`,
    `ss_network_module` and `ss_training_started_at` (a Unix time) and orders
    `ss_sd_model_name`, `ss_resolution` and `ss_num_train_images` first in the
    metadata view. The other keys are for civitai and other kohya tools, with
    kohya's meaning: `ss_steps`/`ss_epoch` this run's, `ss_sd_model_hash` the
    web UI's legacy hash of the base checkpoint (only when `source_checkpoint`,
    its path, is given and exists) and `ss_new_sd_model_hash` its sha256;
    `ss_network_args` carries the text encoder's rank and alpha when they differ
    from the UNet's (kohya's own LoRA has one rank for both), SDXL's second text
    encoder's (`text_encoder_2_dim`/`_alpha`) when they differ from the first's, and
    `ss_text_encoder_lr` is the list of both encoders' learning rates when they
    differ (as kohya's SDXL scripts write it), LoCon's `conv_dim`
    and `conv_alpha` and DoRA's `dora_wd`. `seed` is the seed
    the run used (`params.seed` may be -1, "pick one"). The `modelspec.*` keys
    (architecture `stable-diffusion-v1/lora` etc.) are for ComfyUI and kohya's tools. The `lora_trainer_*`
    revision and lifetime steps are taken from `info`: update it first.
    """
    text_differs = params.train_text_encoder and (params.text_encoder_rank != params.rank
                                                  or params.text_encoder_alpha != params.lora_alpha)
    # SDXL's second text encoder: its own rank, alpha and learning rate when they differ from the first's.
    second = params.text_encoder_lora(1) if params.train_text_encoder and len(info.family.text_encoders) > 1 else None
    second_differs = second is not None and second[:2] != params.text_encoder_lora(0)[:2]
    text_lrs = [params.text_encoder_learning_rate] + ([second[2]] if second is not None else [])
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(params.rank),
        "ss_network_alpha": str(float(params.lora_alpha)),
        "ss_base_model_version": info.base_model_version,
        "ss_v2": str(bool(info.v2)),
        "ss_sd_model_name": info.source_checkpoint,
        "ss_resolution": str((params.resolution, params.resolution)),
        "ss_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_num_train_images": str(num_images),
        "ss_learning_rate": str(params.unet_learning_rate),
        "ss_unet_lr": str(params.unet_learning_rate),
        # kohya's SDXL scripts take one learning rate per text encoder and write the list when given two
        "ss_text_encoder_lr": str(text_lrs) if len(set(text_lrs)) > 1 else str(params.text_encoder_learning_rate),
        "ss_network_train_unet_only": str(not params.train_text_encoder),
        "ss_lr_scheduler": params.lr_scheduler,
        "ss_lr_warmup_steps": str(params.lr_warmup_steps),
        "ss_mixed_precision": params.mixed_precision,
        "ss_batch_size_per_device": str(params.train_batch_size),
        "ss_gradient_accumulation_steps": str(params.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(params.gradient_checkpointing),
        "ss_max_train_steps": str(params.max_train_steps),
        "ss_cache_latents": str(params.cache_latents),
        "ss_flip_aug": str(params.hflip),
        "ss_enable_bucket": str(params.use_buckets),
        "ss_noise_offset": str(params.noise_offset) if params.noise_offset else "None",
        "ss_min_snr_gamma": str(params.snr_gamma) if params.snr_gamma else "None",
        "ss_training_started_at": str(float(started_at)),
        "ss_training_finished_at": str(float(finished_at)),
        "ss_output_name": output_name,
        "ss_seed": str(params.seed if seed is None else seed),
        "ss_prior_loss_weight": str(params.prior_loss_weight),
        "lora_trainer_model": info.model_name,
        "lora_trainer_revision": str(info.revision),
        "lora_trainer_lifetime_steps": str(info.lifetime_steps),
        "lora_trainer_prediction_type": info.prediction_type,
        **modelspec(info.model_type, params.resolution, info.prediction_type, output_name, lora=True,
                    timestamp=finished_at),
    }
    network_args = {}
    if text_differs:
        network_args.update(text_encoder_dim=str(params.text_encoder_rank),
                            text_encoder_alpha=str(float(params.text_encoder_alpha)))
    if second_differs:
        network_args.update(text_encoder_2_dim=str(second[0]), text_encoder_2_alpha=str(float(second[1])))
    if params.conv_rank:  # kohya's LoCon arguments, as its train_network.py writes them
        network_args.update(conv_dim=str(params.conv_rank), conv_alpha=str(float(params.conv_alpha)))
    if params.use_dora:  # LyCORIS's name for weight decomposition
        network_args["dora_wd"] = "True"
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    if info.source_checkpoint_hash:
        meta["ss_new_sd_model_hash"] = info.source_checkpoint_hash
    if source_checkpoint is not None and Path(source_checkpoint).is_file():
        meta["ss_sd_model_hash"] = legacy_hash(source_checkpoint)
    return meta
