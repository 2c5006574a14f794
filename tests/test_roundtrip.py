"""Original -> diffusers -> original gives back the same keys and identical tensors."""
import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.checkpoint import create_model, export_checkpoint
from lora_trainer.checkpoint_io import CheckpointReader


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2v", "tiny_sdxl"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_round_trip_is_exact(request, variant, fmt, models_dir, tmp_path):
    source = request.getfixturevalue(variant)
    folder = create_model(models_dir, str(source), "m")
    back = export_checkpoint(folder, tmp_path / f"back.{fmt}", fmt=fmt)
    with CheckpointReader(source) as a, CheckpointReader(back) as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get(key).dtype == b.get(key).dtype, key
            assert torch.equal(a.get(key), b.get(key)), key


def test_export_writes_each_tensor_as_it_is_made(tiny_sd1, models_dir, tmp_path):
    """A merge's tensors are not all held in memory: when the hook makes the last one, the file already holds
    the ones before it, and a tensor made by the hook is in the file as made."""
    folder = create_model(models_dir, str(tiny_sd1), "m")
    written_before: list[int] = []

    def hook(part, key, tensor):
        written_before.append(sum(p.stat().st_size for p in tmp_path.glob(".out.safetensors.*.tmp")))
        return tensor + 1 if key == "conv_in.weight" else tensor

    export_checkpoint(folder, tmp_path / "out.safetensors", hook=hook)
    out = tmp_path / "out.safetensors"
    data_start = 8 + int.from_bytes(out.read_bytes()[:8], "little")
    last_size = sum(t.numel() * t.element_size() for t in load_file(str(out)).values() if t.shape) // 64
    # Nothing but the header before the first tensor is made; all but the last few before the last one is.
    assert written_before[0] <= data_start < out.stat().st_size - last_size <= written_before[-1], \
        (written_before[0], data_start, written_before[-1], out.stat().st_size)
    with CheckpointReader(tiny_sd1) as a, CheckpointReader(tmp_path / "out.safetensors") as b:
        key = "model.diffusion_model.input_blocks.0.0.weight"
        assert torch.equal(b.get(key), a.get(key) + 1)
