"""The streaming .safetensors writer gives files the safetensors library reads back exactly."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.safetensors_stream import _read_header, data_section_start, read_layout, write_safetensors


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
    # In the order of the data in the file: the library lays tensors out by dtype first, not by name.
    _, header = _read_header(tmp_path / "lib.safetensors")
    in_file = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    assert list(read_layout(tmp_path / "lib.safetensors")) == in_file != sorted(in_file)


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


def copies_seen(monkeypatch, fail_with: int | None = None) -> list[tuple[int, int]]:
    """Every os.copy_file_range call as (offset in the source, bytes asked); `fail_with`: each fails so."""
    import errno
    import os

    seen, real = [], os.copy_file_range

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        seen.append((offset_src, count))
        if fail_with is not None:
            raise OSError(fail_with, errno.errorcode[fail_with])
        return real(src, dst, min(count, 5), offset_src, offset_dst)  # in several calls, as the kernel may

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    return seen


def test_tensors_of_an_open_file_are_copied_file_to_file_and_the_rest_from_memory(tmp_path, monkeypatch):
    from lora_trainer.checkpoint_io import CheckpointReader
    from lora_trainer.safetensors_stream import _read_header, file_span

    source = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(source, str(tmp_path / "source.safetensors"))
    start, header = _read_header(tmp_path / "source.safetensors")
    seen = copies_seen(monkeypatch)
    with CheckpointReader(tmp_path / "source.safetensors") as reader:
        out = {"b.weight": reader.get("b.weight"),              # unchanged: copied
               "a.half": reader.get("a.half") * 2,              # changed: from memory
               "c.bf16": reader.get("c.bf16").reshape(2, 2),    # the same bytes, another shape: copied
               "h.strided": reader.get("h.strided").t(),        # not contiguous: from memory
               "d.ids": reader.get("d.ids")[:, 10:20]}          # a part of a tensor: copied, that part
        write_safetensors(tmp_path / "out.safetensors", layout_of(out), iter(out.items()))
        assert file_span(reader.get("b.weight"))[1] == start + header["b.weight"]["data_offsets"][0]
    assert file_span(out["b.weight"]) is None  # not once the file is closed
    back = load_file(str(tmp_path / "out.safetensors"))
    for key, tensor in out.items():
        assert torch.equal(back[key], tensor), key
    offset = {k: start + header[k]["data_offsets"][0] for k in header if k != "__metadata__"}
    asked = sorted({first for first, _ in seen if first is not None})
    assert offset["b.weight"] in asked and offset["c.bf16"] in asked and offset["d.ids"] + 10 * 8 in asked
    assert offset["a.half"] not in asked and offset["h.strided"] not in asked


def test_a_kernel_that_cannot_copy_gets_the_bytes_written_from_memory(tmp_path, monkeypatch):
    import errno

    from lora_trainer.checkpoint_io import CheckpointReader

    source = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(source, str(tmp_path / "source.safetensors"))
    seen = copies_seen(monkeypatch, fail_with=errno.EXDEV)  # e.g. across file systems on an old kernel
    with CheckpointReader(tmp_path / "source.safetensors") as reader:
        out = {k: reader.get(k) for k in source}
        write_safetensors(tmp_path / "out.safetensors", layout_of(out), iter(out.items()))
    assert len(seen) == 1  # tried once, then from memory
    back = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in source.items())


def test_tensors_that_do_not_lie_where_the_header_says_are_not_taken_for_the_files(tmp_path):
    from lora_trainer.safetensors_stream import file_span, mapped_file

    source = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(source, str(tmp_path / "source.safetensors"))
    with mapped_file(tmp_path / "source.safetensors", source):  # in memory, not a map of the file
        assert all(file_span(t) is None for t in source.values())


def test_a_file_put_in_the_sources_place_meanwhile_is_not_what_is_copied(tmp_path, monkeypatch):
    import os

    from lora_trainer.checkpoint_io import CheckpointReader

    source = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(source, str(tmp_path / "source.safetensors"))
    seen = copies_seen(monkeypatch)
    with CheckpointReader(tmp_path / "source.safetensors") as reader:
        other = {k: torch.zeros_like(v) for k, v in source.items()}  # same layout, other bytes
        save_file(other, str(tmp_path / "other.safetensors"))
        os.replace(tmp_path / "other.safetensors", tmp_path / "source.safetensors")
        out = {k: reader.get(k) for k in source}
        write_safetensors(tmp_path / "out.safetensors", layout_of(out), iter(out.items()))
    assert seen  # copied file to file, from the file the reader opened
    back = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in source.items())


@pytest.mark.parametrize("data_start", [0, 8, 2048, 4088])
def test_a_header_padded_to_start_the_data_anywhere_in_a_page_reads_back(tmp_path, data_start):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    path = write_safetensors(tmp_path / "out.safetensors", layout_of(tensors), iter(tensors.items()),
                             metadata={"format": "pt"}, data_start=data_start)
    assert data_section_start(path) % 4096 == data_start
    back = load_file(str(path))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and torch.equal(f.get_tensor("d.ids"), tensors["d.ids"])


def test_copied_tensors_keep_their_files_order_and_offsets_within_a_page(tmp_path):
    from lora_trainer.checkpoint_io import CheckpointReader, save_checkpoint
    from lora_trainer.safetensors_stream import _read_header

    g = torch.Generator().manual_seed(0)
    source = {f"w{i:02d}": torch.randn(37 * (i + 1), generator=g) for i in range(12)}  # 148 bytes a step: no 8-byte order
    save_file(source, str(tmp_path / "source.safetensors"))
    start, header = _read_header(tmp_path / "source.safetensors")
    with CheckpointReader(tmp_path / "source.safetensors") as reader:
        made = {"made": torch.ones(3), **{f"new.{k}": reader.get(k) for k in reversed(list(source))}}
        save_checkpoint(made, tmp_path / "out.safetensors")
    out_start, out = _read_header(tmp_path / "out.safetensors")
    where = {k: out[k]["data_offsets"][0] for k in out if k != "__metadata__"}
    assert sorted(where, key=where.get) == [f"new.{k}" for k in source] + ["made"]  # the source's order, then the rest
    same_page_offset = [k for k in source
                        if (out_start + where[f"new.{k}"]) % 4096 == (start + header[k]["data_offsets"][0]) % 4096]
    assert same_page_offset == list(source)
    back = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(back[f"new.{k}"], t) for k, t in source.items()) and torch.equal(back["made"], made["made"])
