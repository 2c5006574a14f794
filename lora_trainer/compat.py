"""The one place that knows how installed library versions differ.

- transformers >= 5 drops the `text_model.` level inside `CLIPTextModel`: its
  state-dict keys and module names start at `embeddings.` / `encoder.`. The
  files we write (original checkpoints, kohya LoRA keys) always use the
  canonical names with `text_model.`; these helpers translate at the edge.
"""
from __future__ import annotations

import functools

CLIP_PREFIX = "text_model."


@functools.lru_cache(maxsize=None)
def clip_has_text_model_level() -> bool:
    """Whether the installed `CLIPTextModel` nests its weights under `text_model.`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=4)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return any(k.startswith(CLIP_PREFIX) for k in model.state_dict())


def canonical_clip_name(name: str) -> str:
    """A CLIPTextModel key or module name with the `text_model.` level, whatever is installed."""
    return name if name.startswith(CLIP_PREFIX) else CLIP_PREFIX + name


def installed_clip_name(name: str) -> str:
    """A canonical (`text_model.`) name as the installed CLIPTextModel spells it."""
    if clip_has_text_model_level():
        return canonical_clip_name(name)
    return name[len(CLIP_PREFIX):] if name.startswith(CLIP_PREFIX) else name
