"""Pictures in, training tensors out: finding, opening, resizing and flipping.

Any picture Pillow reads is accepted in any mode (RGBA, LA, P, L, 1-bit, CMYK,
16-bit) and turned into 8-bit RGB with the EXIF rotation applied, because
phone photos are stored sideways with an orientation tag. Transparent parts are
composited on white (drawings exported with a transparent background are meant
to be seen on white).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Padding of "keep the whole picture" resizes: the same white as transparent parts.
PAD_COLOR = (255, 255, 255)
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Picture files in `folder` (sorted), by extension, case-insensitive.

    Hidden files and folders (names starting with '.', e.g. macOS '._x.jpg'
    and this package's own temporary files) are skipped. A missing folder
    gives an empty list.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in candidates:
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


def load_image(path: str | Path) -> Image.Image | None:
    """The picture at `path` as 8-bit RGB, upright per its EXIF orientation.

    Returns None, and logs a warning naming the file, when it cannot be read
    (broken, truncated, not a picture). Never raises for a bad file.
    """
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not halfway through training
            image = ImageOps.exif_transpose(opened)
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # Pillow reports broken files as OSError/UnidentifiedImageError, some decoders as SyntaxError/ValueError.
        log.warning("Skipping unreadable picture %s (%s)", path, e)
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency composited on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, PAD_COLOR + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit) greyscale scaled down to 8 bits, not clipped as Pillow's convert does."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:
        # 'I' may hold 8-bit or 16-bit data; 16-bit files use the full 0..65535 range.
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def resize_to(image: Image.Image, size: tuple[int, int], *, center_crop: bool) -> Image.Image:
    """`image` at exactly `size` (width, height).

    center_crop: scale so the picture covers the target, then cut the middle
    (the "Center Crop" option). Otherwise scale so the whole picture fits,
    keeping its aspect ratio, and pad the rest with white.
    """
    width, height = size
    scale = (max if center_crop else min)(width / image.width, height / image.height)
    new_w = max(1, round(image.width * scale))
    new_h = max(1, round(image.height * scale))
    if center_crop:
        new_w, new_h = max(new_w, width), max(new_h, height)  # rounding must not leave a gap
    resized = image.resize((new_w, new_h), _LANCZOS) if (new_w, new_h) != image.size else image
    if center_crop:
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), PAD_COLOR)
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def crop_top_left(image_size: tuple[int, int], size: tuple[int, int], *, center_crop: bool,
                  flip: bool = False) -> tuple[int, int]:
    """(top, left) of the part `resize_to` keeps of a (width, height) `image_size` picture at `size`,
    in the resized picture's pixels, mirrored with `flip` (SDXL's crop_coords_top_left).
    A padded picture is whole: (0, 0)."""
    if not center_crop:
        return 0, 0
    width, height = size
    scale = max(width / image_size[0], height / image_size[1])
    new_w, new_h = max(round(image_size[0] * scale), width), max(round(image_size[1] * scale), height)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return top, (new_w - width - left) if flip else left


def to_tensor(image: Image.Image, *, flip: bool = False) -> torch.Tensor:
    """An RGB picture as a float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image, dtype=np.float32)
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) / 127.5 - 1.0
