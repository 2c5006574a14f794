"""The training queue: three trainings with a failing middle one run the other two, from the command line and
from a queue file; the queue survives a restart; the tab's "Add to Queue" runs it."""
from __future__ import annotations

import json
import shutil

from helpers_train import instance_pictures, private_models
from lora_trainer.cli import main
from lora_trainer.config import CONCEPTS_FILE, PARAMS_FILE, Concept, ModelInfo, TrainingParams, save_concepts
from lora_trainer.training_queue import QUEUE_FILE, TrainingQueue, run_queue

FAST = ["--max_train_steps", "1", "--resolution", "32", "--no-hflip", "--seed", "0", "--no-train_text_encoder"]


def _two_models(created_sd1, tmp_path):
    models = private_models(created_sd1, tmp_path / "models")
    shutil.copytree(models.model_dir("tiny"), models.model_dir("tiny2"))
    concept = Concept(instance_data_dir=str(instance_pictures(tmp_path / "pictures")), instance_prompt="scs thing")
    for name in ("tiny", "tiny2"):
        save_concepts([concept], models.model_dir(name) / CONCEPTS_FILE)
        info = ModelInfo.load(models.model_dir(name) / "model_info.json")
        info.model_name = name
        info.save(models.model_dir(name) / "model_info.json")
    return models, concept


def test_a_queue_of_three_with_a_failing_middle_item_runs_the_other_two(created_sd1, tmp_path, capsys):
    models, _ = _two_models(created_sd1, tmp_path)
    # the middle model's saved parameters cannot run on the CPU: it fails before loading, the next one starts
    TrainingParams(mixed_precision="fp16").save(models.model_dir("tiny2") / PARAMS_FILE)
    code = main(["train", "--models-dir", str(models.working.parent), "--model", "tiny", "--model", "tiny2",
                 "--model", "missing", "--device", "cpu", *FAST])
    assert code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["tiny", "tiny2", "missing"]
    assert "[done]" in lines[0] and "[failed]" in lines[1] and "fp16" in lines[1] and "[failed]" in lines[2]
    assert [p.name for p in models.lora.glob("*.safetensors")] == ["tiny_1.safetensors"]
    saved = json.loads((models.working / QUEUE_FILE).read_text())
    assert [(i["model"], i["status"]) for i in saved] == [("tiny", "done"), ("tiny2", "failed"), ("missing", "failed")]


def test_queue_file_items_run_in_order_and_a_failure_does_not_stop_it(created_sd1, tmp_path, capsys):
    models, concept = _two_models(created_sd1, tmp_path)
    queue_file = tmp_path / "queue.json"
    queue_file.write_text(json.dumps([
        {"model": "tiny"},
        {"model": "tiny", "params": {"sample_grid_seeds": "x"}},  # refused before loading
        {"model": "tiny2", "concepts": [concept.to_dict()]},
    ]))
    assert main(["train", "--models-dir", str(models.working.parent), "--queue", str(queue_file),
                 "--device", "cpu", *FAST]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert ["[done]" in lines[0], "sample_grid_seeds" in lines[1], "[done]" in lines[2]] == [True, True, True]
    assert sorted(p.name for p in models.lora.glob("*.safetensors")) == ["tiny2_1.safetensors", "tiny_1.safetensors"]


def test_the_queue_survives_a_restart_and_an_interrupted_item_runs_again(tmp_path):
    from lora_trainer.host import ModelsDir

    models = ModelsDir.at(tmp_path / "models")
    queue = TrainingQueue.at(models)
    first = queue.add("a", TrainingParams(rank=8), [Concept(instance_data_dir="x")])
    queue.add("b", TrainingParams(), [])
    queue.mark(first, "running")  # the app stops here
    again = TrainingQueue.at(models)
    assert [(i.model, i.status) for i in again.items] == [("a", "pending"), ("b", "pending")]
    assert again.items[0].params["rank"] == 8 and again.items[0].concepts[0]["instance_data_dir"] == "x"
    trained = []

    class Result:
        lora_path, cancelled = None, False

    def fake_train(models, model, params, concepts, **kwargs):  # what the queue hands to training
        trained.append((model, params.rank, [c.instance_data_dir for c in concepts]))
        return Result()

    run_queue(models, again, train_fn=fake_train)
    assert trained == [("a", 8, ["x"]), ("b", 4, [])]
    assert [i.status for i in TrainingQueue.at(models).items] == ["done", "done"]


def test_add_to_queue_in_the_tab_runs_the_queue_with_the_tabs_settings(created_sd1, tmp_path):
    import gradio  # noqa: F401  (the UI needs it)

    from helpers_hosts import RecordingHost
    from lora_trainer.ui.controller import Controller
    from lora_trainer.ui.fields import CONCEPT_SLOTS, concept_key, params_key, values_from_config

    models, concept = _two_models(created_sd1, tmp_path)
    ctl = Controller(RecordingHost(models))
    params = TrainingParams(max_train_steps=1, resolution=32, hflip=False, seed=0, train_text_encoder=False)
    named = {"model": "tiny2", **{params_key(k): v for k, v in values_from_config(params).items()}}
    for slot, c in enumerate([concept] + [Concept()] * (CONCEPT_SLOTS - 1), 1):
        named.update({concept_key(slot, k): v for k, v in values_from_config(c).items()})
    message = ctl.add_to_queue(named)
    assert message.startswith("Added 'tiny2' to the queue. Started training queue"), message
    assert ctl.runner.wait(timeout=300)
    state = ctl.state()
    assert state.error is None and "tiny2 [done]" in state.progress.message, state.progress.message
    assert [p.name for p in models.lora.glob("*.safetensors")] == ["tiny2_1.safetensors"]
    assert ctl.run_queue() == "The queue is empty."
