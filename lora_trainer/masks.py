"""Masked loss: which parts of a picture the loss counts.

A mask is a greyscale picture beside the training picture, named
`<name>.mask.png` (white = trained, black = ignored, grey in between), or,
when there is none, the picture's own alpha channel. It is resized, cropped
and mirrored exactly as its picture, and the loss weights each latent pixel by
the mask's mean over that pixel's area. Pictures without either train as
without the option. Mask files are never taken for training pictures.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .errors import ConfigError
from .images import resize_to, to_tensor

log = logging.getLogger(__name__)

MASK_SUFFIX = ".mask"
MASK_EXTENSION = ".png"


def mask_path(picture: str | Path) -> Path:
    """Where the mask of `picture` lives: `<folder>/<stem>.mask.png`."""
    picture = Path(picture)
    return picture.with_name(picture.stem + MASK_SUFFIX + MASK_EXTENSION)


def is_mask_file(path: str | Path) -> bool:
    """Whether `path` is a mask (`<name>.mask.<ext>`) rather than a picture to train on."""
    return Path(path).stem.lower().endswith(MASK_SUFFIX)


def load_mask(picture: str | Path) -> Image.Image | None:
    """The mask of `picture` as an 8-bit greyscale picture of the picture's size, or None (no mask:
    no mask file and no transparency). Raises ConfigError naming the mask file when it cannot be read."""
    path = mask_path(picture)
    if path.is_file():
        try:
            with Image.open(path) as opened:
                opened.load()
                mask = ImageOps.exif_transpose(opened).convert("L")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ConfigError(f"{path}: mask picture cannot be read ({e}); replace or remove it") from None
        with Image.open(picture) as opened:
            size = ImageOps.exif_transpose(opened).size
        return mask if mask.size == size else mask.resize(size, Image.BILINEAR)
    return _alpha(picture)


def _alpha(picture: str | Path) -> Image.Image | None:
    try:
        with Image.open(picture) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
                return None
            alpha = image.convert("RGBA").getchannel("A")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # the picture's own loading reports it
    return None if alpha.getextrema() == (255, 255) else alpha


def mask_tensor(mask: Image.Image | None, size: tuple[int, int], *, center_crop: bool, flip: bool) -> torch.Tensor:
    """[1, H, W] weights in [0, 1] at `size` (width, height), placed as the picture is
    (padding counts as trained, as the padded picture does); all ones for None."""
    width, height = size
    if mask is None:
        return torch.ones(1, height, width)
    placed = resize_to(mask.convert("RGB"), size, center_crop=center_crop)
    return (to_tensor(placed, flip=flip)[:1] + 1.0) / 2.0


def latent_weights(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A batch of pixel masks [B, 1, H, W] as weights per latent pixel [B, 1, h, w] (mean over each area)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask.to(latents.device, torch.float32), latents.shape[-2:])
