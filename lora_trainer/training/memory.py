"""What a run needs on the GPU before any activation, counted from the model's file headers.

Users of older tools ran out of memory on 8 GB cards and found out only after
the model had loaded. Before anything is loaded here, the weights (in
the dtypes they will have), the values that train, their gradients and the
optimizer's moments are counted exactly from the safetensors headers of the
working model; the activations come on top and depend on resolution, batch
size and checkpointing, so this is the least a run needs, not an estimate. A
run whose least need is more than the GPU has free is refused with the options
that lower it; otherwise the console states the figure. The predicted peak,
activations and the allocator included, comes from `peak.py`. The "Check GPU
Memory" button gives both for the chosen parameters without starting anything.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainingParams
from ..errors import ConfigError
from ..lora import TEXT_TARGETS, UNET_TARGETS, is_target
from ..safetensors_stream import read_layout
from .parts import part_dtypes

log = logging.getLogger(__name__)

PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")  # text_encoder_2: SDXL's (absent: nothing counted)
EIGHT_BIT_MIN_VALUES = 4096   # bitsandbytes keeps 8-bit moments for tensors this large, 32-bit ones below
EIGHT_BIT_BLOCK = 256         # ... quantised in blocks of this many values, each with an fp32 absmax per moment
GB = 2**30
FP8_PARTS = ("unet", "text_encoder", "text_encoder_2")  # the parts whose layers Base Weight Storage fp8 keeps in float8


@dataclass(frozen=True)
class MemoryNeed:
    weights: int     # bytes of every part's weights in its training dtype
    training: int    # bytes of the trained values (when not among the weights), their gradients and moments

    @property
    def total(self) -> int:
        return self.weights + self.training


def part_layouts(model_dir: Path) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Key -> (dtype, shape) of each part's weight files (headers only)."""
    layouts = {}
    for part in PARTS:
        layout = {}
        for path in sorted((Path(model_dir) / part).glob("*.safetensors")):
            layout.update(read_layout(path))
        layouts[part] = layout
    return layouts


def least_memory(model_dir: Path, params: TrainingParams, dtypes: dict[str, torch.dtype]) -> MemoryNeed:
    """The bytes a run of `params` holds on the GPU before any activation (`dtypes`: see `part_dtypes`)."""
    layouts = part_layouts(model_dir)
    weights = sum(_stored_bytes(part, key, dtype, shape, dtypes, params)
                  for part, layout in layouts.items() for key, (dtype, shape) in layout.items())
    # An fp32 gradient per trained value; adapters also hold the value itself (it is not among the weights).
    per_value = 8 if params.use_lora else 4
    training = sum(math.prod(shape) * per_value + trained_state_bytes(math.prod(shape), params)
                   for shape in trained_shapes(layouts, params))
    return MemoryNeed(weights, training)


def _stored_bytes(part: str, key: str, dtype: torch.dtype, shape: tuple[int, ...], dtypes: dict[str, torch.dtype],
                  params: TrainingParams) -> int:
    """Bytes of one weight on the GPU: in its part's dtype, or 1 per value plus a 4-byte scale when Base Weight
    Storage fp8 keeps it in float8 (the weights of the UNet's and text encoder's Linear and Conv2d layers)."""
    values = math.prod(shape)
    if (params.base_weights == "fp8" and part in FP8_PARTS and key.endswith(".weight") and len(shape) in (2, 4)
            and "embeddings." not in key):
        return values + 4
    return values * (dtypes[part] if dtype.is_floating_point else dtype).itemsize


# The UNet convolutions LoCon adapts (locon.CONV_PARENTS), by their diffusers names.
LOCON_CONV = re.compile(r"(^|\.)(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(downsamplers|upsamplers)\.\d+\.conv)$")


def trained_shapes(layouts, params: TrainingParams) -> list[tuple[int, ...]]:
    """Shapes of the tensors the optimizer updates: the adapters' down and up matrices (with LoCon Conv Rank
    also those of the UNet's ResNet and resampler convolutions; with Use DoRA each adapter's magnitude per
    input column), or whole parts."""
    parts = ["unet"] + (["text_encoder", "text_encoder_2"] if params.train_text_encoder else [])
    if not params.use_lora:
        return [shape for part in parts for dtype, shape in layouts.get(part, {}).values() if dtype.is_floating_point]
    shapes = []
    for part in parts:
        targets, rank = (UNET_TARGETS, params.rank) if part == "unet" else \
            (TEXT_TARGETS, params.text_encoder_lora(1 if part == "text_encoder_2" else 0)[0])
        for key, (_, shape) in layouts.get(part, {}).items():
            path = key.removesuffix(".weight")
            if path == key:
                continue
            if len(shape) == 2 and is_target(path, targets):
                out_features, in_features = shape
                shapes += [(rank, in_features), (out_features, rank)]
            elif part == "unet" and params.conv_rank and len(shape) == 4 and LOCON_CONV.search(path):
                out_channels, in_channels, *kernel = shape
                conv_rank = rank if kernel == [1, 1] else params.conv_rank  # kohya: 1x1 ones take the LoRA's rank
                shapes += [(conv_rank, in_channels, *kernel), (out_channels, conv_rank, 1, 1)]
            else:
                continue
            if params.use_dora:  # one magnitude per input column, as the web UI applies dora_scale
                shapes.append((1, shape[1], *[1] * (len(shape) - 2)))
    return shapes


def trained_state_bytes(values: int, params: TrainingParams) -> int:
    """Bytes kept all run for one trained fp32 tensor of `values` values besides itself and its gradient:
    the optimizer's state and, with Use EMA, its average."""
    return optimizer_state_bytes(values, params) + (4 * values if params.use_ema else 0)


def optimizer_state_bytes(values: int, params: TrainingParams) -> int:
    """Bytes of the optimizer's state of one trained fp32 tensor of `values` values (`optimizer_state_tensors`)."""
    return sum(optimizer_state_tensors(values, params))


def optimizer_state_tensors(values: int, params: TrainingParams) -> list[int]:
    """The bytes of each tensor the optimizer keeps for one trained fp32 tensor of `values` values: AdamW's
    two moments; with Use 8bit Adam, for tensors of at least EIGHT_BIT_MIN_VALUES, one byte per value and
    moment plus an fp32 absmax per block and moment (bitsandbytes' blockwise AdamW8bit); Prodigy's four
    (s, the starting point p0, exp_avg, exp_avg_sq: prodigyopt keeps p0 only for a tensor that is not all
    zeros, which a LoRA's up matrices are at the first start but not when a run continues, so it is counted)."""
    if params.optimizer == "Prodigy":
        return [4 * values] * 4
    if params.use_8bit_adam and values >= EIGHT_BIT_MIN_VALUES:
        return [values, values, 4 * math.ceil(values / EIGHT_BIT_BLOCK), 4 * math.ceil(values / EIGHT_BIT_BLOCK)]
    return [4 * values] * 2


def free_gpu_memory(device: torch.device) -> int | None:
    """Bytes this process can still take on `device`: free on the card plus what its own allocator
    holds unused (e.g. left by the host's model); None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_memory(need: MemoryNeed, free: int | None, gpu: str) -> None:
    """Refuse a run whose least need is more than the GPU's `free` bytes (None: not a GPU, nothing to check)."""
    if free is None or need.total <= free:
        return
    raise ConfigError(f"GPU memory: this run needs at least {_size(need.total)} before activations (weights "
                      f"{_size(need.weights)}, training state {_size(need.training)}), {gpu} has {_size(free)} free: "
                      f"tick Use LORA, Mixed Precision fp16 and Use 8bit Adam, or untick Train Text Encoder")


def memory_report(model_dir: Path, params: TrainingParams, *, prior_preservation: bool = True) -> str:
    """One line for the "Check GPU Memory" button: what `params` hold on a GPU before activations, the
    predicted peak of the run (`peak.estimate_peak`; `prior_preservation`: a class picture beside each
    instance picture), and whether it fits this machine's GPU (counted for a GPU also where there is none)."""
    from ..config import MODEL_INFO_FILE, ModelInfo
    from .peak import PartConfigs, check_peak, describe_peak, estimate_for_configs

    family = ModelInfo.load(model_dir / MODEL_INFO_FILE).family
    need = least_memory(model_dir, params, part_dtypes(params, torch.device("cuda"), family))
    try:
        configs = PartConfigs.from_model_dir(model_dir)
        estimate = estimate_for_configs(configs, params, prior_preservation=prior_preservation, cache_dir=model_dir)
    except Exception as e:  # the count above stands on its own; say why the prediction is missing
        log.warning("Predicting the peak of %s failed: %s: %s", model_dir.name, type(e).__name__, e)
        return legacy_report(need) + f" (no peak prediction: {type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return f"{describe(need, None)} on a GPU; {describe_peak(estimate)}; no CUDA GPU here: training runs on the CPU"
    device = torch.device("cuda", torch.cuda.current_device())
    free = free_gpu_memory(device)
    name = torch.cuda.get_device_name(device)
    try:
        check_memory(need, free, name)
        check_peak(configs, params, estimate, free, name, prior_preservation=prior_preservation, cache_dir=model_dir,
                   device=device)
    except ConfigError as e:
        return str(e)
    return f"{describe(need, free)}; {describe_peak(estimate)}: fits"


def legacy_report(need: MemoryNeed) -> str:
    """The count before activations alone, and whether it fits this machine's GPU."""
    if not torch.cuda.is_available():
        return f"{describe(need, None)} on a GPU; no CUDA GPU here: training runs on the CPU"
    device = torch.device("cuda", torch.cuda.current_device())
    free = free_gpu_memory(device)
    try:
        check_memory(need, free, torch.cuda.get_device_name(device))
    except ConfigError as e:
        return str(e)
    return f"{describe(need, free)}: fits before activations"


def describe(need: MemoryNeed, free: int | None) -> str:
    """One console line: the least need, and what the GPU has free."""
    line = (f"GPU memory before activations: {_size(need.total)} (weights {_size(need.weights)}, "
            f"training state {_size(need.training)})")
    return line + (f"; {_size(free)} free" if free is not None else "")


def _size(size: int) -> str:
    return f"{size / GB:.1f} GB" if size >= GB else f"{size / 2**20:.0f} MB"
