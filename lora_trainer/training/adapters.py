"""What trains: LoRA adapters injected into the UNet (and the text encoder), or, with
"Use LORA" off, the UNet (and the text encoder) themselves."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TrainingParams
from ..lora import TEXT_TARGETS, UNET_TARGETS, inject_lora, lora_parameters, lora_state_dict
from .parts import WorkingModel

UNET_PREFIX = "lora_unet"


@dataclass
class Adapters:
    """The injected LoRA layers by kohya module name; `text` is empty without Train Text Encoder."""

    unet: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)

    @property
    def all(self) -> dict:
        return {**self.unet, **self.text}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Kohya-named tensors (`.lora_down.weight`, `.lora_up.weight`, `.alpha`) of every adapter."""
        return lora_state_dict(*(part for part in (self.unet, self.text) if part))


def attach_lora(model: WorkingModel, params: TrainingParams) -> Adapters:
    """Inject fp32 adapters (up matrices zero: the model is unchanged until it trains) on the frozen base."""
    family = model.info.family
    unet = inject_lora(model.unet, UNET_TARGETS, rank=params.rank, alpha=params.lora_alpha, prefix=UNET_PREFIX,
                       rename=lambda path: family.unet_lora_path(path, model.unet.config))
    text = {}
    if params.train_text_encoder:
        for te, encoder in zip(family.text_encoders, model.text_encoders):
            text.update(inject_lora(encoder, TEXT_TARGETS, rank=params.text_encoder_rank,
                                    alpha=params.text_encoder_alpha, prefix=te.kohya_prefix))
    for parameter in lora_parameters({**unet, **text}):
        parameter.requires_grad_(True)
    return Adapters(unet, text)


def unfreeze_for_full_finetune(model: WorkingModel, params: TrainingParams) -> None:
    """"Use LORA" off: every UNet weight trains, and the text encoder's with Train Text Encoder."""
    model.unet.requires_grad_(True)
    for encoder in model.text_encoders:
        encoder.requires_grad_(params.train_text_encoder)


def trainable_groups(model: WorkingModel, adapters: Adapters | None, params: TrainingParams) -> list[dict]:
    """Optimizer parameter groups, each with its learning rate: LoRA UNet / text-encoder LRs,
    or the Learning Rate of a full fine-tune."""
    if adapters is None:
        groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": params.learning_rate}]
        if params.train_text_encoder:
            groups.append({"params": [p for e in model.text_encoders for p in e.parameters() if p.requires_grad],
                           "lr": params.learning_rate})
        return groups
    groups = [{"params": list(lora_parameters(adapters.unet)), "lr": params.unet_learning_rate}]
    if adapters.text:
        groups.append({"params": list(lora_parameters(adapters.text)), "lr": params.text_encoder_learning_rate})
    return groups
