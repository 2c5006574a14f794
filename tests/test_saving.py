"""Saving on the way: every N steps and every N epochs, only the last K intermediate files kept (the final one
and a protected one always), and a sample grid per save shown in the gallery."""
from __future__ import annotations

import pytest
from PIL import Image

from helpers_train import instance_pictures, private_models
from lora_trainer.config import Concept, TrainingParams
from lora_trainer.errors import ConfigError
from lora_trainer.train import train
from lora_trainer.training.saving import Retention, SaveSchedule


def test_save_points_of_steps_and_epochs_not_at_the_last_step():
    schedule = SaveSchedule(TrainingParams(save_every_n_steps=4, save_every_n_epochs=2), total_steps=12)
    # 3 steps per epoch: epochs finish after steps 3, 6, 9, 12
    due = [step for step in range(1, 13) if schedule.due(step, step // 3)]
    assert due == [4, 6, 8]  # steps 4 and 8, epoch 2 after step 6; 12 is the final save
    assert not any(SaveSchedule(TrainingParams(), 12).due(s, s // 3) for s in range(1, 13))


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    retention = Retention(keep_last=2)
    files = [tmp_path / f"m_{i}.safetensors" for i in range(1, 6)]
    for i, path in enumerate(files):
        path.write_bytes(b"x")
        if i == 1:
            retention.protect(path)  # e.g. the best by validation loss
        retention.saved(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_2.safetensors", "m_4.safetensors", "m_5.safetensors"]
    # At the end the best moved on (to the final file): what the old best kept beyond the newest 2 goes.
    assert retention.settle(set()) == [files[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_4.safetensors", "m_5.safetensors"]
    keep_all = Retention(keep_last=0)
    for path in files[3:]:
        keep_all.saved(path)
    assert all(p.exists() for p in files[3:])


def test_bad_grid_seeds_are_refused_naming_the_field(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    with pytest.raises(ConfigError, match="sample_grid_seeds"):
        train(models, "tiny", TrainingParams(sample_grid_seeds="1, two"), [Concept(instance_data_dir="x")],
              device="cpu")


def test_only_the_last_k_intermediate_files_remain_and_each_save_has_a_grid(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    pictures = instance_pictures(tmp_path / "pictures")
    concept = Concept(instance_data_dir=str(pictures), instance_prompt="scs thing", save_infer_steps=1)
    params = TrainingParams(resolution=32, hflip=False, seed=0, train_text_encoder=False, num_train_epochs=2,
                            save_every_n_steps=2, save_every_n_epochs=1, keep_last_n_saves=1,
                            sample_grid_prompts="scs thing\n\na red scs thing\n", sample_grid_seeds="1, 2",
                            use_lifetime_steps=False)
    result = train(models, "tiny", params, [concept], device="cpu")
    per_epoch = len(list(pictures.glob("*.png")))
    total = 2 * per_epoch
    assert result.steps == total == 6
    # saves at steps 2, 3 (epoch 1) and 4; 6 is the final one: of the intermediate ones only step 4's stays
    assert sorted(p.name for p in models.lora.glob("*.safetensors")) == ["tiny_4.safetensors", "tiny_6.safetensors"]
    grids = sorted(models.model_dir("tiny").glob("samples/*_grid.png"))
    assert [g.name for g in grids] == [f"tiny_{s}_grid.png" for s in (2, 3, 4, 6)]
    assert set(grids) <= set(result.samples)
    with Image.open(grids[-1]) as grid:
        assert grid.size == (2 * 32, 2 * 32)  # two seeds wide, two prompts high


def test_keep_last_with_validation_leaves_the_newest_intermediate_files_the_final_and_the_best(created_sd1, tmp_path):
    """Keep Last N Intermediate Files = 1 with validation, saving every step: while the best moves on from step
    to step, each best is kept; at the end only the newest intermediate file, the final one and the best stay
    (before, the file an earlier best had kept stayed too)."""
    models = private_models(created_sd1, tmp_path / "models")
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    params = TrainingParams(resolution=32, hflip=False, seed=0, max_train_steps=4, num_train_epochs=4,
                            save_every_n_steps=1, keep_last_n_saves=1, validation_split=0.3,
                            unet_learning_rate=5e-2, use_lifetime_steps=False, save_preview_every_n_steps=0)
    result = train(models, "tiny", params, [concept], device="cpu")
    assert result.steps == 4 and result.best_step is not None
    expected = {"tiny_3.safetensors", "tiny_4.safetensors", result.best_lora.name}
    assert {p.name for p in models.lora.glob("*.safetensors")} == expected
