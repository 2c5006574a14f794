"""The extension inside the web UI, run under a stand-in of its `modules` package (v1.10.1 API).

What the web UI does is reproduced from its source: scripts are loaded by path
with the extension folder on sys.path only while loading, tabs and settings
come from the registered callbacks, the loaded model sits in
`sd_models.model_data`, the Interrupt button sets `shared.state.interrupted`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_trainer.hosts import gpu_lent_to_job
from webui_env import REPO, SCRIPT, STANDIN, StandinWebUI

TITLE, TAB_ID = "LoRA Trainer", "lora_trainer"


@pytest.fixture
def webui(tmp_path):
    with StandinWebUI(tmp_path / "webui") as ui:
        yield ui


def webui_host(ui):
    from lora_trainer.ui.webui_host import WebUIHost

    return WebUIHost.from_modules()


def registered(ui, category):
    return ui.script_callbacks.callback_map[f"callbacks_{category}"]


# --- loading and registering --------------------------------------------------

def test_script_loads_by_path_from_another_folder_and_registers_the_tab(tmp_path):
    """A fresh interpreter in an unrelated folder, without the repository on sys.path, like the web UI."""
    program = textwrap.dedent(f"""
        import json, os, sys
        sys.path = [p for p in sys.path if os.path.abspath(p or '.') != {str(REPO)!r}]
        sys.path.insert(0, {str(STANDIN)!r})
        from modules import script_callbacks, script_loading, shared
        syspath = sys.path
        sys.path = [{str(REPO)!r}] + sys.path
        script_loading.load_module({str(SCRIPT)!r})
        sys.path = syspath
        script_callbacks.ui_settings_callback()
        tabs = script_callbacks.ui_tabs_callback()
        script_callbacks.ui_tabs_callback()  # Reload UI builds the tab again
        import logging
        logging.getLogger("lora_trainer.train").info("Training finished. Total lifetime steps: 3")
        import gradio as gr, importlib, threading, webui_standin_calls
        late = {{}}
        worker = threading.Thread(target=lambda: late.update(ok=bool(importlib.import_module("lora_trainer.merge"))))
        worker.start(); worker.join()
        print(json.dumps({{
            "late_import": late.get("ok", False),
            "root_last": sys.path.index({str(REPO)!r}) == len(sys.path) - 1,
            "tabs": [[isinstance(b, gr.Blocks), title, tab_id] for b, title, tab_id in tabs],
            "unavailable": [getattr(x, "value", None) for b, _t, _i in tabs for x in b.blocks.values()
                            if getattr(x, "elem_id", None) == "lora_trainer_not_loaded"],
            "settings": {{k: list(v.section) for k, v in shared.opts.data_labels.items() if k.startswith("lora_trainer")}},
            "errors": [c for c in webui_standin_calls.calls if c[0] == "errors.report"],
        }}))
    """)
    env = dict(os.environ, WEBUI_STANDIN_ROOT=str(tmp_path / "webui"), WEBUI_STANDIN_ARGS="", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    # The web UI configures no logging without --loglevel: our console lines still show, once.
    assert done.stderr.count("Training finished. Total lifetime steps: 3") == 1
    assert result["late_import"] and result["root_last"]
    assert result["unavailable"] == []
    assert result["tabs"] == [[True, TITLE, TAB_ID]]
    assert result["settings"] and all(s == ["lora_trainer", "LoRA Trainer"] for s in result["settings"].values())


def test_script_registers_one_tab_and_the_settings(webui):
    webui.load_extension_script()
    assert len(registered(webui, "ui_tabs")) == 1
    assert len(registered(webui, "ui_settings")) == 1
    assert registered(webui, "ui_tabs")[0].script == str(SCRIPT)


def test_settings_form_a_lora_trainer_section_under_training(webui):
    from lora_trainer.ui import settings

    webui.load_extension_script()
    webui.script_callbacks.ui_settings_callback()
    labels = webui.shared.opts.data_labels
    ours = {k: v for k, v in labels.items() if k.startswith("lora_trainer_")}
    assert set(ours) == {settings.WORKING_DIR, settings.KEEP_HOST_MODEL, settings.REFRESH_HOST_LISTS}
    assert {v.section for v in ours.values()} == {("lora_trainer", "LoRA Trainer")}
    assert {v.category_id for v in ours.values()} == {"training"}
    assert webui.shared.opts.lora_trainer_keep_host_model is False
    assert webui.shared.opts.lora_trainer_working_dir == ""
    webui.shared.opts.reorder()  # the web UI sorts settings by section label: ours must have one
    assert webui.errors() == []


def test_tab_is_built_with_the_web_ui_host(webui, monkeypatch):
    """The tab callback hands build_ui a WebUIHost made from the running web UI."""
    import gradio as gr

    import lora_trainer.ui
    from lora_trainer.ui.webui_host import WebUIHost

    seen = []

    def fake_build_ui(host, **kwargs):
        seen.append(host)
        with gr.Blocks() as blocks:
            gr.Markdown("tab")
        return blocks

    monkeypatch.setattr(lora_trainer.ui, "build_ui", fake_build_ui, raising=False)
    webui.load_extension_script()
    tabs = webui.script_callbacks.ui_tabs_callback()
    assert [(title, tab_id) for _b, title, tab_id in tabs] == [(TITLE, TAB_ID)]
    assert len(seen) == 1 and isinstance(seen[0], WebUIHost)
    assert seen[0].models.checkpoints == Path(webui.paths.models_path) / "Stable-diffusion"


def _markdown_texts(blocks):
    import gradio as gr

    return [b.value for b in blocks.blocks.values() if isinstance(b, gr.Markdown)]


def test_unsupported_host_gets_a_tab_with_the_reason_and_no_traceback(webui, monkeypatch):
    import types

    import lora_trainer

    reason = "LoRA Trainer needs web UI 1.10 or newer; this is 1.2.0. Update the web UI."
    check = types.ModuleType("lora_trainer.hostcheck")
    check.unsupported_host_reason = lambda: reason
    monkeypatch.setitem(sys.modules, "lora_trainer.hostcheck", check)
    monkeypatch.setattr(lora_trainer, "hostcheck", check, raising=False)

    webui.load_extension_script()
    assert registered(webui, "ui_settings") == []
    tabs = webui.script_callbacks.ui_tabs_callback()
    assert [(title, tab_id) for _b, title, tab_id in tabs] == [(TITLE, TAB_ID)]
    assert any(reason in text for text in _markdown_texts(tabs[0][0]))
    assert webui.errors() == []


def test_a_tab_that_fails_to_build_shows_the_error_in_the_tab(webui, monkeypatch):
    import lora_trainer.ui

    def broken_build_ui(host, **kwargs):
        raise RuntimeError("gradio said no")

    monkeypatch.setattr(lora_trainer.ui, "build_ui", broken_build_ui, raising=False)
    webui.load_extension_script()
    tabs = webui.script_callbacks.ui_tabs_callback()
    assert [(title, tab_id) for _b, title, tab_id in tabs] == [(TITLE, TAB_ID)]
    assert any("gradio said no" in text for text in _markdown_texts(tabs[0][0]))
    assert webui.errors() == []


def test_a_rebuilt_tab_shares_the_one_job_runner(webui, monkeypatch):
    """"Reload UI" builds the tab again: the job running in the old tab is still the one job."""
    import threading

    import lora_trainer.ui
    from lora_trainer.jobs import JobBusy
    from lora_trainer.ui import webui_host as glue

    controllers = []
    monkeypatch.setattr(lora_trainer.ui, "build_ui", lambda host, controller=None, **kw: controllers.append(controller))
    glue.build_webui_tab()
    release = threading.Event()
    controllers[0].runner.start("train", "train 'tiny'", lambda report, cancel: release.wait(30))
    try:
        glue.build_webui_tab()
        assert controllers[1].runner is controllers[0].runner
        assert controllers[1].host is not controllers[0].host
        assert controllers[1].runner.host is controllers[0].host  # not swapped under a running job
        with pytest.raises(JobBusy, match="train 'tiny'"):
            controllers[1].runner.start("merge", "generate ckpt", lambda report, cancel: None)
    finally:
        release.set()
    assert controllers[0].runner.wait(30)
    glue.build_webui_tab()
    assert controllers[2].runner.host is controllers[2].host


# --- folders ------------------------------------------------------------------

def test_folders_default_to_the_web_ui_models_folder(webui):
    host = webui_host(webui)
    models = Path(webui.paths.models_path)
    assert host.models.checkpoints == models / "Stable-diffusion"
    assert host.models.lora == models / "Lora"
    assert host.models.working == models / "lora_trainer"


def test_folders_follow_ckpt_dir_lora_dir_and_the_setting(tmp_path):
    ckpts, loras, work = tmp_path / "my ckpts", tmp_path / "my loras", tmp_path / "work"
    with StandinWebUI(tmp_path / "webui", f"--ckpt-dir '{ckpts}' --lora-dir '{loras}'") as ui:
        from lora_trainer.ui.settings import register_settings

        register_settings()
        ui.shared.opts.set("lora_trainer_working_dir", str(work))
        host = webui_host(ui)
        assert (host.models.checkpoints, host.models.lora, host.models.working) == (ckpts, loras, work)


def test_create_model_takes_the_hash_the_web_ui_already_has_unless_the_file_changed_since(webui, tiny_sd1,
                                                                                           monkeypatch):
    import shutil

    from modules import hashes

    from lora_trainer import checkpoint_io
    from lora_trainer.checkpoint import create_model
    from lora_trainer.config import ModelInfo
    from lora_trainer.source_hash import source_sha256

    models = webui_host(webui).models
    models.checkpoints.mkdir(parents=True, exist_ok=True)
    source = Path(shutil.copy(tiny_sd1, models.checkpoints / "base.safetensors"))
    shutil.copy(tiny_sd1.with_suffix(".yaml"), source.with_suffix(".yaml"))  # the tiny model's config
    reads = []
    real_sha256 = checkpoint_io.file_sha256
    monkeypatch.setattr(checkpoint_io, "file_sha256", lambda path, **kw: reads.append(path) or real_sha256(path, **kw))
    # What the web UI does when it loads the checkpoint for txt2img.
    known = hashes.sha256(str(source), "checkpoint/base.safetensors")

    info = ModelInfo.load(create_model(models, "base.safetensors", "a") / "model_info.json")
    assert info.source_checkpoint_hash == known and reads == []
    # Written after the web UI hashed it: the web UI's hash is stale, so the file is hashed, by the first job
    # that needs it.
    os.utime(source, (source.stat().st_atime, source.stat().st_mtime + 10))
    info = ModelInfo.load(create_model(models, "base.safetensors", "b") / "model_info.json")
    assert info.source_checkpoint_hash == "" and reads == []
    with source_sha256(models, info) as sha256:
        assert sha256.result() == known and reads == [source]


# --- GPU memory around a job ----------------------------------------------------

def test_checkpoint_leaves_the_gpu_for_the_job_and_comes_back(webui):
    model = webui.load_model()
    host = webui_host(webui)
    with gpu_lent_to_job(host):
        assert model.device == "cpu"
        assert webui.calls.names() == ["sd_models.unload_model_weights", "sd_models.send_model_to_cpu"]
    assert model.device == "cuda"
    assert webui.calls.names()[-1] == "sd_models.send_model_to_device"


def test_checkpoint_comes_back_after_a_failed_job(webui):
    model = webui.load_model()
    host = webui_host(webui)
    with pytest.raises(RuntimeError, match="out of memory"):
        with gpu_lent_to_job(host):
            raise RuntimeError("CUDA out of memory")
    assert model.device == "cuda"
    assert webui.calls.names()[-1] == "sd_models.send_model_to_device"


def test_no_checkpoint_loaded_means_nothing_is_loaded_or_moved(webui):
    host = webui_host(webui)
    with gpu_lent_to_job(host):
        pass
    assert webui.calls.names() == []
    assert webui.sd_models.model_data.sd_model is None


def test_keep_host_model_setting_leaves_the_checkpoint_on_the_gpu(webui):
    from lora_trainer.ui.settings import register_settings

    register_settings()
    webui.shared.opts.set("lora_trainer_keep_host_model", True)
    model = webui.load_model()
    with gpu_lent_to_job(webui_host(webui)):
        assert model.device == "cuda"
    assert webui.calls.names() == []


def test_failed_move_back_falls_back_to_reloading_without_raising(webui, monkeypatch):
    webui.load_model()
    host = webui_host(webui)

    def broken_send(m):
        webui.calls.record("sd_models.send_model_to_device")
        raise RuntimeError("device lost")

    monkeypatch.setattr(webui.sd_models, "send_model_to_device", broken_send)
    with gpu_lent_to_job(host):
        pass
    assert webui.calls.names()[-3:-1] == ["sd_models.send_model_to_device", "sd_models.reload_model_weights"]
    assert webui.sd_models.model_data.sd_model.device == "cuda"


def test_a_checkpoint_switched_during_the_job_is_left_alone(webui):
    old = webui.load_model()
    host = webui_host(webui)
    with gpu_lent_to_job(host):
        new = webui.sd_models.load_model(old.sd_checkpoint_info)
    assert old.device == "cpu" and new.device == "cuda"
    assert "sd_models.send_model_to_device" not in webui.calls.names()


def test_the_checkpoint_is_not_moved_while_a_generation_holds_the_queue_lock(webui):
    import threading

    from modules import call_queue

    model = webui.load_model()
    host = webui_host(webui)
    call_queue.queue_lock.acquire()  # a txt2img is running
    try:
        mover = threading.Thread(target=host.release_gpu)
        mover.start()
        mover.join(0.5)
        assert mover.is_alive() and model.device == "cuda"
    finally:
        call_queue.queue_lock.release()
    mover.join(10)
    assert not mover.is_alive() and model.device == "cpu"
    host.restore_gpu()
    assert model.device == "cuda" and not call_queue.queue_lock.locked()


def test_forge_frees_memory_through_its_memory_manager(tmp_path, monkeypatch):
    forge = tmp_path / "forge"
    (forge / "modules_forge").mkdir(parents=True)
    (forge / "modules_forge" / "__init__.py").write_text("")
    (forge / "backend").mkdir()
    (forge / "backend" / "__init__.py").write_text("")
    (forge / "backend" / "memory_management.py").write_text(textwrap.dedent("""
        import webui_standin_calls
        def unload_all_models():
            webui_standin_calls.record("memory_management.unload_all_models")
        def soft_empty_cache(force=False):
            webui_standin_calls.record("memory_management.soft_empty_cache")
    """))
    monkeypatch.syspath_prepend(str(forge))
    try:
        with StandinWebUI(tmp_path / "webui") as ui:
            ui.load_model()
            host = webui_host(ui)
            assert host.name == "forge"
            with gpu_lent_to_job(host):
                pass
            assert ui.calls.names() == ["memory_management.unload_all_models", "memory_management.soft_empty_cache"]
    finally:
        for name in ("modules_forge", "backend", "backend.memory_management"):
            sys.modules.pop(name, None)


# --- lists and Interrupt ----------------------------------------------------------

def test_checkpoint_list_is_refreshed_when_a_checkpoint_is_written(webui):
    host = webui_host(webui)
    merged = host.models.checkpoints / "tiny_10_lora.safetensors"
    merged.write_bytes(b"merged")
    host.checkpoints_changed()
    assert webui.calls.names() == ["sd_models.list_models"]
    assert "tiny_10_lora.safetensors" in webui.sd_models.checkpoints_list


def test_lora_list_is_refreshed_through_the_builtin_lora(webui):
    host = webui_host(webui)
    host.models.lora.mkdir(parents=True, exist_ok=True)
    (host.models.lora / "tiny_10.safetensors").write_bytes(b"lora")
    host.loras_changed()
    assert webui.calls.names() == ["networks.list_available_networks"]
    assert "tiny_10" in webui.networks.available_networks


def test_without_the_builtin_lora_the_refresh_is_skipped(tmp_path):
    with StandinWebUI(tmp_path / "webui", builtin_lora=False) as ui:
        webui_host(ui).loras_changed()
        assert ui.calls.names() == []


def test_refresh_setting_off_skips_both_refreshes(webui):
    from lora_trainer.ui.settings import register_settings

    register_settings()
    webui.shared.opts.set("lora_trainer_refresh_host_lists", False)
    host = webui_host(webui)
    host.checkpoints_changed()
    host.loras_changed()
    assert webui.calls.names() == []


def test_interrupt_button_is_seen_and_can_be_cleared(webui):
    host = webui_host(webui)
    webui.shared.state.interrupted = True  # pressed before our job: a stale press
    host.clear_interrupt()
    assert host.interrupted() is False
    webui.shared.state.interrupt()
    assert host.interrupted() is True


# --- jobs started from the tab, with the web UI as host ---------------------------------

def runner_for(ui):
    from lora_trainer.jobs import JobRunner

    return JobRunner(webui_host(ui))


def finished(runner, timeout: float = 120.0):
    assert runner.wait(timeout), "the job did not end"
    return runner.snapshot()


@pytest.mark.parametrize("kind", ["train", "class images"])
def test_gpu_jobs_run_with_the_checkpoint_off_the_gpu(webui, kind):
    model = webui.load_model()
    runner = runner_for(webui)
    seen = []

    def job(report, cancel):
        seen.append(model.device)
        return "done"

    runner.start(kind, f"{kind} 'tiny'", job)
    state = finished(runner)
    assert state.error is None and seen == ["cpu"]
    assert model.device == "cuda"
    names = webui.calls.names()
    assert names.index("sd_models.unload_model_weights") < names.index("sd_models.send_model_to_device")


def test_a_failing_training_gives_the_gpu_back_and_still_refreshes_loras(webui):
    model = webui.load_model()
    runner = runner_for(webui)

    def job(report, cancel):
        raise RuntimeError("CUDA out of memory")

    runner.start("train", "train 'tiny'", job)
    state = finished(runner)
    assert "out of memory" in state.error
    assert model.device == "cuda"
    names = webui.calls.names()
    assert names.index("sd_models.send_model_to_device") < names.index("networks.list_available_networks")


def test_training_refreshes_the_lora_list_with_the_new_file(webui):
    runner = runner_for(webui)
    host = runner.host

    def job(report, cancel):
        host.models.lora.mkdir(parents=True, exist_ok=True)
        (host.models.lora / "tiny_5.safetensors").write_bytes(b"lora")
        return "done"

    runner.start("train", "train 'tiny'", job)
    assert finished(runner).error is None
    assert "tiny_5" in webui.networks.available_networks


def test_the_web_ui_interrupt_button_cancels_the_job(webui):
    model = webui.load_model()
    runner = runner_for(webui)
    webui.shared.state.interrupted = True  # left over from an earlier txt2img: must not cancel us

    def job(report, cancel):
        import time

        deadline = time.monotonic() + 60
        while not cancel.is_set():
            if time.monotonic() > deadline:
                return "not interrupted"
            time.sleep(0.02)
        return "interrupted"

    runner.start("train", "train 'tiny'", job)
    assert not runner.wait(0.3), "a stale Interrupt cancelled the new job"
    webui.shared.state.interrupt()
    state = finished(runner)
    assert state.result == "interrupted"
    assert model.device == "cuda"


def test_generate_ckpt_puts_the_checkpoint_into_the_web_ui_list(webui, tiny_sd1):
    """The real Generate Ckpt of the tab, on a model created from the tiny checkpoint."""
    import shutil

    from lora_trainer.checkpoint import create_model
    from lora_trainer.ui.controller import Controller

    host = webui_host(webui)
    for p in (tiny_sd1, tiny_sd1.with_suffix(".yaml")):
        shutil.copy(p, host.models.checkpoints / p.name)
    create_model(host.models, tiny_sd1.name, "tiny")
    model = webui.load_model()
    ctl = Controller(host)

    message = ctl.generate_ckpt({"model": "tiny", "lora": "", "custom_model_name": "", "half": False, "subdir": False})
    # A merge that ends within the click's wait answers with its outcome; a longer one with "Started".
    assert message.startswith(("Started", "Generate ckpt of 'tiny' finished: wrote ")), message
    state = finished(ctl.runner, 600)
    assert state.error is None, state.error
    written = Path(state.result)
    assert written.is_file() and written.parent == host.models.checkpoints
    assert webui.calls.names() == ["sd_models.list_models"]  # a merge runs on the CPU: the checkpoint stays
    assert written.name in webui.sd_models.checkpoints_list
    assert model.device == "cuda"


def test_every_id_the_javascript_looks_for_is_in_the_tab(webui):
    """javascript/lora_trainer.js and the tab agree on element ids."""
    from lora_trainer.ui import build_ui
    from test_extension_files import REPO as ROOT, js_ids

    import re

    blocks = build_ui(webui_host(webui))
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for b in blocks.blocks.values():  # ids inside the HTML the tab renders, e.g. the status line
        ids |= set(re.findall(r'id="([^"]+)"', str(getattr(b, "value", "") or "")))
    wanted = js_ids((ROOT / "javascript" / "lora_trainer.js").read_text(encoding="utf-8"))
    assert wanted and sorted(wanted - ids) == []


def test_the_hosts_ui_config_does_not_pin_the_model_or_its_settings(webui):
    """The web UI saves labelled components' values into ui-config.json and sets them at the next start
    (Forge opened on a model that was selected when the file was written). Model, Lora Model and the
    per-model fields are left out; the tab's other defaults (e.g. Half Model) are still saved."""
    from lora_trainer.config import ModelInfo
    from lora_trainer.ui.webui_host import build_webui_tab
    from modules.ui_loadsave import UiLoadsave

    host = webui_host(webui)
    for name in ("aaa", "cat"):  # the lists and the tab read only the info of a model
        host.models.model_dir(name).mkdir(parents=True)
        ModelInfo(model_name=name).save(host.models.model_dir(name) / "model_info.json")
    config = Path(webui.paths.models_path).parent / "ui-config.json"
    loadsave = UiLoadsave(str(config))
    loadsave.add_block(build_webui_tab(), TAB_ID)
    loadsave.dump_defaults()
    saved = json.loads(config.read_text())
    labels = {key.split("/")[1] for key in saved}
    assert "Half Model" in labels  # the file is written, with the tab's other defaults
    for label in ("Model", "Lora Model", "Custom Model Name", "Preset", "Lora UNET Rank", "Dataset Directory",
                  "Instance Prompt", "Loaded Model", "Model Revision"):
        assert label not in labels, label

    # A file written by an older version, pinning a model: the rebuilt tab ignores it.
    config.write_text(json.dumps({**saved, f"{TAB_ID}/Model/value": "cat"}))
    tab = build_webui_tab()
    UiLoadsave(str(config)).add_block(tab, TAB_ID)
    model = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "lora_trainer_model")
    assert model.value == "aaa"


def test_a_new_page_of_the_web_ui_fills_the_model_and_its_settings_on_load(webui):
    """The web UI renders our Blocks into its page: a load event of ours (not a value fixed when the
    tab was built) picks a model that exists now and fills Lora Model, Parameters and Concepts."""
    from lora_trainer.ui.webui_host import build_webui_tab

    tab = build_webui_tab()
    ids = {getattr(b, "elem_id", None): key for key, b in tab.blocks.items()}
    loads = [d for d in tab.get_config_file()["dependencies"]
             if d.get("trigger") == "load" or any(t[1] == "load" for t in d.get("targets", []) if isinstance(t, (list, tuple)))]
    filled = [set(d["outputs"]) for d in loads]
    wanted = {ids[e] for e in ("lora_trainer_model", "lora_trainer_lora", "lora_trainer_param_rank",
                               "lora_trainer_concept1_instance_data_dir", "lora_trainer_preset")}
    assert any(wanted <= outputs for outputs in filled), loads


def _server_side_polls(blocks) -> list:
    return [d for d in blocks.get_config_file()["dependencies"] if d.get("every")]


def test_the_web_ui_tab_leaves_polling_to_the_page(webui):
    """Gradio 3's `every=` loop keeps the web UI's "Reload UI" from finishing: inside the web UI the
    page presses the progress refresh instead (javascript/lora_trainer.js); standalone keeps `every=`."""
    import gradio as gr

    from lora_trainer.hosts import Host
    from lora_trainer.ui import build_ui
    from lora_trainer.ui.webui_host import build_webui_tab

    tab = build_webui_tab()
    assert _server_side_polls(tab) == []
    standalone = build_ui(Host.at(Path(webui.paths.models_path)))
    assert bool(_server_side_polls(standalone)) == (not hasattr(gr, "Timer"))
    assert "lora_trainer_progress_refresh" in {getattr(b, "elem_id", None) for b in tab.blocks.values()}
