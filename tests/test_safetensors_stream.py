"""The streaming .safetensors writer gives files the safetensors library reads back exactly."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.safetensors_stream import read_layout, write_safetensors


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g), "a.half": torch.randn(7, generator=g).half(),
            "c.bf16": torch.randn(2, 2, 1, 1, generator=g).bfloat16(), "d.ids": torch.arange(77).unsqueeze(0),
            "e.scalar": torch.tensor(4.6), "f.mask": torch.tensor([True, False, True]), "g.empty": torch.zeros(0, 4),
            "h.strided": torch.randn(4, 6, generator=g).t()}


def layout_of(tensors):
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def test_written_file_reads_back_exactly_with_metadata(tmp_path):
    tensors = sample_tensors()
    path = write_safetensors(tmp_path / "out.safetensors", layout_of(tensors), iter(tensors.items()),
                             metadata={"lora_trainer_base": "x.safetensors"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"lora_trainer_base": "x.safetensors"}
    assert read_layout(path) == layout_of(tensors)


def test_layout_is_read_from_files_the_library_wrote(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    assert read_layout(tmp_path / "lib.safetensors") == layout_of(tensors)


def test_a_tensor_that_does_not_match_its_layout_leaves_no_file(tmp_path):
    tensors = sample_tensors()
    wrong = dict(tensors, **{"d.ids": torch.arange(76).unsqueeze(0)})
    with pytest.raises(ValueError, match="d.ids"):
        write_safetensors(tmp_path / "out.safetensors", layout_of(tensors), iter(wrong.items()))
    with pytest.raises(ValueError, match="never written"):
        write_safetensors(tmp_path / "out.safetensors", layout_of(tensors), iter(list(tensors.items())[:-1]))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"mine")
    tensors = sample_tensors()
    with pytest.raises(FileExistsError):
        write_safetensors(path, layout_of(tensors), iter(tensors.items()))
    assert path.read_bytes() == b"mine"
    write_safetensors(path, layout_of(tensors), iter(tensors.items()), overwrite=True)
    assert set(load_file(str(path))) == set(tensors)


def test_a_deferred_metadata_entry_is_filled_in_once_the_tensors_are_written(tmp_path):
    import hashlib

    tensors = sample_tensors()
    written = []
    digest = hashlib.sha256(b"source").hexdigest()

    def late() -> str:  # called only after every tensor went to the file
        assert len(written) == len(tensors)
        return digest

    def stream():
        for item in tensors.items():
            written.append(item[0])
            yield item

    path = write_safetensors(tmp_path / "out.safetensors", layout_of(tensors), stream(), metadata={"a": "b"},
                             deferred={"lora_trainer_base_sha256": late})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "b", "lora_trainer_base_sha256": digest}
    assert all(torch.equal(load_file(str(path))[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="not 64 plain characters"):
        write_safetensors(tmp_path / "bad.safetensors", layout_of(tensors), iter(tensors.items()),
                          deferred={"h": lambda: "short"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_tensors_written_in_pieces_read_back_exactly(tmp_path, monkeypatch):
    from lora_trainer import safetensors_stream

    monkeypatch.setattr(safetensors_stream, "WRITE_PIECE", 7)  # every tensor of more than 7 bytes in several writes
    tensors = sample_tensors()
    path = write_safetensors(tmp_path / "out.safetensors", layout_of(tensors), iter(tensors.items()))
    back = load_file(str(path))
    assert all(torch.equal(back[key], tensor) for key, tensor in tensors.items())
