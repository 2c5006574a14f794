"""Hostile pictures and captions: decompression bombs, animated GIFs, captions in other encodings.

(Modes, EXIF rotation and truncated files are covered in test_data.py.)
"""
from __future__ import annotations

import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from helpers_data import BLUE, RED, close, solid
from PIL import Image

from lora_trainer.config import Concept
from lora_trainer.data import collect_examples, list_images, load_image
from lora_trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit black PNG of `width` x `height`, written row by row (a few KB on disk, never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (width + 7) // 8)
    packer, parts = zlib.compressobj(9), []
    for start in range(0, height, 1024):
        parts.append(packer.compress(row * min(1024, height - start)))
    parts.append(packer.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_skipped_before_decoding_without_a_memory_spike(tmp_path, reliability):
    # 30000 x 30000: Pillow itself refuses it at open; 12000 x 12000 (144 MP) it only warns about and decodes
    # (432 MB as RGB): both must be skipped from the header alone.
    bombs = [bomb_png(tmp_path / "huge.png", 30000, 30000), bomb_png(tmp_path / "large.png", 12000, 12000)]
    assert all(p.stat().st_size < 300_000 for p in bombs)
    code = (
        "import logging, resource, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from lora_trainer.images import load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "results = [load_image(p) for p in sys.argv[1:]]\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(results, (after - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, bombs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    results, grown_mb = done.stdout.rsplit(" ", 1)
    assert results == "[None, None]" and int(grown_mb) < 40, done.stdout
    lines = done.stderr.strip().splitlines()
    for bomb, size in zip(bombs, ("900000000 pixels", "12000 x 12000")):
        assert any(f"Skipping picture {bomb}" in line and size in line and "decompression bomb" in line
                   for line in lines), lines
    for bomb in bombs:
        line = next(line for line in lines if str(bomb) in line)
        reliability(f"Decompression bomb: {bomb.stat().st_size // 1024} KB PNG of {' x '.join(map(str, struct.unpack('>II', bomb.read_bytes()[16:24])))} pixels",
                    f"skipped: \"{line.replace(str(tmp_path), '...')}\"; memory grew {grown_mb} MB")


def test_an_animated_gif_trains_on_its_first_frame(tmp_path, reliability):
    frames = [Image.new("RGB", (16, 16), color) for color in (RED, BLUE)]
    path = tmp_path / "data" / "moving.gif"
    path.parent.mkdir()
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert list_images(path.parent) == [path]
    image = load_image(path)
    assert image.mode == "RGB" and close(image.getpixel((8, 8)), RED)
    instance, _ = collect_examples([Concept(instance_data_dir=str(path.parent), instance_prompt="scs thing")],
                                   tmp_path / "model")
    assert [e.image_path for e in instance] == [path]
    reliability("Animated GIF (red frame, then blue)", f"trained as {image.mode} of its first frame "
                f"(pixel {image.getpixel((8, 8))})")


@pytest.mark.parametrize("encoding, raw", ids=["utf-8 BOM", "utf-16 LE", "utf-16 BE"], argvalues=[
    ("utf-8 with BOM", "\ufeffcafé au lait".encode("utf-8")),
    ("utf-16 LE with BOM", "\ufeffcafé au lait".encode("utf-16-le")),
    ("utf-16 BE with BOM", "\ufeffcafé au lait".encode("utf-16-be")),
])
def test_captions_in_unicode_encodings_are_read(tmp_path, encoding, raw, reliability):
    data = tmp_path / "data"
    solid(data / "a.png").with_suffix(".txt").write_bytes(raw)
    instance, _ = collect_examples([Concept(instance_data_dir=str(data), instance_prompt="[filewords]")], tmp_path)
    assert instance[0].prompt == "café au lait", encoding
    reliability(f"Caption in {encoding}", f"read: prompt {instance[0].prompt!r}")


def test_a_latin1_caption_is_refused_naming_the_file(tmp_path, reliability):
    data = tmp_path / "data"
    caption = solid(data / "a.png").with_suffix(".txt")
    caption.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        collect_examples([Concept(instance_data_dir=str(data), instance_prompt="[filewords]")], tmp_path)
    message = str(refused.value)
    assert str(caption) in message and "UTF-8" in message and "\n" not in message
    reliability("Caption in Latin-1", f"refused: \"{message.replace(str(tmp_path), '...')}\"")
