"""Which model a checkpoint holds, and the diffusers configs that fit it.

The web UI's convention is followed: an original-layout `.yaml` beside the
checkpoint with the same base name decides the architecture; without one, the
family is recognised from the weights (see `families`) and the original config
shipped with this package is used. Text-encoder sizes always come from the
weights. What differs between families lives in `lora_trainer.families`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint_io import CheckpointReader
from .errors import CheckpointError
from .families import UNET_PREFIX, VAE_PREFIX, ModelSpec, TextEncoder, detect, family_of, family_of_config, parse_yaml

log = logging.getLogger(__name__)

__all__ = ["UNET_PREFIX", "VAE_PREFIX", "ModelSpec", "config_beside", "decide_sd2_prediction", "detect_family",
           "read_spec", "shipped_config", "spec_from_original_config", "text_config_from_weights"]

CLIP_HEAD_SIZE = 64


def shipped_config(model_type: str) -> str:
    """The original yaml shipped for `model_type`."""
    return family_of(model_type).shipped_config(model_type)


def config_beside(checkpoint: Path) -> Path | None:
    """The web UI's convention: `model.yaml` beside `model.safetensors`."""
    for suffix in (".yaml", ".yml"):
        candidate = checkpoint.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def detect_family(reader: CheckpointReader) -> str:
    """The family name ('sd1', 'sd2', ...) from the weights' names and shapes; CheckpointError for anything else."""
    return detect(reader)[0].name


def read_spec(reader: CheckpointReader) -> ModelSpec:
    """The model spec of a checkpoint: from the .yaml beside it, else recognised from the weights.

    Raises CheckpointError when the architecture cannot be told.
    """
    yaml_path = config_beside(reader.path)
    if yaml_path is not None:
        log.info("Using the config %s", yaml_path)
        spec = spec_from_original_config(yaml_path.read_text(encoding="utf-8"), source=str(yaml_path))
    else:
        family, model_type = detect(reader)
        shipped = model_type if model_type in family.configs else family.model_types[0]
        spec = spec_from_original_config(family.shipped_config(shipped), source=family.configs[shipped])
        spec.model_type = model_type
    for te in spec.family.text_encoders:
        setattr(spec, "text_2" if te.part == "text_encoder_2" else "text", text_config_from_weights(reader, te))
    return spec


def spec_from_original_config(text: str, source: str = "config") -> ModelSpec:
    """Translate an original-layout (ldm/sgm) yaml into diffusers configs.

    Raises CheckpointError naming `source` when a needed entry is missing.
    """
    root = parse_yaml(text, source)
    return family_of_config(root, source).spec_from_config(root, text, source)


def text_config_from_weights(reader: CheckpointReader, te: TextEncoder) -> dict:
    """CLIPTextConfig kwargs of text encoder `te`, read off the weights' shapes (head size 64)."""
    shape = reader.get_slice_shape
    keys = reader.keys()
    if te.kind == "clip":
        base = te.prefix + "text_model."
        vocab, hidden = shape(base + "embeddings.token_embedding.weight")
        positions = shape(base + "embeddings.position_embedding.weight")[0]
        layers = _count_indexed(keys, base + "encoder.layers.")
        intermediate = shape(base + "encoder.layers.0.mlp.fc1.weight")[0]
        projection, act = 768, "quick_gelu"
        if te.prefix + "text_projection.weight" in reader:
            projection = shape(te.prefix + "text_projection.weight")[0]
    else:
        base = te.prefix
        vocab, hidden = shape(base + "token_embedding.weight")
        positions = shape(base + "positional_embedding")[0]
        layers = _count_indexed(keys, base + "transformer.resblocks.")
        if te.drop_last_layer:
            # SD 2.x conditions on the penultimate layer: the last block is kept aside, unused.
            layers -= 1
        intermediate = shape(base + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection, act = 512, "gelu"
        if base + "text_projection" in reader:
            projection = shape(base + "text_projection")[1]
    if hidden % CLIP_HEAD_SIZE:
        raise CheckpointError(f"{reader.path}: text encoder width {hidden} is not a multiple of the CLIP head size 64")
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": hidden // CLIP_HEAD_SIZE,
        "max_position_embeddings": positions, "hidden_act": act, "projection_dim": projection,
        "bos_token_id": 49406 if vocab == 49408 else 0, "eos_token_id": 49407 if vocab == 49408 else 2,
        "pad_token_id": 1,
    }


def _count_indexed(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def decide_sd2_prediction(spec: ModelSpec, unet: torch.nn.Module) -> None:
    """What only the loaded UNet tells (SD 2.x 512 epsilon or 768 v), decided by the spec's family."""
    spec.family.settle(spec, unet)
