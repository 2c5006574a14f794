"""Caption augmentation of `[filewords]` captions: tags shuffled, tags dropped, whole captions dropped.

A caption is split at commas into tags. With "Shuffle Caption" the tags after
the first "Keep Tokens" are put in a random order; each of those tags is then
left out with probability "Caption Tag Dropout Rate"; and with probability
"Caption Dropout Rate" the whole prompt is replaced by "" (the picture is
trained unconditionally). The first Keep Tokens tags (usually the instance
token and class) are never moved or dropped. Every draw comes from a
generator seeded by the run's seed, the epoch and the picture, so the same
run (and a resumed one) sees the same captions at the same step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionAugment:
    shuffle: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.tag_dropout > 0 or self.caption_dropout > 0

    @classmethod
    def from_params(cls, params) -> "CaptionAugment":
        """The settings of a TrainingParams."""
        return cls(params.shuffle_caption, params.keep_tokens, params.caption_tag_dropout_rate,
                   params.caption_dropout_rate)


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of `caption`, stripped, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def augment_caption(caption: str, settings: CaptionAugment, rng: random.Random) -> str:
    """`caption` shuffled and thinned as `settings` say, drawing from `rng`; "" when the caption is dropped."""
    if settings.caption_dropout > 0 and rng.random() < settings.caption_dropout:
        return ""
    tags = split_tags(caption)
    fixed, free = tags[:settings.keep_tags], tags[settings.keep_tags:]
    if settings.shuffle:
        rng.shuffle(free)
    if settings.tag_dropout > 0:
        free = [tag for tag in free if rng.random() >= settings.tag_dropout]
    return ", ".join(fixed + free)


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of picture `index` in `epoch`: the same for the same run, seed and step."""
    return random.Random(f"{seed}:{epoch}:caption:{index}")
