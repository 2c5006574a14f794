"""What trains: LoRA adapters injected into the UNet (and the text encoder), or, with
"Use LORA" off, the UNet (and the text encoder) themselves."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TrainingParams
from ..locon import inject_locon
from ..lora import TEXT_TARGETS, UNET_TARGETS, inject_lora, lora_parameters, lora_state_dict
from .parts import WorkingModel

UNET_PREFIX = "lora_unet"


@dataclass
class Adapters:
    """The injected LoRA layers by kohya module name: the UNet's, and each text encoder's (in the family's
    order; none without Train Text Encoder)."""

    unet: dict = field(default_factory=dict)
    text_encoders: list[dict] = field(default_factory=list)

    @property
    def text(self) -> dict:
        """The adapters of every text encoder."""
        return {name: layer for injected in self.text_encoders for name, layer in injected.items()}

    @property
    def all(self) -> dict:
        return {**self.unet, **self.text}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Kohya-named tensors (`.lora_down.weight`, `.lora_up.weight`, `.alpha`) of every adapter."""
        return lora_state_dict(*(part for part in (self.unet, *self.text_encoders) if part))


def attach_lora(model: WorkingModel, params: TrainingParams) -> Adapters:
    """Inject fp32 adapters (up matrices zero: the model is unchanged until it trains) on the frozen base;
    with LoCon Conv Rank also on the UNet's convolutions, with Use DoRA each with its magnitude."""
    family = model.info.family
    dora = params.use_dora
    rename = lambda path: family.unet_lora_path(path, model.unet.config)  # noqa: E731
    unet = inject_lora(model.unet, UNET_TARGETS, rank=params.rank, alpha=params.lora_alpha, prefix=UNET_PREFIX,
                       rename=rename, dora=dora)
    if params.conv_rank:
        unet.update(inject_locon(model.unet, rank=params.rank, alpha=params.lora_alpha, conv_rank=params.conv_rank,
                                 conv_alpha=params.conv_alpha, prefix=UNET_PREFIX, dora=dora, rename=rename))
    text = []
    if params.train_text_encoder:
        for index, (te, encoder) in enumerate(zip(family.text_encoders, model.text_encoders)):
            rank, alpha, _ = params.text_encoder_lora(index)  # SDXL's second encoder has its own
            text.append(inject_lora(encoder, TEXT_TARGETS, rank=rank, alpha=alpha, prefix=te.kohya_prefix, dora=dora))
    adapters = Adapters(unet, text)
    for parameter in lora_parameters(adapters.all):
        parameter.requires_grad_(True)
    return adapters


def unfreeze_for_full_finetune(model: WorkingModel, params: TrainingParams) -> None:
    """"Use LORA" off: every UNet weight trains, and the text encoder's with Train Text Encoder."""
    model.unet.requires_grad_(True)
    for encoder in model.text_encoders:
        encoder.requires_grad_(params.train_text_encoder)


def trainable_groups(model: WorkingModel, adapters: Adapters | None, params: TrainingParams) -> list[dict]:
    """Optimizer parameter groups, each with its learning rate: the LoRA UNet's, then one per text encoder
    (SDXL's second with the Lora Text Encoder 2 Learning Rate), or the Learning Rate of a full fine-tune."""
    if adapters is None:
        groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": params.learning_rate}]
        if params.train_text_encoder:
            groups.append({"params": [p for e in model.text_encoders for p in e.parameters() if p.requires_grad],
                           "lr": params.learning_rate})
        return groups
    groups = [{"params": list(lora_parameters(adapters.unet)), "lr": params.unet_learning_rate}]
    for index, injected in enumerate(adapters.text_encoders):
        groups.append({"params": list(lora_parameters(injected)), "lr": params.text_encoder_lora(index)[2]})
    return groups
