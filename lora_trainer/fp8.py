"""Frozen base weights stored in float8 (e4m3) with a per-tensor scale, cast layer by layer to the compute dtype.

"Base Weight Storage" fp8 halves what the frozen UNet and text encoder hold
on the GPU (1 byte per weight instead of 2): each `nn.Linear` and `nn.Conv2d`
keeps its weight as float8 e4m3 plus one fp32 scale (the tensor's largest
magnitude over e4m3's largest value, 448), and its forward casts the weight
to the compute dtype (autocast's, else the dtype the layer was made for) just
for that layer. The cast weight is not kept for the backward pass: the
gradient to the layer's input casts it again, so only one layer's weight is
ever held in half precision. LoRA adapters wrap these layers as any
`nn.Linear` and stay in their own dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_NAME = "float8_e4m3fn"
E4M3_MAX = 448.0


def fp8_dtype() -> torch.dtype | None:
    """torch's float8 e4m3 dtype, or None on a torch without it (before 2.1)."""
    return getattr(torch, FP8_NAME, None)


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 base weights cannot work here (one phrase), or None when they can: torch must have the
    dtype and `device` must cast to and from it."""
    dtype = fp8_dtype()
    if dtype is None:
        return f"torch {torch.__version__} has no float8 (needs torch >= 2.1)"
    try:
        probe = torch.ones(4, device=device).to(dtype).to(torch.float32)
    except (RuntimeError, TypeError) as e:
        return f"the {device.type} device cannot cast to float8 ({str(e).splitlines()[0]})"
    if not torch.equal(probe.cpu(), torch.ones(4)):
        return f"the {device.type} device casts float8 wrongly"
    return None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 values, fp32 scale) with weight ~= values * scale."""
    amax = weight.detach().abs().max().float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (weight.detach().float() / scale).to(fp8_dtype()), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype) * scale.to(dtype)


def _compute_dtype(x: torch.Tensor, made_for: torch.dtype) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else made_for


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W cast from float8 here and again in backward (never kept in half)."""

    @staticmethod
    def forward(ctx, x, values, scale, bias, dtype):
        ctx.save_for_backward(values, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            b = bias.to(dtype) if bias is not None else None
            return F.linear(x.to(dtype), dequantize(values, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad):
        values, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ dequantize(values, scale, ctx.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(values, scale)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.conv = (stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            b = bias.to(dtype) if bias is not None else None
            return F.conv2d(x.to(dtype), dequantize(values, scale, dtype), b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        values, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(values, scale, ctx.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad.to(ctx.dtype), *ctx.conv).to(ctx.x_dtype)
        return (grad_x,) + (None,) * 8


class _StoredInFp8:
    """What both float8 layers share: the values and scale as buffers, the bias, the dtype made for."""

    def _keep(self, layer: nn.Module, compute_dtype: torch.dtype) -> None:
        values, scale = quantize(layer.weight)
        self.register_buffer("weight_fp8", values)
        self.register_buffer("weight_scale", scale)
        self.bias = layer.bias
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The stored float8 values (for code that reads `.weight.device`; multiply by `weight_scale`)."""
        return self.weight_fp8

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer computes with (values * scale), in `dtype`."""
        return dequantize(self.weight_fp8, self.weight_scale, dtype)


class Fp8Linear(_StoredInFp8, nn.Linear):
    """A frozen `nn.Linear` whose weight is stored as float8 e4m3 with a scale (see the module docstring)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._keep(linear, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.compute_dtype)
        return _Fp8Linear.apply(x, self.weight_fp8, self.weight_scale, self.bias, dtype)


class Fp8Conv2d(_StoredInFp8, nn.Conv2d):
    """A frozen zero-padded `nn.Conv2d` whose weight is stored as float8 e4m3 with a scale."""

    def __init__(self, conv: nn.Conv2d, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self._keep(conv, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.compute_dtype)
        return _Fp8Conv2d.apply(x, self.weight_fp8, self.weight_scale, self.bias, dtype, self.stride,
                                self.padding, self.dilation, self.groups)


def is_fp8_candidate(module: nn.Module) -> bool:
    """Layers stored in float8: every `nn.Linear` that runs its own forward, and `nn.Conv2d` with zero padding."""
    if isinstance(module, (Fp8Linear, Fp8Conv2d, nn.modules.linear.NonDynamicallyQuantizableLinear)):
        return False  # done already; or read by nn.MultiheadAttention directly
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every frozen candidate layer of `model` by its float8 form, one at a time (each
    half-precision weight is freed before the next is cast); return how many were replaced.

    Raises ValueError when a candidate's weight trains: only frozen weights can be stored in float8.
    """
    chosen = [(path, m) for path, m in model.named_modules() if is_fp8_candidate(m)]
    for path, module in chosen:
        if module.weight.requires_grad:
            raise ValueError(f"{path}: its weight trains; only frozen weights can be stored in float8")
        kind = Fp8Linear if isinstance(module, nn.Linear) else Fp8Conv2d
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, kind(module, compute_dtype))
    return len(chosen)
