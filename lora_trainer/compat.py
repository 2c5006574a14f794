"""The one place that knows how installed library versions differ.

- transformers >= 5 drops the `text_model.` level inside `CLIPTextModel`: its
  state-dict keys and module names start at `embeddings.` / `encoder.`. The
  files we write (original checkpoints, kohya LoRA keys) always use the
  canonical names with `text_model.`; these helpers translate at the edge.
- `from_pretrained` takes `dtype` from diffusers 0.40 and transformers 4.56 on
  and warns about `torch_dtype`, which older versions need.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os

CLIP_PREFIX = "text_model."


@functools.lru_cache(maxsize=None)
def clip_has_text_model_level(with_projection: bool = False) -> bool:
    """Whether the installed `CLIPTextModel` (or `CLIPTextModelWithProjection`) nests its weights under `text_model.`.

    transformers 5 dropped the level from CLIPTextModel but kept it in CLIPTextModelWithProjection.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=4, projection_dim=8,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return any(k.startswith(CLIP_PREFIX) for k in model.state_dict())


def canonical_clip_name(name: str) -> str:
    """A CLIPTextModel key or module name with the `text_model.` level, whatever is installed.

    `text_projection` (CLIPTextModelWithProjection) sits beside `text_model` in every version.
    """
    if name.startswith(CLIP_PREFIX) or name.split(".", 1)[0] == "text_projection":
        return name
    return CLIP_PREFIX + name


def installed_clip_name(name: str, with_projection: bool = False) -> str:
    """A canonical (`text_model.`) name as the installed CLIPTextModel (or ...WithProjection) spells it."""
    if clip_has_text_model_level(with_projection):
        return canonical_clip_name(name)
    return name[len(CLIP_PREFIX):] if name.startswith(CLIP_PREFIX) else name


# The first releases whose from_pretrained takes `dtype` (and warn about `torch_dtype`).
DTYPE_ARGUMENT_SINCE = {"diffusers": (0, 40), "transformers": (4, 56)}


def dtype_argument(library: str, dtype) -> dict:
    """`from_pretrained`'s keyword for the weights' dtype in the installed `library` ({} for None)."""
    if dtype is None:
        return {}
    release = tuple(int(part) for part in importlib.metadata.version(library).split(".")[:2])
    return {"dtype" if release >= DTYPE_ARGUMENT_SINCE[library] else "torch_dtype": dtype}


def enable_text_encoder_checkpointing(text_encoder) -> None:
    """Gradient checkpointing of a CLIPTextModel that also trains adapters behind frozen embeddings.

    transformers >= 4.35 takes `use_reentrant=False`; older versions only have
    the re-entrant kind, which needs inputs that require grad to pass gradients;
    newer ones rename it `activation_checkpointing_enable`.
    """
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return
    try:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        text_encoder.gradient_checkpointing_enable()
        text_encoder.enable_input_require_grads()


def new_accelerator(**kwargs):
    """An `accelerate.Accelerator` that may differ from one made earlier in this process.

    Accelerate keeps its settings (mixed precision, device) in process-wide
    shared state and refuses a second Accelerator with other settings; the UI
    trains many times in one process. Outside a distributed launch the shared
    state is reset first (`_reset_state` exists in accelerate 0.21 .. newest).
    """
    import accelerate
    from accelerate.state import AcceleratorState, GradientState, PartialState

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for state in (AcceleratorState, GradientState):
        if hasattr(state, "_reset_state"):
            state._reset_state()
    if not distributed and hasattr(PartialState, "_reset_state"):
        PartialState._reset_state()
    return accelerate.Accelerator(**kwargs)


def shardable_batch_sampler(batch_sampler):
    """A custom batch sampler accelerate can share out among processes.

    accelerate 0.21 reads `batch_sampler.sampler` (to synchronise its random
    generator) when it shards batches; newer versions use getattr with a
    default. A batch sampler that shuffles with its own seed has no such
    sampler: it gets `sampler = None` (nothing to synchronise).
    """
    if not hasattr(batch_sampler, "sampler"):
        batch_sampler.sampler = None
    return batch_sampler
