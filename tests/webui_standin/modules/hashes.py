"""Stand-in of modules/hashes.py (v1.10.1): the checkpoint SHA-256s the web UI keeps.

Same functions and signatures: `calculate_sha256(filename)`, `sha256_from_cache(filename,
title, use_addnet_hash=False)` (the stored hash of `title` unless the file is newer than it or
gone), `sha256(filename, title, use_addnet_hash=False)` (stored or computed and stored). The
web UI calls `sha256` with the title `checkpoint/<name>` when it loads a checkpoint, and
`CheckpointInfo` reads `sha256_from_cache` with it. Not here: the `--no-hashing` flag and the
addnet hash of LoRA files.
"""
import hashlib
import os

import webui_standin_calls
from modules.cache import cache, dump_cache


def calculate_sha256(filename):
    digest = hashlib.sha256()
    with open(filename, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_from_cache(filename, title, use_addnet_hash=False):
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    try:
        on_disk = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    entry = hashes.get(title)
    if entry is None or entry.get("sha256") is None or on_disk > entry.get("mtime", 0):
        return None
    return entry["sha256"]


def sha256(filename, title, use_addnet_hash=False):
    known = sha256_from_cache(filename, title, use_addnet_hash)
    if known is not None:
        return known
    webui_standin_calls.record("hashes.sha256", title)
    value = calculate_sha256(filename)
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    hashes[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    dump_cache()
    return value
