"""Pictures drawn in the tests (nothing is downloaded) for test_data.py and test_classimages.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(path: Path, color=RED, size=(48, 32), caption: str | None = None) -> Path:
    """A one-colour RGB picture, with a caption .txt when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def halves(path: Path, left=RED, right=BLUE, size=(40, 20)) -> Path:
    """Left half one colour, right half another: shows flips and rotations."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def to_rgb_array(pixels: torch.Tensor) -> np.ndarray:
    """A [3, H, W] tensor in [-1, 1] back to an H x W x 3 array of 0..255."""
    return ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round()


def close(color_a, color_b, tolerance=12) -> bool:
    return all(abs(float(a) - float(b)) <= tolerance for a, b in zip(color_a, color_b))
