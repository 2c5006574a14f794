"""The training queue: three trainings with a failing middle one run the other two, from the command line and
from a queue file; the queue survives a restart; the tab's "Add to Queue" runs it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

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
    assert queue.claim(first) and not queue.claim(first)  # one runner per item
    assert TrainingQueue.at(models).items[0].status == "running"  # while its process runs
    # The app stops here: the process that claimed the item is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    saved = json.loads((models.working / QUEUE_FILE).read_text())
    saved[0]["runner"]["pid"] = int(gone.stdout)
    (models.working / QUEUE_FILE).write_text(json.dumps(saved))
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
    ctl.quick_seconds = 0  # the click answers "Started ..." even when one tiny step ends within the usual wait
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


def test_the_tabs_queue_box_follows_queue_json_and_clear_finished_keeps_the_waiting(tmp_path):
    """The box is read from the file, so a page after a restart (or a CLI run meanwhile) shows what it holds."""
    import gradio  # noqa: F401  (the UI needs it)

    from helpers_hosts import RecordingHost
    from lora_trainer.host import ModelsDir
    from lora_trainer.ui.controller import Controller
    from lora_trainer.ui.layout import _poll

    models = ModelsDir.at(tmp_path / "models")
    ctl = Controller(RecordingHost(models))
    assert ctl.queue_text() == "The queue is empty."
    first = _poll(ctl, {}, None)
    assert first["queue"] == "The queue is empty." and _poll(ctl, first["seen"], None) == {}
    queue = TrainingQueue.at(models)  # as another process would: the app learns of it from the file
    done, failed = queue.add("a", TrainingParams(), []), queue.add("b", TrainingParams(), [])
    queue.add("c", TrainingParams(), [])
    queue.mark(done, "done", lora="/x/a_1.safetensors")
    queue.mark(failed, "failed", error="ConfigError: no pictures")
    shown = "1. a [done]: /x/a_1.safetensors\n2. b [failed]: ConfigError: no pictures\n3. c [pending]"
    changed = _poll(ctl, first["seen"], None)
    assert changed["queue"] == shown
    assert "queue" not in _poll(ctl, {**changed["seen"], "version": -1}, None)  # sent only when it changed
    assert ctl.clear_queue() == "Removed 2 finished item(s) from the queue; 1 left."
    assert ctl.queue_text() == "1. c [pending]"
    (models.working / QUEUE_FILE).write_text("{not json")
    assert ctl.queue_text().startswith(f"Error: {models.working / QUEUE_FILE}: not a training queue")


def test_an_item_added_while_the_queue_runs_is_kept_and_runs_after_the_current_one(tmp_path):
    """The tab's Add to Queue during a run opens the queue afresh: the running queue neither loses its item nor
    shows the running item as waiting."""
    from lora_trainer.host import ModelsDir

    models = ModelsDir.at(tmp_path / "models")
    TrainingQueue.at(models).add("a", TrainingParams(), [])
    trained, seen = [], []

    class Result:
        lora_path, cancelled = None, False

    def fake_train(models, model, params, concepts, **kwargs):
        trained.append(model)
        if model == "a":  # what another page's click does while "a" trains
            TrainingQueue.at(models).add("b", TrainingParams(), [])
            seen.append([(i.model, i.status) for i in TrainingQueue.at(models).items])
        return Result()

    ran = run_queue(models, TrainingQueue.at(models), train_fn=fake_train)
    assert trained == ["a", "b"] and [i.model for i in ran] == ["a", "b"]
    assert seen == [[("a", "running"), ("b", "pending")]]
    assert [(i.model, i.status) for i in TrainingQueue.at(models).items] == [("a", "done"), ("b", "done")]
