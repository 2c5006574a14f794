"""The SHA-256 of a working model's source checkpoint, computed when a job first needs it.

Hashing reads the whole checkpoint: 2.1 s of one core for SD 1.5's 2 GB in fp16 here, about 7 s for
SDXL's 6.9 GB; longer than "Create Model" itself takes to convert the file. So Create Model records
the hash only when it is known already (`models/lora_trainer/checkpoint_hashes.json`, or the web UI's
own cache), and otherwise the source's size and modification time. The first job that needs the hash
computes it from the file beside its own work: a training run (the LoRA's `ss_new_sd_model_hash`,
hashed while the model loads; its model_info.json keeps it from the first save on) or Generate Ckpt
into the model (`lora_trainer_base_sha256`, hashed while the checkpoint is written). Either stores it
in checkpoint_hashes.json, so the file is read for it once. A source that has changed since (another
size or time) or is gone is not hashed, since its hash would not be the source's: the hash stays
blank, and the job says so in its log.
"""
from __future__ import annotations

import logging

from .checkpoint_io import BackgroundSha256
from .config import ModelInfo
from .hash_cache import file_stamp
from .host import ModelsDir

log = logging.getLogger(__name__)


class _SourceSha256(BackgroundSha256):
    """A source's hash computed beside a job: one that cannot be read gives "" (it is metadata; the job goes on)."""

    def result(self) -> str:
        try:
            return super().result()
        except OSError as e:
            log.warning("The source checkpoint could not be read for its hash (%s); it is not recorded", e)
            return ""


def source_sha256(models: ModelsDir, info: ModelInfo) -> BackgroundSha256:
    """The source's hash: the one `info` holds, else computed beside the caller's work (use as a
    context manager; `result()` waits for it), else "" for a source that is gone, has changed or
    cannot be read."""
    if info.source_checkpoint_hash:
        return BackgroundSha256.known(info.source_checkpoint_hash)
    source = models.checkpoints / info.source_checkpoint if info.source_checkpoint else None
    recorded = (info.source_checkpoint_size, info.source_checkpoint_mtime_ns)
    if source is None or not info.source_checkpoint_size or file_stamp(source) != recorded:
        log.info("%s: the source checkpoint is gone or has changed since the model %r was created; its hash "
                 "is not recorded", source or "(none)", info.model_name)
        return BackgroundSha256.known("")
    return _SourceSha256(source, models.hash_cache)
