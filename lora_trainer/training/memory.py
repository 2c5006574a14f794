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
    trained = _trained_shapes(layouts, params)
    # An fp32 gradient per trained value; adapters also hold the value itself (it is not among the weights).
    per_value = 8 if params.use_lora else 4
    training = sum(math.prod(shape) * per_value + _moments(shape, params) for shape in trained)
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


def _trained_shapes(layouts, params: TrainingParams) -> list[tuple[int, ...]]:
    """Shapes of the tensors the optimizer updates: the adapters' down and up matrices, or whole parts."""
    parts = ["unet"] + (["text_encoder", "text_encoder_2"] if params.train_text_encoder else [])
    if not params.use_lora:
        return [shape for part in parts for dtype, shape in layouts[part].values() if dtype.is_floating_point]
    shapes = []
    for part in parts:
        targets, rank = (UNET_TARGETS, params.rank) if part == "unet" else \
            (TEXT_TARGETS, params.text_encoder_lora(1 if part == "text_encoder_2" else 0)[0])
        for key, (_, shape) in layouts[part].items():
            if key.endswith(".weight") and len(shape) == 2 and is_target(key.removesuffix(".weight"), targets):
                out_features, in_features = shape
                shapes += [(rank, in_features), (out_features, rank)]
    return shapes


def _moments(shape: tuple[int, ...], params: TrainingParams) -> int:
    """Bytes of AdamW's two moments of one tensor (8-bit ones for large tensors with Use 8bit Adam)."""
    values = math.prod(shape)
    return values * (2 if params.use_8bit_adam and values >= EIGHT_BIT_MIN_VALUES else 8)


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
    from .peak import PartConfigs, check_peak, describe_peak, estimate_for_configs, predicts

    need = least_memory(model_dir, params, part_dtypes(params, torch.device("cuda")))
    if not predicts(model_dir):
        return legacy_report(need) + " (no peak prediction for this model family yet)"
    configs = PartConfigs.from_model_dir(model_dir)
    try:
        estimate = estimate_for_configs(configs, params, prior_preservation=prior_preservation)
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
        check_peak(configs, params, estimate, free, name, prior_preservation=prior_preservation)
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
