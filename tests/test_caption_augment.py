"""Caption augmentation of [filewords] captions: shuffled tags behind the first K, dropped tags and
captions, the same for the same seed and epoch (so a resumed run sees what the first one would have)."""
from __future__ import annotations

import pytest
from helpers_data import solid

from lora_trainer.config import Concept, TrainingParams
from lora_trainer.data import DreamBoothDataset, collect_examples
from lora_trainer.caption_augment import CaptionAugment
from lora_trainer.errors import ConfigError

TAGS = ["red hair", "blue eyes", "smiling", "hat", "scarf", "outdoors", "sunset"]


def _dataset(tmp_path, *, seed=0, prompt="[filewords]", **options):
    folder = tmp_path / "pictures"
    for name in ("a", "b"):
        solid(folder / f"{name}.png", size=(16, 16), caption=", ".join(["scs girl"] + TAGS))
    concept = Concept(instance_data_dir=str(folder), instance_prompt=prompt, instance_token="scs", class_token="girl")
    instance, class_ = collect_examples([concept], tmp_path)
    augment = CaptionAugment.from_params(TrainingParams(**options))
    return DreamBoothDataset(instance, class_, resolution=16, center_crop=True, hflip=False, seed=seed,
                             augment=augment)


def _prompts(dataset, epochs=6):
    prompts = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        prompts += [dataset[i]["prompt"] for i in range(len(dataset))]
    return prompts


def test_shuffle_keeps_the_first_k_tags_and_repeats_with_the_seed(tmp_path):
    dataset = _dataset(tmp_path, shuffle_caption=True, keep_tokens=2)
    prompts = _prompts(dataset)
    for prompt in prompts:
        tags = prompt.split(", ")
        assert tags[:2] == ["scs girl", "red hair"] and sorted(tags[2:]) == sorted(TAGS[1:])
    assert len(set(prompts)) > 3  # the rest does move
    assert _prompts(_dataset(tmp_path, shuffle_caption=True, keep_tokens=2)) == prompts
    assert _prompts(_dataset(tmp_path, seed=1, shuffle_caption=True, keep_tokens=2)) != prompts


def test_tag_and_caption_dropout(tmp_path):
    thinned = _prompts(_dataset(tmp_path, keep_tokens=1, caption_tag_dropout_rate=0.5))
    assert all(p.startswith("scs girl") for p in thinned)
    assert min(len(p.split(", ")) for p in thinned) < len(TAGS) + 1
    for prompt in thinned:  # the tags that stay keep their order without shuffling
        kept = prompt.split(", ")[1:]
        assert kept == [t for t in TAGS if t in kept]
    dropped = _prompts(_dataset(tmp_path, caption_dropout_rate=0.5), epochs=10)
    assert "" in dropped and ", ".join(["scs girl"] + TAGS) in dropped


def test_off_by_default_and_never_for_written_prompts(tmp_path):
    plain = _prompts(_dataset(tmp_path), epochs=2)
    assert set(plain) == {", ".join(["scs girl"] + TAGS)}
    written = _prompts(_dataset(tmp_path, prompt="scs girl, hat, scarf", shuffle_caption=True,
                                caption_dropout_rate=0.9), epochs=3)
    assert set(written) == {"scs girl, hat, scarf"}


def test_rates_out_of_range_are_refused():
    with pytest.raises(ConfigError, match="caption_dropout_rate"):
        TrainingParams(caption_dropout_rate=1.5)


def test_a_resumed_run_augments_with_the_seed_the_interrupted_run_picked(created_sd1, tmp_path, monkeypatch):
    """Seed -1 picks one at random: the run started again after a Cancel draws its captions from that same
    seed, so steps 3-4 see the captions an uninterrupted run would have."""
    import threading

    from helpers_train import private_models

    from lora_trainer.data import DreamBoothDataset
    from lora_trainer.lora import read_lora
    from lora_trainer.train import train

    models = private_models(created_sd1, tmp_path / "models")
    folder = tmp_path / "pictures"
    for name in ("a", "b", "c"):
        solid(folder / f"{name}.png", size=(32, 32), caption=", ".join(["scs girl"] + TAGS))
    concept = Concept(instance_data_dir=str(folder), instance_prompt="[filewords]")
    params = TrainingParams(max_train_steps=4, resolution=32, hflip=False, seed=-1, train_text_encoder=False,
                            shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3)
    drawn: list[tuple[int, str]] = []
    real = DreamBoothDataset.prompt_of

    def recording(self, index):
        prompt = real(self, index)
        drawn.append((self.seed, prompt))
        return prompt

    monkeypatch.setattr(DreamBoothDataset, "prompt_of", recording)
    cancel = threading.Event()
    first = train(models, "tiny", params, [concept], cancel=cancel, device="cpu",
                  report=lambda p: p.step == 2 and p.loss is not None and cancel.set())
    assert first.cancelled and first.steps == 2
    picked = int(read_lora(first.lora_path)[1]["ss_seed"])
    assert {seed for seed, _ in drawn} == {picked}
    drawn.clear()
    second = train(models, "tiny", params, [concept], device="cpu")
    assert (second.steps, second.lifetime_steps) == (2, 4)
    assert drawn and {seed for seed, _ in drawn} == {picked}
    assert any(prompt != ", ".join(["scs girl"] + TAGS) for _, prompt in drawn)  # the captions were augmented
