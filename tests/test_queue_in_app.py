"""The tab's queue: Add to Queue while the queue job runs (seen in the real web UI: the item was dropped)."""
from __future__ import annotations

import json
from types import SimpleNamespace

from lora_trainer import tasks
from lora_trainer.config import TrainingParams
from lora_trainer.training_queue import QUEUE_FILE, run_queue


def test_an_item_added_from_the_tab_while_the_queue_runs_is_kept_and_trained(models_dir):
    models_dir.working.mkdir(parents=True, exist_ok=True)
    params = TrainingParams(max_train_steps=1)
    tasks.open_queue(models_dir).add("first", params, [])
    trained = []

    def fake_train(models, model, params, concepts, **_):
        trained.append(model)
        if model == "first":  # Add to Queue pressed in the tab during the first training
            seen = tasks.open_queue(models_dir)
            assert [i.status for i in seen.items] == ["running"]
            seen.add("second", params, [])
        return SimpleNamespace(lora_path=models_dir.lora / f"{model}_1.safetensors", cancelled=False)

    ran = run_queue(models_dir, tasks.open_queue(models_dir), train_fn=fake_train)
    assert trained == ["first", "second"] and [i.model for i in ran] == trained
    saved = json.loads((models_dir.working / QUEUE_FILE).read_text(encoding="utf-8"))
    assert [(i["model"], i["status"]) for i in saved] == [("first", "done"), ("second", "done")]
