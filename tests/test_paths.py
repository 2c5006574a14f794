"""Paths with spaces and non-ASCII letters, a dataset folder that is a symlink, a picture that links outside:
the whole path (create, class pictures, train, merge) works, and nothing is written outside the models
folder and the class folder the user named."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from helpers_data import BLUE, RED, halves

from lora_trainer.checkpoint import create_model
from lora_trainer.config import Concept, TrainingParams
from lora_trainer.data import collect_examples
from lora_trainer.host import ModelsDir
from lora_trainer.merge import merge_lora
from lora_trainer.train import train


def _tree(folder: Path, skip: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if not any(p == s or s in p.parents for s in skip)}


def test_spaces_accents_and_symlinks(tiny_sd1, tmp_path, monkeypatch, reliability):
    root = tmp_path / "Mes modèles d'été"
    models = ModelsDir.at(root / "models ü")
    models.checkpoints.mkdir(parents=True)
    for path in (tiny_sd1, tiny_sd1.with_suffix(".yaml")):
        shutil.copy(path, models.checkpoints / path.name)
    outside = tmp_path / "ailleurs ß"
    halves(outside / "loin.png", RED, BLUE, size=(40, 40))
    pictures = tmp_path / "Bilder Ä Ö"
    halves(pictures / "eins ö.png", RED, BLUE, size=(40, 40))
    (pictures / "eins ö.txt").write_text("ein rotes Ding, café", encoding="utf-8")
    (pictures / "zwei.png").symlink_to(outside / "loin.png")  # a picture that lives outside the folder
    linked = tmp_path / "verknüpft"
    linked.symlink_to(pictures, target_is_directory=True)  # the dataset folder is a symlink
    classes = tmp_path / "Klasse Ü"
    work = tmp_path / "arbeit"  # the folder the command runs in
    work.mkdir()
    monkeypatch.chdir(work)
    watched = [models.working.parent, classes]
    before = _tree(tmp_path, watched)

    create_model(models, tiny_sd1.name, "Modèle été 1")
    concept = Concept(instance_data_dir=str(linked), instance_prompt="scs [filewords]", class_prompt="Ding",
                      class_data_dir=str(classes), num_class_images=1, class_infer_steps=1)
    params = TrainingParams(max_train_steps=2, resolution=32, hflip=False, seed=0, train_batch_size=2,
                            custom_model_name="Sortie ñ")
    result = train(models, "Modèle été 1", params, [concept], device="cpu")
    merged = merge_lora(models, "Modèle été 1")

    instance, _ = collect_examples([concept], models.model_dir("Modèle été 1"))
    assert sorted(e.image_path.name for e in instance) == ["eins ö.png", "zwei.png"]
    assert result.lora_path == models.lora / "Sortie ñ_2.safetensors" and result.lora_path.is_file()
    assert merged.is_file() and merged.parent == models.checkpoints
    assert len(list(classes.glob("*.png"))) == 1
    assert _tree(tmp_path, watched) == before  # the pictures, captions, link and start folder untouched
    assert (pictures / "zwei.png").is_symlink() and (outside / "loin.png").is_file()
    reliability("Spaces and accents in the models folder, model name, dataset and class folders; the dataset "
                "folder a symlink; a picture a symlink to outside it",
                f"created, class picture made, trained 2 steps on {len(instance)} pictures ({result.lora_path.name}), merged "
                f"({merged.name}); nothing outside the models and class folders changed")
