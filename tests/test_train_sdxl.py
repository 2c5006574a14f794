"""Training an SDXL model: both encoders' states, the pooled embedding and each picture's size/crop ids."""
from __future__ import annotations

import pytest
import torch
from helpers_data import BLUE, RED, halves
from helpers_train import private_models
from safetensors import safe_open

from lora_trainer.config import Concept, ModelInfo, TrainingParams
from lora_trainer.data import DreamBoothDataset, Example, collate_examples
from lora_trainer.errors import ConfigError
from lora_trainer.host import ModelsDir
from lora_trainer.kohya import read_kohya_lora
from lora_trainer.train import train


def private(created_xl, root) -> ModelsDir:
    return private_models(created_xl, root, "xl")


def two_shapes(folder):
    halves(folder / "wide.png", RED, BLUE, size=(96, 48))
    halves(folder / "tall.png", BLUE, RED, size=(48, 96))
    for name in ("wide", "tall"):
        (folder / f"{name}.txt").write_text("a zwx thing", encoding="utf-8")
    return folder


def test_time_ids_are_each_pictures_real_size_and_crop(tmp_path):
    two_shapes(tmp_path)
    examples = [Example(tmp_path / "wide.png", "a", False, 0, (96, 48)), Example(tmp_path / "tall.png", "b", False, 0, (48, 96))]
    data = DreamBoothDataset(examples, [], resolution=32, center_crop=True, hflip=False, time_ids=True)
    wide, tall = data[0]["time_ids"].tolist(), data[1]["time_ids"].tolist()
    # 96x48 scaled to cover 32x32 is 64x32: 16 px cut on each side. (height, width, top, left, height, width)
    assert wide == [48, 96, 0, 16, 32, 32]
    assert tall == [96, 48, 16, 0, 32, 32]
    assert collate_examples([data[0], data[1]])["time_ids"].shape == (2, 6)


def test_two_steps_train_both_encoders_with_buckets_and_prior_preservation(created_xl, tmp_path):
    models = private(created_xl, tmp_path / "models")
    concept = Concept(instance_data_dir=str(two_shapes(tmp_path / "pictures")), instance_prompt="[filewords]",
                      class_prompt="a thing", num_class_images=2, class_infer_steps=2)
    params = TrainingParams(max_train_steps=2, resolution=64, use_buckets=True, train_batch_size=1, seed=3,
                            cache_latents=False, unet_learning_rate=1e-2, text_encoder_learning_rate=1e-2)
    result = train(models, "xl", params, [concept], device="cpu")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    # Class pictures were drawn with the SDXL pipeline into the model's folder.
    assert len(list((models.model_dir("xl") / "classifiers_0").glob("*.png"))) == 2
    with safe_open(str(result.lora_path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        ups = {k: f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                   "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        trained = [k for k in ups if k.startswith(prefix)]
        # Up matrices start at zero: any that moved got gradients through the SDXL conditioning.
        assert trained and any(ups[k].abs().max() > 0 for k in trained), prefix
    assert ModelInfo.load(models.model_dir("xl") / "model_info.json").lifetime_steps == 2


def test_full_finetune_of_sdxl_is_refused_naming_the_option(created_xl, tmp_path):
    models = private(created_xl, tmp_path / "models")
    concept = Concept(instance_data_dir=str(two_shapes(tmp_path / "pictures")))
    with pytest.raises(ConfigError, match=r"Use LORA \('use_lora'\)"):
        train(models, "xl", TrainingParams(use_lora=False, max_train_steps=1), [concept], device="cpu")


def test_cached_text_encoder_outputs_and_latents_train_the_unet_alone(created_xl, tmp_path):
    models = private(created_xl, tmp_path / "models")
    concept = Concept(instance_data_dir=str(two_shapes(tmp_path / "pictures")), instance_prompt="[filewords]")
    params = TrainingParams(max_train_steps=2, resolution=64, use_buckets=True, seed=4, train_text_encoder=False,
                            cache_text_encoder_outputs=True, unet_learning_rate=1e-2)
    result = train(models, "xl", params, [concept], device="cpu")
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(str(result.lora_path), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert not any(k.startswith("lora_te") for k in keys)
    with pytest.raises(ConfigError, match=r"Cache Text Encoder Outputs \('cache_text_encoder_outputs'\) needs"):
        train(models, "xl", TrainingParams(max_train_steps=1, cache_text_encoder_outputs=True), [concept], device="cpu")


def test_8gb_sdxl_preset_is_refused_on_a_cpu_with_the_reason(created_xl, tmp_path):
    import dataclasses

    from lora_trainer.presets import PRESETS, apply_preset

    preset = PRESETS["8 GB GPU (SDXL)"]
    assert (preset["resolution"], preset["use_buckets"], preset["cache_text_encoder_outputs"],
            preset["train_text_encoder"], preset["train_batch_size"]) == (1024, True, True, False, 1)
    models = private(created_xl, tmp_path / "models")
    concept = Concept(instance_data_dir=str(two_shapes(tmp_path / "pictures")))
    params = dataclasses.replace(apply_preset(TrainingParams(), "8 GB GPU (SDXL)", cuda=True), max_train_steps=1)
    before = sorted(p.name for p in models.model_dir("xl").iterdir())
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(models, "xl", params, [concept], device="cpu")
    assert sorted(p.name for p in models.model_dir("xl").iterdir()) == before


def test_memory_count_covers_both_text_encoders(created_xl):
    from lora_trainer.training.memory import least_memory
    from lora_trainer.training.parts import load_working_model, part_dtypes

    folder = created_xl.model_dir("xl")
    info = ModelInfo.load(folder / "model_info.json")
    params = TrainingParams(mixed_precision="fp16")
    dtypes = part_dtypes(params, torch.device("cuda"), info.family)
    assert (dtypes["text_encoder_2"], dtypes["vae"]) == (torch.float16, torch.float32)  # SDXL's VAE stays fp32
    model = load_working_model(folder, info, dtypes)
    # What the loaded parts hold: weights and stored buffers (position ids in older transformers).
    held = sum(t.numel() * t.element_size() for part in (model.unet, model.vae, *model.text_encoders)
               for t in part.state_dict().values())
    assert model.text_encoder_2 is not None
    assert least_memory(folder, params, dtypes).weights == held


@pytest.mark.one_env
def test_demo_runs_the_whole_path_on_the_tiny_sdxl_model(tmp_path, capsys):
    from lora_trainer.cli import main

    assert main(["demo", "--models-dir", str(tmp_path / "models"), "--steps", "2", "--model-type", "sdxl"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    lora = next(line for line in printed if "/Lora/" in line)
    merged = next(line for line in printed if line.endswith("_lora.safetensors"))
    assert lora.endswith("tiny-demo-sdxl_2.safetensors") and merged.endswith("tiny-demo-sdxl_2_lora.safetensors")
    from pathlib import Path

    assert all(Path(p).is_file() for p in (lora, merged, printed[-1]))
    assert read_kohya_lora(lora).family() == "sdxl"


@pytest.mark.parametrize("model_type, resolution, buckets", [("sdxl", 1024, True), ("sd1", 512, False), ("sd2-v", 768, False)])
def test_a_model_without_saved_parameters_starts_from_its_familys_defaults(model_type, resolution, buckets):
    params = ModelInfo(model_type=model_type, resolution=resolution).default_params()
    assert (params.resolution, params.use_buckets) == (resolution, buckets)


def test_train_on_the_command_line_starts_an_sdxl_model_at_its_native_size_with_buckets(created_xl, tmp_path):
    from lora_trainer.cli import build_parser
    from lora_trainer.cli.train import params_from_args

    models = private(created_xl, tmp_path / "models")
    info = ModelInfo.load(models.model_dir("xl") / "model_info.json")
    args = build_parser().parse_args(["train", "--models-dir", str(tmp_path / "models"), "--model", "xl", "--seed", "5"])
    params = params_from_args(args, models.model_dir("xl"))
    assert (params.resolution, params.use_buckets, params.seed) == (info.resolution, True, 5)


@pytest.mark.parametrize("changes, concept_changes, named", [
    ({"cache_text_encoder_outputs": True, "train_text_encoder": False, "shuffle_caption": True}, {}, "Shuffle Caption"),
])
def test_features_that_cannot_work_together_are_refused_before_anything_is_written(created_xl, tmp_path, changes,
                                                                                   concept_changes, named):
    models = private(created_xl, tmp_path / "models")
    concept = Concept(instance_data_dir=str(two_shapes(tmp_path / "pictures")), instance_prompt="[filewords]",
                      **concept_changes)
    before = sorted(p.name for p in models.model_dir("xl").iterdir())
    with pytest.raises(ConfigError, match=named):
        train(models, "xl", TrainingParams(max_train_steps=1, resolution=64, **changes), [concept], device="cpu")
    assert sorted(p.name for p in models.model_dir("xl").iterdir()) == before
