"""Helpers for the merge tests: tiny working models, random kohya LoRAs, and the LoRA applied without merging.

The reference "base model with the LoRA applied" adds `scale * up(down(x))` to
each adapted module's output with forward hooks, so it shares no code with the
weight merge it checks.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_trainer.checkpoint import create_model
from lora_trainer.compat import canonical_clip_name
from lora_trainer.config import ModelInfo
from lora_trainer.host import ModelsDir

LIFETIME_STEPS = 1000


def make_model(models: ModelsDir, checkpoint: Path, name: str = "tiny", *, steps: int = LIFETIME_STEPS) -> Path:
    """Copy a tiny checkpoint (and its .yaml) into `models`, create a working model from it, set its steps."""
    for path in (checkpoint, checkpoint.with_suffix(".yaml")):
        shutil.copy(path, models.checkpoints / path.name)
    folder = create_model(models, checkpoint.name, name)
    info = ModelInfo.load(folder / "model_info.json")
    info.lifetime_steps = steps
    info.save(folder / "model_info.json")
    return folder


def load_parts(model_dir: Path):
    """The UNet and text encoder of a working model, in fp32, for inference."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet")).float().eval()
    text = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")).float().eval()
    return unet, text


def load_checkpoint_parts(checkpoint: Path, tmp: Path):
    """Load an original-layout checkpoint back through "Create Model" into a temporary models folder."""
    models = ModelsDir.at(tmp)
    models.checkpoints.mkdir(parents=True, exist_ok=True)
    return load_parts(create_model(models, str(checkpoint), "loaded-back"))


def adaptable(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def kohya_name(prefix: str, module_name: str) -> str:
    path = canonical_clip_name(module_name) if prefix == "lora_te" else module_name
    return f"{prefix}_{path.replace('.', '_')}"


def random_lora(unet, text, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                unet_only: bool = False) -> dict[str, torch.Tensor]:
    """A kohya state dict adapting every Linear and Conv2d (3x3 ones LoCon-style) with random, non-zero up."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    parts = [("lora_unet", unet)] + ([] if unet_only else [("lora_te", text)])
    for prefix, model in parts:
        for name, module in adaptable(model):
            key = kohya_name(prefix, name)
            weight = module.weight
            down_shape = (rank, weight.shape[1], *weight.shape[2:])
            up_shape = (weight.shape[0], rank) + ((1, 1) if weight.dim() == 4 else ())
            fan_in = weight[0].numel()
            out[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=generator) / fan_in ** 0.5
            out[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.2 / rank ** 0.5
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or {})
    return path


def apply_lora(model, state: dict[str, torch.Tensor], prefix: str, weight: float = 1.0) -> list:
    """Add `weight * alpha/rank * up(down(x))` to the output of each adapted module (forward hooks)."""
    handles = []
    for name, module in adaptable(model):
        key = kohya_name(prefix, name)
        if f"{key}.lora_down.weight" not in state:
            continue
        down, up = state[f"{key}.lora_down.weight"].float(), state[f"{key}.lora_up.weight"].float()
        alpha = float(state[f"{key}.alpha"]) if f"{key}.alpha" in state else down.shape[0]
        scale = weight * alpha / down.shape[0]
        if isinstance(module, torch.nn.Linear):
            def extra(x, down=down, up=up):
                return F.linear(F.linear(x, down), up)
        else:
            def extra(x, down=down, up=up, m=module):
                return F.conv2d(F.conv2d(x, down, stride=m.stride, padding=m.padding, dilation=m.dilation), up)
        handles.append(module.register_forward_hook(lambda m, args, out, extra=extra, scale=scale: out + scale * extra(args[0])))
    return handles


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, unet.config.in_channels, 8, 8), generator=generator)
    cond = torch.randn((2, 5, unet.config.cross_attention_dim), generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), encoder_hidden_states=cond).sample


def text_output(text, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        return text(ids).last_hidden_state
