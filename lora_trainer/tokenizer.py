"""The CLIP tokenizer (49408 tokens), from local files only.

Looked for, in order: the Hugging Face cache (openai/clip-vit-large-patch14),
then the BPE vocabulary that open-clip-torch ships (the web UI installs it);
the vocabulary is turned into the `vocab.json` + `merges.txt` pair that
`CLIPTokenizer` reads. `open_clip` itself is never imported (it pulls in
torchvision); only its data file is read. Nothing here reaches the network.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import ModelError

CLIP_REPO = "openai/clip-vit-large-patch14"
VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _hf_cache_files() -> tuple[Path, Path] | None:
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        roots.append(os.path.join(os.environ["HF_HOME"], "hub"))
    roots.append(os.path.join(Path.home(), ".cache", "huggingface", "hub"))
    folder = "models--" + CLIP_REPO.replace("/", "--")
    for root in filter(None, roots):
        for snapshot in sorted(Path(root, folder, "snapshots").glob("*")):
            vocab, merges = snapshot / "vocab.json", snapshot / "merges.txt"
            if vocab.is_file() and merges.is_file():
                return vocab, merges
    return None


def open_clip_bpe_file() -> Path | None:
    """The BPE vocabulary inside the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BPE_FILE
        if candidate.is_file():
            return candidate
    return None


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_vocab_from_bpe(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
    """Build `vocab.json` and `merges.txt` from open_clip's BPE file, the way CLIP does."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # CLIP keeps 48894 merges, each "first second"
    base = _bytes_to_unicode()
    tokens = base + [t + "</w>" for t in base] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges_file


def save_tokenizer(out_dir: Path, *, pad_token: str = "<|endoftext|>"):
    """Write a CLIP tokenizer folder to `out_dir` from local files; return the tokenizer.

    SD 2.x uses "!" as its padding token, SD 1.x the end-of-text token.
    Raises ModelError saying how to provide the files when none are found.
    """
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    source = _hf_cache_files()
    if source is None:
        bpe = open_clip_bpe_file()
        if bpe is None:
            raise ModelError("CLIP tokenizer files not found: install open-clip-torch "
                             "(pip install --no-deps open-clip-torch) or put openai/clip-vit-large-patch14 in the Hugging Face cache")
        source = write_vocab_from_bpe(bpe, out_dir)
    else:
        for src in source:
            shutil.copyfile(src, out_dir / src.name)
    # Loading from a folder reads vocab.json + merges.txt in every transformers version.
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(str(out_dir))
    # A tokenizer.json written by a new `tokenizers` cannot be read by the web UI's old one
    # (0.13 with transformers 4.30); vocab.json + merges.txt are read by every version.
    (out_dir / "tokenizer.json").unlink(missing_ok=True)
    if len(tokenizer) != VOCAB_SIZE:
        raise ModelError(f"CLIP tokenizer from {source[0]} has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
