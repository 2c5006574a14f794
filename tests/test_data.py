"""Concepts -> examples -> batches: picture modes, EXIF, resize, flip, buckets, filewords, prior preservation."""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from helpers_data import BLUE, GREEN, RED, WHITE, close, halves, solid, to_rgb_array

from lora_trainer.buckets import BucketBatchSampler, bucket_resolutions, closest_bucket
from lora_trainer.config import Concept
from lora_trainer.data import (DreamBoothDataset, Example, bucket_batch_sampler, build_prompt, class_dir_for,
                               collate_examples, collect_examples, list_images, load_image, read_caption)
from lora_trainer.errors import ConfigError


# --- pictures in every mode -------------------------------------------------------------------------

def _rgba(path):
    image = Image.new("RGBA", (8, 4), (255, 0, 0, 0))  # transparent red: must come out white
    image.paste((0, 0, 255, 255), (4, 0, 8, 4))
    image.save(path)


def _la(path):
    image = Image.new("LA", (8, 4), (0, 0))
    image.paste((0, 255), (4, 0, 8, 4))
    image.save(path)


def _palette(path):
    image = Image.new("P", (8, 4), 0)
    image.putpalette([10, 20, 30] + [0, 0, 255] + [0] * 762)
    image.paste(1, (4, 0, 8, 4))
    image.save(path, transparency=0)  # palette entry 0 is transparent


def _grey(path):
    Image.new("L", (8, 4), 100).save(path)


def _one_bit(path):
    image = Image.new("1", (8, 4), 1)
    image.paste(0, (4, 0, 8, 4))
    image.save(path)


def _cmyk(path):
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(path, quality=95)


def _sixteen_bit(path):
    image = Image.new("I;16", (8, 4))
    image.putdata(([65535] * 4 + [32896] * 4) * 4)
    image.save(path)


def _rgb(path, **kw):
    Image.new("RGB", (8, 4), (200, 30, 30)).save(path, **kw)


MODES = [  # name, writer, left pixel, right pixel (after conversion to RGB)
    ("rgba.png", _rgba, WHITE, BLUE),
    ("la.png", _la, WHITE, (0, 0, 0)),
    ("palette.png", _palette, WHITE, BLUE),
    ("grey.png", _grey, (100, 100, 100), (100, 100, 100)),
    ("onebit.bmp", _one_bit, WHITE, (0, 0, 0)),
    ("cmyk.jpg", _cmyk, RED, RED),
    ("sixteen.png", _sixteen_bit, WHITE, (128, 128, 128)),
    ("rgb.jpg", _rgb, (200, 30, 30), (200, 30, 30)),
    ("rgb.webp", lambda p: _rgb(p, lossless=True), (200, 30, 30), (200, 30, 30)),
    ("rgb.bmp", _rgb, (200, 30, 30), (200, 30, 30)),
    ("upper.PNG", _grey, (100, 100, 100), (100, 100, 100)),
]


@pytest.mark.parametrize("name,write,left,right", MODES, ids=[m[0] for m in MODES])
def test_every_mode_loads_as_rgb(tmp_path, name, write, left, right, reliability):
    path = tmp_path / name
    write(path)
    stored = Image.open(path).mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 4)
    assert close(image.getpixel((1, 2)), left), image.getpixel((1, 2))
    assert close(image.getpixel((6, 2)), right), image.getpixel((6, 2))
    reliability(f"Picture {name} stored in mode {stored}",
                f"read as {image.mode} (left {image.getpixel((1, 2))}, right {image.getpixel((6, 2))})")


@pytest.mark.parametrize("orientation,top,bottom,size", [
    (1, RED, RED, (40, 20)),      # upright: left half red everywhere in the first column
    (3, BLUE, BLUE, (40, 20)),    # 180 degrees: red ends up on the right
    (6, RED, BLUE, (20, 40)),     # stored turned; shown rotated 90 degrees clockwise: left becomes top
    (8, BLUE, RED, (20, 40)),     # rotated 90 degrees counter-clockwise: left becomes bottom
])
def test_exif_rotation_applied(tmp_path, orientation, top, bottom, size, reliability):
    path = halves(tmp_path / "raw.png")
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = tmp_path / "photo.jpg"
    Image.open(path).save(rotated, exif=exif, quality=95)
    image = load_image(rotated)
    assert image.size == size
    assert close(image.getpixel((0, 0)), top, 40)
    assert close(image.getpixel((0, image.height - 1)), bottom, 40)
    reliability(f"JPEG with EXIF orientation {orientation} (stored 40 x 20)",
                f"read upright as {image.size[0]} x {image.size[1]}")


def test_broken_pictures_skipped_and_named(tmp_path, caplog, reliability):
    good = solid(tmp_path / "data" / "good.png")
    (tmp_path / "data" / "garbage.jpg").write_bytes(b"this is not a picture")
    whole = (tmp_path / "whole.png")
    Image.new("RGB", (64, 64), RED).save(whole)
    (tmp_path / "data" / "truncated.png").write_bytes(whole.read_bytes()[:60])
    concept = Concept(instance_data_dir=str(tmp_path / "data"), instance_prompt="scs girl")
    with caplog.at_level(logging.WARNING):
        instance, _ = collect_examples([concept], tmp_path / "model")
    assert [e.image_path for e in instance] == [good]
    assert "garbage.jpg" in caplog.text and "truncated.png" in caplog.text
    assert load_image(tmp_path / "data" / "garbage.jpg") is None
    for name in ("truncated.png", "garbage.jpg"):
        line = next(r.getMessage() for r in caplog.records if name in r.getMessage())
        reliability({"truncated.png": "A PNG whose file ends early (60 of its bytes)",
                     "garbage.jpg": "A .jpg that is not a picture"}[name],
                    f"skipped with a line: \"{line.replace(str(tmp_path), '...')}\"")


def test_all_pictures_broken_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"broken")
    with pytest.raises(ConfigError, match="Dataset Directory.*can be read"):
        collect_examples([Concept(instance_data_dir=str(tmp_path / "data"), instance_prompt="x")], tmp_path)


@pytest.mark.parametrize("setup", ["empty", "missing", "only_text"])
def test_empty_dataset_names_the_dataset_directory(tmp_path, setup):
    folder = tmp_path / "pictures"
    if setup != "missing":
        folder.mkdir()
    if setup == "only_text":
        (folder / "notes.txt").write_text("no pictures here")
    with pytest.raises(ConfigError) as info:
        collect_examples([Concept(instance_data_dir=str(folder), instance_prompt="scs girl")], tmp_path / "model")
    assert "Concept 1 Dataset Directory" in str(info.value) and str(folder) in str(info.value)


def test_no_concept_set_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="Dataset Directory"):
        collect_examples([Concept(), Concept()], tmp_path)


def test_list_images_recursive_and_hidden(tmp_path):
    solid(tmp_path / "a.jpg")
    solid(tmp_path / "sub" / "b.webp")
    solid(tmp_path / "._c.jpg")
    (tmp_path / "d.txt").write_text("caption")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.webp"]
    assert list_images(tmp_path / "nowhere") == []


# --- resize, crop, flip -----------------------------------------------------------------------------

def _bordered(path):
    """100x50: red border column on the left, blue on the right, green between."""
    image = Image.new("RGB", (100, 50), GREEN)
    image.paste(RED, (0, 0, 10, 50))
    image.paste(BLUE, (90, 0, 100, 50))
    image.save(path)
    return path


def _dataset(paths, *, resolution=32, center_crop=False, hflip=False, use_buckets=False, seed=0, class_paths=()):
    instance = [Example(p, "scs girl", False, 0) for p in paths]
    class_ = [Example(p, "girl", True, 0) for p in class_paths]
    return DreamBoothDataset(instance, class_, resolution=resolution, center_crop=center_crop, hflip=hflip,
                             use_buckets=use_buckets, seed=seed)


def test_center_crop_cuts_the_borders(tmp_path):
    item = _dataset([_bordered(tmp_path / "b.png")], center_crop=True)[0]
    pixels = to_rgb_array(item["pixel_values"])
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    for x in (0, 16, 31):
        assert close(pixels[16, x], GREEN, 30), (x, pixels[16, x])


def test_keep_whole_picture_pads(tmp_path):
    pixels = to_rgb_array(_dataset([_bordered(tmp_path / "b.png")], center_crop=False)[0]["pixel_values"])
    # 100x50 fits as 32x16, centred: white above and below, both borders kept.
    assert close(pixels[2, 16], WHITE) and close(pixels[29, 16], WHITE)
    assert close(pixels[16, 0], RED, 40) and close(pixels[16, 31], BLUE, 40) and close(pixels[16, 16], GREEN)


def test_small_pictures_are_upscaled(tmp_path):
    item = _dataset([solid(tmp_path / "s.png", BLUE, size=(5, 5))], resolution=64)[0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert close(to_rgb_array(item["pixel_values"])[32, 32], BLUE)


def test_flip_is_random_reproducible_and_a_mirror(tmp_path):
    paths = [halves(tmp_path / f"{i}.png") for i in range(16)]
    plain = _dataset(paths, hflip=False)
    flipping = _dataset(paths, hflip=True, seed=7)
    again = _dataset(paths, hflip=True, seed=7)
    flags = [flipping.flips(i) for i in range(16)]
    assert any(flags) and not all(flags)
    assert flags == [again.flips(i) for i in range(16)]
    assert not any(plain.flips(i) for i in range(16))
    for i in range(16):
        expected = torch.flip(plain[i]["pixel_values"], [2]) if flags[i] else plain[i]["pixel_values"]
        assert torch.equal(flipping[i]["pixel_values"], expected)
    flipping.set_epoch(1)
    assert [flipping.flips(i) for i in range(16)] != flags


# --- buckets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (64, 8), (128, 8)])
def test_bucket_sizes(resolution, step):
    buckets = bucket_resolutions(resolution)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert w * h >= 0.75 * resolution * resolution  # all about the same number of pixels
        assert (h, w) in buckets
    assert max(w / h for w, h in buckets) >= 2.0  # wide pictures get wide buckets


def test_closest_bucket_follows_aspect():
    buckets = bucket_resolutions(512)
    assert closest_bucket((1000, 1000), buckets) == (512, 512)
    wide = closest_bucket((1920, 1080), buckets)
    tall = closest_bucket((1080, 1920), buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])
    assert abs(wide[0] / wide[1] - 16 / 9) < 0.25


def test_bucketed_batches_share_one_shape(tmp_path):
    sizes = [(100, 50)] * 3 + [(50, 100)] * 2 + [(60, 60)] * 4
    paths = [solid(tmp_path / f"{i}.png", size=s) for i, s in enumerate(sizes)]
    dataset = _dataset(paths, resolution=64, use_buckets=True)
    assert dataset[0]["pixel_values"].shape[1:] == (dataset.bucket_of(0)[1], dataset.bucket_of(0)[0])
    assert dataset.bucket_of(0)[0] > dataset.bucket_of(0)[1] and dataset.bucket_of(3)[0] < dataset.bucket_of(3)[1]
    sampler = bucket_batch_sampler(dataset, 2, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples)
    seen = []
    for batch in loader:
        assert batch["pixel_values"].shape[0] <= 2
    first = sampler.batches(0)
    for indices in first:
        assert len({dataset.bucket_of(i) for i in indices}) == 1
        seen += indices
    assert sorted(seen) == list(range(len(sizes)))
    assert len(sampler) == len(first) == 2 + 1 + 2
    assert BucketBatchSampler(sampler.buckets, 2, seed=3).batches(0) == first
    assert any(sampler.batches(e) != first for e in range(1, 5))


# --- filewords --------------------------------------------------------------------------------------

SCS = dict(instance_token="scs", class_token="girl")
PROMPTS = [  # template, caption, tokens, is_class, expected
    ("[filewords]", "a girl with red hair", SCS, False, "scs girl with red hair"),
    ("[filewords]", "the girl, smiling", SCS, False, "scs girl, smiling"),
    ("[filewords]", "scs girl, smiling", SCS, False, "scs girl, smiling"),
    ("[filewords]", "scs, smiling", SCS, False, "scs girl, smiling"),
    ("[filewords]", "smiling, outdoors", SCS, False, "scs girl, smiling, outdoors"),
    ("[filewords]", "girls playing", SCS, False, "scs girl, girls playing"),
    ("[filewords]", "", SCS, False, "scs girl"),
    ("photo of [filewords]", "a Girl", SCS, False, "photo of scs Girl"),
    ("[FileWords], best quality", "a girl", SCS, False, "scs girl, best quality"),
    ("[filewords]", "smiling", dict(instance_token="scs"), False, "scs, smiling"),
    ("[filewords]", "scs smiling", dict(instance_token="scs"), False, "scs smiling"),
    ("[filewords]", r"\(franchise\) girl", SCS, False, "(franchise) scs girl"),
    ("[filewords]", "scs girl, smiling", SCS, True, "girl, smiling"),
    ("[filewords]", "scs, smiling", SCS, True, "girl, smiling"),
    ("[filewords]", "smiling", SCS, True, "girl, smiling"),
    ("[filewords]", "a Girl standing", SCS, True, "a Girl standing"),
    ("[filewords]", "scsgirl standing", SCS, True, "girl, scsgirl standing"),
    ("[filewords]", "scs girl", dict(instance_token="scs"), True, "girl"),
    ("[filewords]", "a photo", {}, True, "a photo"),
    ("chibi scs girl", "anything at all", SCS, False, "chibi scs girl"),
    ("chibi girl", "anything at all", SCS, True, "chibi girl"),
    ("", "a caption only", {}, False, "a caption only"),
    ("  chibi   scs girl ", "", {}, False, "chibi scs girl"),
]


@pytest.mark.parametrize("template,caption,tokens,is_class,expected", PROMPTS)
def test_build_prompt(template, caption, tokens, is_class, expected):
    assert build_prompt(template, caption, Concept(**tokens), is_class=is_class) == expected


def test_read_caption(tmp_path):
    picture = solid(tmp_path / "a.png")
    assert read_caption(picture) == ""
    picture.with_suffix(".txt").write_bytes("\ufeffscs girl, smiling\n".encode("utf-8"))
    assert read_caption(picture) == "scs girl, smiling"


def test_captions_become_prompts(tmp_path):
    data = tmp_path / "data"
    solid(data / "1.png", caption="a girl with a hat")
    solid(data / "2.png")
    concept = Concept(instance_data_dir=str(data), instance_prompt="[filewords]", **SCS)
    instance, class_ = collect_examples([concept], tmp_path / "model")
    assert [e.prompt for e in instance] == ["scs girl with a hat", "scs girl"]
    assert class_ == [] and all(not e.is_class and e.concept_index == 0 for e in instance)
    assert instance[0].size == (48, 32)


def test_blank_prompt_without_caption_is_an_error(tmp_path):
    solid(tmp_path / "data" / "1.png")
    with pytest.raises(ConfigError, match="Instance Prompt"):
        collect_examples([Concept(instance_data_dir=str(tmp_path / "data"))], tmp_path / "model")


# --- class pictures and prior preservation ----------------------------------------------------------

def test_blank_class_dir_is_the_models_classifiers_folder(tmp_path):
    model = tmp_path / "model"
    assert class_dir_for(Concept(), 2, model) == model / "classifiers_2"
    assert class_dir_for(Concept(class_data_dir=str(tmp_path / "c")), 0, model) == tmp_path / "c"


def test_class_examples_collected(tmp_path):
    model = tmp_path / "model"
    solid(tmp_path / "data" / "1.png", caption="scs girl")
    for i in range(4):
        solid(model / "classifiers_1" / "sub" / f"{i}.png", BLUE, caption=f"girl number {i}")
    concepts = [Concept(), Concept(instance_data_dir=str(tmp_path / "data"), instance_prompt="[filewords]",
                                   class_prompt="[filewords]", num_class_images=3, **SCS)]
    instance, class_ = collect_examples(concepts, model)
    assert [e.concept_index for e in instance] == [1]
    assert len(class_) == 3 and all(e.is_class and e.concept_index == 1 for e in class_)
    # Captions of class pictures are finished class prompts: taken as they are.
    assert [e.prompt for e in class_] == ["girl number 0", "girl number 1", "girl number 2"]
    concepts[1].class_prompt = "a photo of a girl"
    assert {e.prompt for e in collect_examples(concepts, model)[1]} == {"a photo of a girl"}


def test_class_folder_inside_dataset_is_not_trained_as_instance(tmp_path):
    solid(tmp_path / "data" / "1.png")
    solid(tmp_path / "data" / "class" / "c.png", BLUE)
    concept = Concept(instance_data_dir=str(tmp_path / "data"), class_data_dir=str(tmp_path / "data" / "class"),
                      instance_prompt="scs girl", class_prompt="girl", num_class_images=1)
    instance, class_ = collect_examples([concept], tmp_path / "model")
    assert [e.image_path.name for e in instance] == ["1.png"] and [e.image_path.name for e in class_] == ["c.png"]


def test_prior_preservation_without_class_pictures_is_an_error(tmp_path):
    solid(tmp_path / "data" / "1.png")
    concept = Concept(instance_data_dir=str(tmp_path / "data"), instance_prompt="scs girl", class_prompt="girl",
                      num_class_images=5)
    with pytest.raises(ConfigError, match="classifiers_0.*classimages"):
        collect_examples([concept], tmp_path / "model")


def test_per_image_count_limits_class_examples(tmp_path, caplog):
    for i in range(2):
        solid(tmp_path / "data" / f"{i}.png")
    for i in range(7):
        solid(tmp_path / "class" / f"{i}.png", BLUE)
    concept = Concept(instance_data_dir=str(tmp_path / "data"), class_data_dir=str(tmp_path / "class"),
                      instance_prompt="scs girl", class_prompt="girl", num_class_images=1, num_class_images_per_image=3)
    assert len(collect_examples([concept], tmp_path)[1]) == 6
    concept.num_class_images_per_image = 5
    with caplog.at_level(logging.WARNING):
        assert len(collect_examples([concept], tmp_path)[1]) == 7
    assert "only 7 of the 10" in caplog.text


def test_prior_preservation_batches_hold_class_rows(tmp_path):
    instance = [solid(tmp_path / f"i{i}.png", RED) for i in range(2)]
    classes = [solid(tmp_path / f"c{i}.png", BLUE) for i in range(3)]
    dataset = _dataset(instance, class_paths=classes, resolution=16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_examples)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["is_class"].tolist() == [False, False, True, True]
    assert batch["prompts"] == ["scs girl", "scs girl", "girl", "girl"]
    colours = [to_rgb_array(row)[8, 8] for row in batch["pixel_values"]]
    assert close(colours[0], RED) and close(colours[1], RED) and close(colours[2], BLUE) and close(colours[3], BLUE)


def test_class_partners_cycle_through_all_class_pictures(tmp_path):
    instance = [solid(tmp_path / f"i{i}.png") for i in range(2)]
    classes = [solid(tmp_path / f"c{i}.png", BLUE) for i in range(5)]
    dataset = _dataset(instance, class_paths=classes)
    used = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        used |= {dataset.class_partner(i).image_path for i in range(2)}
    assert used == set(classes)
    few = _dataset([solid(tmp_path / f"j{i}.png") for i in range(3)], class_paths=classes[:1])
    assert {few.class_partner(i).image_path for i in range(3)} == {classes[0]}


def test_class_partner_comes_from_the_same_concept(tmp_path):
    instance = [Example(solid(tmp_path / f"i{i}.png"), "x", False, i % 2) for i in range(4)]
    class_ = [Example(solid(tmp_path / f"c{i}.png", BLUE), f"class {i % 2}", True, i % 2) for i in range(4)]
    dataset = DreamBoothDataset(instance, class_, resolution=16, center_crop=True, hflip=False)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(4):
            assert dataset.class_partner(i).concept_index == instance[i].concept_index
            assert dataset[i]["class_prompt"] == f"class {i % 2}"


def test_buckets_with_prior_preservation_share_the_shape(tmp_path):
    dataset = _dataset([solid(tmp_path / "wide.png", size=(120, 40))], class_paths=[solid(tmp_path / "c.png", BLUE)],
                       resolution=64, use_buckets=True)
    item = dataset[0]
    assert item["pixel_values"].shape == item["class_pixel_values"].shape
    assert item["pixel_values"].shape[2] > item["pixel_values"].shape[1]


def test_tokenizer_ids(tmp_path, created_sd1):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(created_sd1.model_dir("tiny") / "tokenizer"))
    instance = [Example(solid(tmp_path / "i.png"), "scs girl", False, 0)]
    class_ = [Example(solid(tmp_path / "c.png"), "girl", True, 0)]
    dataset = DreamBoothDataset(instance, class_, resolution=16, center_crop=True, hflip=False, tokenizer=tokenizer)
    batch = collate_examples([dataset[0]])
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == tokenizer("scs girl", padding="max_length", max_length=77).input_ids
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])


def test_prior_preservation_is_per_concept(tmp_path):
    """A concept without class pictures gets no class partner, even when another concept has some."""
    instance = [Example(solid(tmp_path / f"i{i}.png"), f"inst {i % 2}", False, i % 2) for i in range(4)]
    class_ = [Example(solid(tmp_path / "c.png", BLUE), "class 0", True, 0)]
    dataset = DreamBoothDataset(instance, class_, resolution=16, center_crop=True, hflip=False)
    assert dataset.class_partner(1) is None and "class_pixel_values" not in dataset[1]
    assert dataset.class_partner(0).concept_index == 0
    batch = collate_examples([dataset[i] for i in range(4)])
    assert batch["is_class"].tolist() == [False, False, False, False, True, True]
    assert batch["prompts"][4:] == ["class 0", "class 0"]
