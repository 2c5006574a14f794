"""Option pairs the machine cannot run, refused before any weight is loaded.

Each refusal is one line naming both options (or the option and the device)
and what to choose instead, so the user fixes it before waiting for a model
to load.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..config import TrainingParams
from ..errors import ConfigError
from ..fp8 import fp8_problem
from ..optional import BITSANDBYTES_ON_CPU, bitsandbytes_runs_on_cpu
from .fastpath import COMPILE, compile_problem


@dataclass(frozen=True)
class Hardware:
    """What the chosen device and the installed packages can do."""

    device: torch.device
    bf16: bool              # the device computes in bf16
    xformers: bool          # the xformers package is installed
    bitsandbytes: bool      # the bitsandbytes package is installed
    sdpa: bool              # torch has scaled_dot_product_attention (torch >= 2)
    name: str = ""          # the GPU's name, for messages
    bitsandbytes_cpu: bool = False  # the installed bitsandbytes runs its 8-bit optimizers on the CPU

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when there is a GPU, else the CPU.

    Raises ConfigError when a CUDA device is asked for and there is none.
    """
    if device is None or str(device) == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return chosen


def probe_hardware(device: str | torch.device | None) -> Hardware:
    """Look at the device and the installed packages (imports nothing heavy)."""
    chosen = resolve_device(device)
    cuda = chosen.type == "cuda"
    return Hardware(device=chosen,
                    bf16=torch.cuda.is_bf16_supported() if cuda else True,
                    xformers=importlib.util.find_spec("xformers") is not None,
                    bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                    sdpa=hasattr(torch.nn.functional, "scaled_dot_product_attention"),
                    name=torch.cuda.get_device_name(chosen) if cuda else "CPU",
                    bitsandbytes_cpu=bitsandbytes_runs_on_cpu())


MP = "Mixed Precision ('mixed_precision')"
ATTN = "Memory Attention ('attention')"
ADAM8 = "Use 8bit Adam ('use_8bit_adam')"
OPTIMIZER = "Optimizer ('optimizer')"
FP8 = "Base Weight Storage fp8 ('base_weights')"


def check_options(params: TrainingParams, hw: Hardware) -> None:
    """Raise ConfigError for the first option pair that cannot work on `hw`."""
    where = f"--device {hw.device.type}"
    if params.mixed_precision == "fp16" and not hw.cuda:
        raise ConfigError(f"{MP} fp16 needs a CUDA GPU, but {where}; choose bf16 or no on the CPU")
    if params.mixed_precision == "bf16" and not hw.bf16:
        raise ConfigError(f"{MP} bf16: this GPU ({hw.name}) cannot compute in bf16 ({where}); choose fp16")
    if params.attention == "xformers":
        if params.mixed_precision not in ("fp16", "bf16"):
            raise ConfigError(f"{ATTN} xformers needs {MP} fp16 or bf16; choose one, or Memory Attention flash_attention")
        if not hw.cuda:
            raise ConfigError(f"{ATTN} xformers needs a CUDA GPU, but {where}; choose flash_attention")
        if not hw.xformers:
            raise ConfigError(f"{ATTN} xformers: the xformers package is not installed; "
                              "choose flash_attention (as fast, built into torch) or install xformers")
    if params.attention == "flash_attention" and not hw.sdpa:
        raise ConfigError(f"{ATTN} flash_attention needs torch 2 (scaled_dot_product_attention); choose default or xformers")
    if params.base_weights == "fp8":
        if not params.use_lora:
            raise ConfigError(f"{FP8} needs Use LORA ('use_lora'): a full fine-tune trains the base weights; choose default")
        problem = fp8_problem(hw.device)
        if problem:
            raise ConfigError(f"{FP8}: {problem}; choose Base Weight Storage default")
    if params.cache_text_encoder_outputs and params.train_text_encoder:
        raise ConfigError("Cache Text Encoder Outputs ('cache_text_encoder_outputs') needs the text encoders frozen: "
                          "untick Train Text Encoder ('train_text_encoder') or Cache Text Encoder Outputs")
    if params.use_8bit_adam:
        if not hw.cuda and not hw.bitsandbytes_cpu:
            which = "an older bitsandbytes" if hw.bitsandbytes else "no bitsandbytes"
            raise ConfigError(f"{ADAM8} needs a CUDA GPU, or bitsandbytes{BITSANDBYTES_ON_CPU} on the CPU, but {where} "
                              f"with {which}; untick Use 8bit Adam or install bitsandbytes{BITSANDBYTES_ON_CPU}")
        if not hw.bitsandbytes:
            raise ConfigError(f"{ADAM8}: the bitsandbytes package is not installed; untick Use 8bit Adam or install bitsandbytes")
    check_optimizer(params)
    if params.compile_unet:
        problem = compile_problem(hw.device)
        if problem:
            raise ConfigError(f"{COMPILE}: {problem}; untick it (training runs the same without it, only slower)")


def check_optimizer(params: TrainingParams) -> None:
    """Optimizer Prodigy: the prodigyopt package loads, and 8-bit Adam is not asked for too. Raises ConfigError."""
    if params.optimizer != "Prodigy":
        return
    if params.use_8bit_adam:
        raise ConfigError(f"{OPTIMIZER} Prodigy keeps its own full-precision state; untick {ADAM8} or choose AdamW")
    from ..optional import optional_features

    reason = optional_features()["prodigyopt"]
    if reason:
        raise ConfigError(f"{OPTIMIZER} Prodigy: {reason}; choose AdamW or install prodigyopt")


def check_parallel(params: TrainingParams, num_processes: int) -> None:
    """Under `accelerate launch` on several GPUs: accelerate evens out the last batches with
    pictures of other batches, which cannot be stacked when they come from other aspect buckets."""
    if num_processes > 1 and params.use_buckets and params.train_batch_size > 1:
        raise ConfigError(f"Aspect Ratio Bucketing ('use_buckets') with Batch Size ('train_batch_size') "
                          f"{params.train_batch_size} cannot run on {num_processes} GPUs; use Batch Size 1 or no buckets")
