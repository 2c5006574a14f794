"""Class pictures: counting, planning, generation on the tiny model, cancel, resume, the command."""
from __future__ import annotations

import logging
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from helpers_data import BLUE, solid
from helpers_rounding import rate_fits
from PIL import Image

from lora_trainer import classimages
from lora_trainer.classimages import count_class_images, generate_class_images, plan_class_images
from lora_trainer.cli import main
from lora_trainer.config import Concept
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.host import ModelsDir

FAST = dict(class_infer_steps=2, class_guidance_scale=3.0)


@pytest.fixture
def models(created_sd1, tmp_path):
    """A private copy of the tiny working model (the session one must not be written to)."""
    models = ModelsDir.at(tmp_path / "models")
    shutil.copytree(created_sd1.model_dir("tiny"), models.model_dir("tiny"))
    return models


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_count_is_recursive(tmp_path):
    solid(tmp_path / "a.png")
    solid(tmp_path / "x" / "b.jpg")
    solid(tmp_path / "x" / "y" / "c.webp")
    (tmp_path / "x" / "c.txt").write_text("caption")
    solid(tmp_path / ".hidden" / "d.png")
    assert count_class_images(tmp_path) == 3
    assert count_class_images(tmp_path / "x") == 2
    assert count_class_images(tmp_path / "missing") == 0


def test_plan_logs_and_counts(tmp_path, caplog):
    data = tmp_path / "data"
    solid(data / "1.png", caption="scs girl, red hair")
    solid(data / "2.png", caption="scs, smiling")
    solid(tmp_path / "class" / "sub" / "old.png", BLUE)
    concepts = [Concept(instance_data_dir=str(data), class_data_dir=str(tmp_path / "class"), class_prompt="[filewords]",
                        instance_token="scs", class_token="girl", num_class_images_per_image=2),
                Concept(instance_data_dir=str(data), instance_prompt="scs girl"),
                Concept(),  # an empty UI slot: silent
                Concept(class_prompt="chibi girl", num_class_images=2)]  # a total needs no pictures
    with caplog.at_level(logging.INFO):
        jobs = plan_class_images(tmp_path / "model", concepts)
    assert _messages(caplog) == ["Concept requires 4 images.", f"Class dir {tmp_path / 'class'} has 1 images.",
                                 "Concept requires 0 images.", "Concept requires 2 images.",
                                 f"Class dir {tmp_path / 'model' / 'classifiers_3'} has 0 images."]
    assert [(j.concept_index, j.existing) for j in jobs] == [(0, 1), (3, 0)]
    assert jobs[1].prompts == ["chibi girl", "chibi girl"]
    # Picture n is made from instance caption n (in turn), with the instance token taken out.
    assert jobs[0].prompts == ["girl, smiling", "girl, red hair", "girl, smiling"]


def test_blank_class_prompt_refused_before_loading(tmp_path, models):
    solid(tmp_path / "data" / "1.png")
    concept = Concept(instance_data_dir=str(tmp_path / "data"), num_class_images=2)
    with pytest.raises(ConfigError, match="Class Prompt"):
        generate_class_images(models, "tiny", [concept])
    with pytest.raises(ModelError, match="nope"):
        generate_class_images(models, "nope", [concept])


def test_generates_exactly_the_missing_pictures(tmp_path, models, caplog):
    folder = tmp_path / "class"
    kept = solid(folder / "class_00000.png", BLUE)
    solid(folder / "sub" / "old.jpg", BLUE)
    before = kept.read_bytes()
    concept = Concept(class_data_dir=str(folder), class_prompt="chibi girl", class_negative_prompt="lowres",
                      num_class_images=4, **FAST)
    fractions = []
    with caplog.at_level(logging.INFO):
        made = generate_class_images(models, "tiny", [concept], batch_size=1, seed=5,
                                     progress=lambda message, fraction: fractions.append(fraction))
    assert made == [2]
    assert "Concept requires 4 images." in _messages(caplog)
    assert f"Class dir {folder} has 2 images." in _messages(caplog)
    assert fractions == [0.5, 1.0]
    assert kept.read_bytes() == before
    new = sorted(set(folder.glob("*.png")) - {kept})
    assert [p.name for p in new] == ["class_00001.png", "class_00002.png"]
    for path in new:
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == "chibi girl"
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            assert "Negative prompt: lowres" in image.text["parameters"] and "Steps: 2" in image.text["parameters"]
    assert count_class_images(folder) == 4
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert generate_class_images(models, "tiny", [concept]) == [0]
    assert f"Class dir {folder} has 4 images." in _messages(caplog)


def test_the_rate_in_images_per_second_is_measured_and_named_in_the_log_progress_and_result(tmp_path, models, caplog,
                                                                                          monkeypatch):
    ticks = iter(range(10, 100, 2))  # a generation clock that advances 2 s per reading
    monkeypatch.setattr(classimages, "_clock", lambda: float(next(ticks)))
    concept = Concept(class_data_dir=str(tmp_path / "c"), class_prompt="girl", num_class_images=3, **FAST)
    messages = []
    with caplog.at_level(logging.INFO):
        made = generate_class_images(models, "tiny", [concept], batch_size=2,
                                     progress=lambda message, fraction: messages.append(message))
    # Read at the start (10), after the batch of 2 (12) and after the batch of 1 (14).
    assert made == [3] and made.seconds == 4.0 and made.images_per_second == 0.75
    assert messages == ["Generating class images 2/3 (1.00 images/s)", "Generating class images 3/3 (0.75 images/s)"]
    assert "Generated 3 images in 4.0 s (0.75 images/s), 2 at a time, float32 on cpu" in _messages(caplog)


def test_cancel_between_batches_then_resume_reproducibly(tmp_path, models):
    concept = Concept(class_data_dir=str(tmp_path / "a"), class_prompt="girl", num_class_images=3, **FAST)
    cancel = threading.Event()
    made = generate_class_images(models, "tiny", [concept], batch_size=1, seed=11, cancel=cancel,
                                 progress=lambda message, fraction: cancel.set())
    assert made == [1] and count_class_images(tmp_path / "a") == 1
    assert generate_class_images(models, "tiny", [concept], batch_size=2, seed=11) == [2]
    # One uninterrupted run with the same seed makes the same pictures, whatever the batches were.
    other = Concept(class_data_dir=str(tmp_path / "b"), class_prompt="girl", num_class_images=3, **FAST)
    assert generate_class_images(models, "tiny", [other], batch_size=3, seed=11) == [3]
    arrays = {}
    for folder in ("a", "b"):
        arrays[folder] = [np.asarray(Image.open(p)) for p in sorted((tmp_path / folder).glob("*.png"))]
    assert len(arrays["a"]) == 3
    for a, b in zip(arrays["a"], arrays["b"]):
        np.testing.assert_allclose(a.astype(int), b.astype(int), atol=2)
    assert not np.array_equal(arrays["a"][0], arrays["a"][1])


def test_command_fills_the_models_classifiers_folder(tmp_path, models, capsys, caplog):
    data = tmp_path / "data"
    solid(data / "1.png")
    argv = ["classimages", "--models-dir", str(models.lora.parent), "--model", "tiny", "--instance_data_dir", str(data),
            "--class_prompt", "chibi girl", "--num_class_images", "2", "--class_infer_steps", "2",
            "--sample_batch_size", "2"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    folder = models.model_dir("tiny") / "classifiers_0"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(folder)
    # The last line gives the rate, worked out from the count and the seconds, which it prints rounded to 0.1 s
    # (2 images in 0.15 s read "0.2 s (13.33 images/s)").
    count, seconds, rate = re.fullmatch(r"Generated (\d+) images in (\d+\.\d) s \((\d+\.\d\d) images/s\)", printed[1]).groups()
    assert len(printed) == 2 and int(count) == 2
    assert rate_fits(2, float(seconds), float(rate), seconds_step=0.1, rate_step=0.01)
    assert f"Class dir {folder} has 0 images." in _messages(caplog)
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png", "class_00000.txt",
                                                        "class_00001.png", "class_00001.txt"]


def test_command_refuses_mixed_concept_sources(tmp_path, models, capsys):
    concepts = tmp_path / "concepts.json"
    concepts.write_text("[]")
    argv = ["classimages", "--models-dir", str(models.lora.parent), "--model", "tiny", "--concepts_list", str(concepts),
            "--class_prompt", "girl"]
    assert main(argv) == 2
    assert "--concepts_list and --class_prompt" in capsys.readouterr().err


def _nan_when(pipe, broken):
    """Make the pipeline's VAE give NaN pixels whenever `broken(vae)` says so (as fp16 VAEs do)."""
    real = pipe.vae.decode

    def decode(latents, **kwargs):
        pixels = real(latents, **kwargs)
        return (pixels[0] * float("nan"),) if broken(pipe.vae) else pixels

    pipe.vae.decode = decode


def test_a_half_precision_vae_that_gives_nan_is_decoded_again_in_fp32(created_sd1):
    from lora_trainer.pipeline import draw_pictures, load_pipeline

    pipe = load_pipeline(created_sd1.model_dir("tiny"), dtype=torch.bfloat16)
    _nan_when(pipe, lambda vae: vae.dtype != torch.float32)
    kwargs = dict(prompt="a thing", num_inference_steps=2, height=64, width=64)
    picture = draw_pictures(pipe, generator=torch.Generator().manual_seed(0), **kwargs)[0]
    assert pipe.vae.dtype == torch.bfloat16  # put back as it was
    latents = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    pipe.vae.to(torch.float32)
    with torch.no_grad():
        pixels = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).float(), return_dict=False)[0]
    expected = pipe.image_processor.postprocess(pixels, output_type="pil")[0]
    assert np.asarray(picture).std() > 0 and np.array_equal(np.asarray(picture), np.asarray(expected))

    _nan_when(pipe, lambda vae: True)
    with pytest.raises(ModelError, match="not numbers even in fp32"):
        draw_pictures(pipe, generator=torch.Generator().manual_seed(0), **kwargs)
