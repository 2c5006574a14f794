"""Original -> diffusers -> original gives back the same keys and identical tensors."""
import pytest
import torch

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
