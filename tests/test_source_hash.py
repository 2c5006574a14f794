"""The source checkpoint's SHA-256: recorded at Create Model when known, else computed by the first job
that needs it (training, Generate Ckpt), only from the file Create Model read."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from lora_trainer import checkpoint_io
from lora_trainer.checkpoint import create_model
from lora_trainer.config import ModelInfo
from lora_trainer.source_hash import source_sha256


def _place(models, source, name):
    shutil.copy(source, models.checkpoints / name)
    shutil.copy(source.with_suffix(".yaml"), (models.checkpoints / name).with_suffix(".yaml"))
    return models.checkpoints / name


@pytest.fixture
def reads(monkeypatch):
    """The files whose whole content was hashed, in order."""
    seen = []
    real_sha256 = checkpoint_io.file_sha256
    monkeypatch.setattr(checkpoint_io, "file_sha256", lambda path, **kw: seen.append(path) or real_sha256(path, **kw))
    return seen


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_hash(models, folder):
    """What a job does that needs the hash: take the model's, or compute it if Create Model left it."""
    with source_sha256(models, ModelInfo.load(folder / "model_info.json")) as sha256:
        return sha256.result()


def saved_hash(folder):
    return json.loads((folder / "model_info.json").read_text())["source_checkpoint_hash"]


def test_the_first_job_that_needs_the_hash_computes_it_once(models_dir, tiny_sd1, reads):
    source = _place(models_dir, tiny_sd1, "base.safetensors")
    folder = create_model(models_dir, "base", "a")
    assert saved_hash(folder) == "" and reads == []  # Create Model did not read the file for its hash
    assert job_hash(models_dir, folder) == sha256_of(source) and reads == [source]
    # Kept in models/lora_trainer/checkpoint_hashes.json: the next job, or a Create Model, reads nothing.
    assert job_hash(models_dir, folder) == sha256_of(source) and reads == [source]
    assert saved_hash(create_model(models_dir, "base", "b")) == sha256_of(source) and reads == [source]


def test_a_source_changed_or_gone_since_create_model_is_not_hashed(models_dir, tiny_sd1, reads, caplog):
    source = _place(models_dir, tiny_sd1, "base.safetensors")
    changed = create_model(models_dir, "base", "changed")
    gone = create_model(models_dir, "base", "gone")
    data = bytearray(source.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: the file is no longer what the models were made from
    source.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="lora_trainer.source_hash"):
        assert job_hash(models_dir, changed) == ""
    assert "base.safetensors: the source checkpoint is gone or has changed since the model 'changed'" in caplog.text
    source.unlink()
    assert job_hash(models_dir, gone) == "" and reads == []


def test_a_source_outside_the_checkpoints_folder_is_hashed_by_create_model(models_dir, tiny_sd1, reads):
    # Such a file is recorded by its name only, so a later job could not find it again.
    folder = create_model(models_dir, str(tiny_sd1), "outside")
    assert saved_hash(folder) == sha256_of(tiny_sd1) and reads == [tiny_sd1]


def test_a_checkpoint_is_hashed_once_and_again_only_after_it_changed(models_dir, tiny_sd1, reads):
    source = _place(models_dir, tiny_sd1, "base.safetensors")

    def created_hash(name):
        return job_hash(models_dir, create_model(models_dir, "base", name))

    first = created_hash("a")
    assert first == sha256_of(source) and len(reads) == 1
    assert created_hash("b") == first and len(reads) == 1  # from models/lora_trainer/checkpoint_hashes.json
    cached = json.loads((models_dir.working / "checkpoint_hashes.json").read_text())
    assert cached == {str(source.resolve()): {"size": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns,
                                              "sha256": first}}

    data = bytearray(source.read_bytes())
    data[-1] ^= 1  # the file changed (one bit of its last tensor): hashed again, the new hash stored
    source.write_bytes(bytes(data))
    assert created_hash("c") == sha256_of(source) != first and len(reads) == 2
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # only touched: hashed again
    assert created_hash("d") != first and len(reads) == 3

    cache = models_dir.working / "checkpoint_hashes.json"
    cache.write_text("{not json")  # a damaged cache costs only the time
    assert created_hash("e") == sha256_of(source) and len(reads) == 4
    assert created_hash("f") == sha256_of(source) and len(reads) == 4

    gone = _place(models_dir, tiny_sd1, "gone.safetensors")
    created = create_model(models_dir, "gone", "g")
    job_hash(models_dir, created)
    assert len(json.loads(cache.read_text())) == 2
    gone.unlink()
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    created_hash("h")  # hashed and stored again: the entry of the deleted checkpoint is dropped
    assert list(json.loads(cache.read_text())) == [str(source.resolve())]


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_generate_ckpt_hashes_the_source_while_it_writes_unless_the_source_changed(models_dir, tiny_sd1, fmt):
    from helpers_merge import load_parts, make_model, random_lora, save_lora

    from lora_trainer.merge import merge_lora

    folder = make_model(models_dir, tiny_sd1)
    save_lora(models_dir.lora / "tiny_1000.safetensors", random_lora(*load_parts(folder)))
    source = models_dir.checkpoints / tiny_sd1.name
    out = merge_lora(models_dir, "tiny", fmt=fmt, custom_name="first")
    assert base_hash_in(out) == sha256_of(source) and models_dir.hash_cache.get(source) == sha256_of(source)

    other = make_model(models_dir, tiny_sd1, "other")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # changed since
    save_lora(models_dir.lora / "other_1000.safetensors", random_lora(*load_parts(other)))
    out = merge_lora(models_dir, "other", fmt=fmt, custom_name="second")
    assert base_hash_in(out) == ""


def base_hash_in(checkpoint):
    """The merged file's `lora_trainer_base_sha256` (a .ckpt keeps its metadata beside its state_dict)."""
    from lora_trainer.checkpoint_io import CheckpointReader

    if checkpoint.suffix == ".ckpt":
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["metadata"]["lora_trainer_base_sha256"]
    with CheckpointReader(checkpoint) as reader:
        return reader.metadata["lora_trainer_base_sha256"]


def test_a_source_that_cannot_be_read_gives_no_hash_and_the_job_goes_on(models_dir, tiny_sd1, monkeypatch, caplog):
    _place(models_dir, tiny_sd1, "base.safetensors")
    folder = create_model(models_dir, "base", "a")

    def unreadable(path, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_io, "file_sha256", unreadable)
    with caplog.at_level("WARNING", logger="lora_trainer.source_hash"):
        assert job_hash(models_dir, folder) == ""
    assert "could not be read for its hash ([Errno 13] Permission denied" in caplog.text
