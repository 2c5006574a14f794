"""Where files live: a models folder laid out like the web UI's `models/`.

    <models>/Stable-diffusion/   checkpoints (subfolders too), as the web UI lists them
    <models>/Lora/               LoRA files, as the built-in Lora extension lists them
    <models>/lora_trainer/<name> working models made by "Create Model"

Inside the web UI the first two come from the host's own options (the UI layer
passes them in); standalone they are all under `--models-dir`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ConfigError, ModelError
from .hash_cache import HASH_CACHE_FILE, HashCache

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")
_BAD_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


def validate_model_name(name: str) -> str:
    """Return the name stripped, or raise ConfigError when it cannot be a folder name.

    Refused: empty names, path separators, '..', names starting with a dot and
    characters Windows does not allow in file names.
    """
    cleaned = (name or "").strip()
    if not cleaned:
        raise ConfigError("Name: give the new model a name")
    if cleaned in (".", "..") or ".." in cleaned or _BAD_NAME.search(cleaned) or cleaned.startswith("."):
        raise ConfigError(f"Name: {name!r} is not allowed; use letters, digits, spaces, '-' or '_' (no '/', '\\', '..')")
    return cleaned


@dataclass
class ModelsDir:
    """The three folders the extension reads and writes."""

    checkpoints: Path
    lora: Path
    working: Path
    # The SHA-256 the host already knows for a checkpoint (the web UI's hash cache), else None.
    known_sha256: Callable[[Path], str | None] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def at(cls, models_dir: str | Path) -> "ModelsDir":
        root = Path(models_dir)
        return cls(root / "Stable-diffusion", root / "Lora", root / "lora_trainer")

    @property
    def hash_cache(self) -> HashCache:
        """The SHA-256 of checkpoints hashed before (Create Model, Merge Into)."""
        return HashCache(self.working / HASH_CACHE_FILE, host=self.known_sha256)

    def list_checkpoints(self) -> list[str]:
        """Checkpoint names relative to the checkpoints folder, as the web UI shows them."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.rglob("*") if p.suffix.lower() in CHECKPOINT_EXTENSIONS and p.is_file()]
        return sorted(p.relative_to(self.checkpoints).as_posix() for p in found)

    def find_checkpoint(self, name_or_path: str) -> Path:
        """Resolve a path, a file name (with or without extension) or a web UI title.

        Raises ModelError listing what is there when nothing matches.
        """
        text = _TITLE_HASH.sub("", (name_or_path or "").strip())
        if not text:
            raise ModelError("Source Checkpoint: choose a checkpoint")
        direct = Path(text).expanduser()
        if direct.is_file():
            return direct
        known = self.list_checkpoints()
        for candidate in known:
            stem = candidate.rsplit(".", 1)[0]
            if text in (candidate, stem, Path(candidate).name, Path(stem).name):
                return self.checkpoints / candidate
        listed = ", ".join(known[:5]) or "none"
        raise ModelError(f"Source Checkpoint: {name_or_path!r} not found as a file nor under {self.checkpoints} (found: {listed})")

    def list_models(self) -> list[str]:
        """Working models: folders under lora_trainer/ that hold a model_info.json."""
        if not self.working.is_dir():
            return []
        return sorted(p.parent.name for p in self.working.glob("*/model_info.json"))

    def model_dir(self, name: str) -> Path:
        return self.working / validate_model_name(name)

    def existing_model_dir(self, name: str) -> Path:
        """Raises ModelError when the model does not exist. What a killed process left in the models'
        folder and the model's (an unfinished Create Model, temporaries) is cleaned first, with a line."""
        from .leftovers import clean_leftovers

        path = self.model_dir(name)
        clean_leftovers(self.working, what="Create Model")
        clean_leftovers(path)
        if not (path / "model_info.json").is_file():
            known = ", ".join(self.list_models()) or "none"
            raise ModelError(f"Model: {name!r} not found under {self.working} (found: {known}); create it first")
        return path

    def list_loras(self) -> list[str]:
        if not self.lora.is_dir():
            return []
        return sorted(p.relative_to(self.lora).as_posix() for p in self.lora.rglob("*.safetensors"))
