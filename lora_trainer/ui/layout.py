"""The "LoRA Trainer" tab: left column, sub-tabs, and the wiring of every event.

`build_ui(host)` returns a `gr.Blocks`; the web UI's script hands it to
`on_ui_tabs`, the standalone app launches it. Every element id starts with
`lora_trainer_`.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import gradio as gr

from .. import presets
from ..config import Concept, ModelInfo, TrainingParams, field_meta
from ..hosts import Host
from ..jobs import process_runner
from ..merge import MergeOptions
from . import gradio_compat as compat
from . import render
from .controller import INFO_FIELDS, Controller
from .fields import CONCEPT_SLOTS, Widgets, concept_key, field_specs, param_specs, params_key
from .widgets import disabled_options, field_widget, unavailable_features

POLL_SECONDS = 1.0
# The buttons whose answer goes to the Message box: a click empties it at once.
MESSAGE_BUTTONS = ("create_button", "train_button", "cancel_button", "class_images_button", "check_memory_button",
                   "generate_ckpt_button", "save_params_button", "load_params_button", "apply_preset_button",
                   "load_concepts_button", "save_concepts_button", "add_to_queue_button", "run_queue_button",
                   "clear_queue_button")
LOG_LINES_SHOWN = 400
REFRESH = "\U0001f504"  # the web UI's refresh button glyph


def eid(name: str) -> str:
    return f"lora_trainer_{name}"


def build_ui(host: Host, *, controller: Controller | None = None, theme=None, css: str | None = None,
             head: str | None = None, page_polls: bool = False) -> gr.Blocks:
    """The whole tab for `host`. `theme`/`css`/`head` are for the standalone app (the web UI brings its own).

    `page_polls`: the host's page runs javascript/lora_trainer.js, which presses the hidden progress
    refresh instead of a server-side poll on gradio 3 (see `gradio_compat.poll`).
    """
    ctl = controller or Controller(host, process_runner(host))
    w = Widgets()
    unavailable = unavailable_features()
    disabled = disabled_options(unavailable)
    with compat.blocks(analytics_enabled=False, theme=theme, css=css, head=head, title="LoRA Trainer") as demo:
        with gr.Row(elem_id=eid("main")):
            with gr.Column(scale=1, min_width=280, elem_id=eid("left")):
                _left_column(w, ctl)
            with gr.Column(scale=3, elem_id=eid("right")):
                with gr.Tabs(elem_id=eid("tabs")):
                    with gr.Tab("Create Model", elem_id=eid("create_tab")):
                        _create_tab(w, ctl)
                    with gr.Tab("Parameters", elem_id=eid("params_tab")):
                        _parameters_tab(w, disabled)
                    with gr.Tab("Concepts", elem_id=eid("concepts_tab")):
                        _concepts_tab(w)
                    with gr.Tab("Train", elem_id=eid("train_tab")):
                        _train_tab(w, ctl)
        if head and not compat.takes_head():
            # Gradio 3 standalone: the scripts run from a load event, and then the page is the poll
            # (an `every=` loop would call the poll with the inputs of the page's first second forever).
            compat.run_scripts_on_load(demo, head)
            page_polls = True
        _wire(demo, w, ctl, disabled, page_polls, cuda="cuda" not in unavailable)
    return demo


# -- layout -------------------------------------------------------------------------
def _left_column(w: Widgets, ctl: Controller) -> None:
    with gr.Row():
        models = ctl.model_choices()
        w.add("model", compat.component(gr.Dropdown, label="Model", choices=models, value=models[0] if models else None,
                                        allow_custom_value=True, elem_id=eid("model"), scale=4))
        w.add("model_refresh", compat.component(gr.Button, value=REFRESH, elem_id=eid("model_refresh"), scale=0,
                                                min_width=40, elem_classes=["lora_trainer_refresh"]))
    first = models[0] if models else ""
    w.add("lora", compat.component(gr.Dropdown, label=field_meta(MergeOptions, "lora")["label"],
                                   info="LoRA to merge on Generate Ckpt; blank: write the model without a LoRA.",
                                   choices=ctl.lora_choices(), value=ctl.latest_lora(first),
                                   allow_custom_value=True, elem_id=eid("lora")))
    meta = field_meta(TrainingParams, "custom_model_name")
    w.add("custom_model_name", compat.component(gr.Textbox, label=meta["label"], info=meta["help"],
                                                elem_id=eid("custom_model_name")))
    for key in ("half", "subdir"):
        meta = field_meta(MergeOptions, key)
        w.add(key, compat.component(gr.Checkbox, label=meta["label"], info=meta["help"], value=False,
                                    elem_id=eid(key)))
    with gr.Accordion("Generate Ckpt Options", open=False, elem_id=eid("generate_ckpt_options")):
        _merge_options(w, ctl)
    with gr.Group(elem_id=eid("model_info")):
        info = ctl.info_values(first)
        for name in INFO_FIELDS:
            meta = field_meta(ModelInfo, name)
            w.add(f"info.{name}", compat.component(gr.Textbox, label=meta["label"], value=info[f"info.{name}"],
                                                   interactive=False, elem_id=eid(f"info_{name}")))
    with gr.Row():
        w.add("train_button", compat.component(gr.Button, value="Train", variant="primary", elem_id=eid("train")))
        w.add("cancel_button", compat.component(gr.Button, value="Cancel", variant="stop", elem_id=eid("cancel")))
    with gr.Row():
        w.add("add_to_queue_button", compat.component(gr.Button, value="Add to Queue", elem_id=eid("add_to_queue")))
        w.add("run_queue_button", compat.component(gr.Button, value="Run Queue", elem_id=eid("run_queue")))
    w.add("class_images_button", compat.component(gr.Button, value="Generate Class Images",
                                                  elem_id=eid("generate_class_images")))
    w.add("check_memory_button", compat.component(gr.Button, value="Check GPU Memory",
                                                  elem_id=eid("check_memory")))
    w.add("generate_ckpt_button", compat.component(gr.Button, value="Generate Ckpt",
                                                   elem_id=eid("generate_ckpt_button")))
    w.add("generate_ckpt.overwrite", compat.component(gr.Checkbox, label="Overwrite", value=False,
                                                      info="Replace a checkpoint of the same name (asks first).",
                                                      elem_id=eid("generate_ckpt_overwrite")))
    with gr.Row():
        w.add("save_params_button", compat.component(gr.Button, value="Save Params", elem_id=eid("save_params")))
        w.add("load_params_button", compat.component(gr.Button, value="Load Params", elem_id=eid("load_params")))
    w.add("message", compat.component(gr.Textbox, label="Message", interactive=False, lines=2,
                                      elem_id=eid("message")))


def _merge_options(w: Widgets, ctl: Controller) -> None:
    """"Lora Weight", "Lora Text Weight", "Merge Into" another checkpoint and the file format."""
    for key in ("unet_weight", "text_weight"):
        meta = field_meta(MergeOptions, key)
        w.add(key, compat.component(gr.Slider, label=meta["label"], info=meta["help"], minimum=0.0, maximum=2.0,
                                    step=0.05, value=1.0, elem_id=eid(key)))
    meta = field_meta(MergeOptions, "into")
    w.add("into", compat.component(gr.Dropdown, label=meta["label"], info=meta["help"],
                                   choices=[""] + ctl.source_choices(), value="", allow_custom_value=True,
                                   elem_id=eid("merge_into")))
    meta = field_meta(MergeOptions, "fmt")
    w.add("fmt", compat.component(gr.Radio, label=meta["label"], info=meta["help"], choices=list(meta["choices"]),
                                  value="safetensors", elem_id=eid("checkpoint_format")))


def _create_tab(w: Widgets, ctl: Controller) -> None:
    with gr.Row():
        sources = ctl.source_choices()
        w.add("create.source", compat.component(gr.Dropdown, label="Source Checkpoint", choices=sources,
                                                value=sources[0] if sources else None, allow_custom_value=True,
                                                elem_id=eid("create_source"), scale=4))
        w.add("source_refresh", compat.component(gr.Button, value=REFRESH, elem_id=eid("create_source_refresh"),
                                                 scale=0, min_width=40, elem_classes=["lora_trainer_refresh"]))
    w.add("create.name", compat.component(gr.Textbox, label="Name", elem_id=eid("create_name"),
                                          info="Name of the new model (a folder under lora_trainer/)."))
    w.add("create.extract_ema", compat.component(gr.Checkbox, label="Extract EMA Weights", value=False,
                                                 info=field_meta(ModelInfo, "extracted_ema")["help"],
                                                 elem_id=eid("create_extract_ema")))
    w.add("create.overwrite", compat.component(gr.Checkbox, label="Overwrite", value=False,
                                               info="Replace a model of the same name (asks first).",
                                               elem_id=eid("create_overwrite")))
    w.add("create_button", compat.component(gr.Button, value="Create", variant="primary",
                                            elem_id=eid("create_button")))


def _parameters_tab(w: Widgets, disabled: dict) -> None:
    with gr.Row():
        # No preset shown until one is applied: the fields hold the model's own settings.
        w.add("preset", compat.component(gr.Dropdown, label="Preset", choices=presets.preset_names(),
                                         value=None, elem_id=eid("preset"), scale=4,
                                         info="Sets the fields it names; the others keep their values."))
        w.add("apply_preset_button", compat.component(gr.Button, value="Apply Preset", elem_id=eid("apply_preset"),
                                                      scale=1))
    notes = [reason for options in disabled.values() for reason in options.values()]
    if notes:
        compat.component(gr.Markdown, value="Unavailable here: " + "; ".join(notes), elem_id=eid("unavailable"))
    specs = param_specs()
    basic = [s for s in specs.values() if not s.advanced]
    advanced = [s for s in specs.values() if s.advanced]
    for spec in basic:
        w.add(params_key(spec.name), field_widget(spec, eid(f"param_{spec.name}"), disabled=disabled.get(spec.name)))
    with gr.Accordion("Advanced", open=False, elem_id=eid("params_advanced")):
        for spec in advanced:
            w.add(params_key(spec.name), field_widget(spec, eid(f"param_{spec.name}"),
                                                      disabled=disabled.get(spec.name)))


def _concepts_tab(w: Widgets) -> None:
    with gr.Row():
        w.add("concepts_file", compat.component(gr.Textbox, label="Concepts JSON", elem_id=eid("concepts_file"), scale=4,
                                                info="File to load or save; blank: the model folder's concepts_list.json."))
        w.add("load_concepts_button", compat.component(gr.Button, value="Load Concepts",
                                                       elem_id=eid("load_concepts"), scale=1))
        w.add("save_concepts_button", compat.component(gr.Button, value="Save Concepts",
                                                       elem_id=eid("save_concepts"), scale=1))
    specs = field_specs(Concept)
    with gr.Tabs(elem_id=eid("concept_tabs")):
        for slot in range(1, CONCEPT_SLOTS + 1):
            with gr.Tab(f"Concept {slot}", elem_id=eid(f"concept{slot}_tab")):
                for spec in (s for s in specs.values() if not s.advanced):
                    w.add(concept_key(slot, spec.name), field_widget(spec, eid(f"concept{slot}_{spec.name}")))
                with gr.Accordion("Advanced", open=False, elem_id=eid(f"concept{slot}_advanced")):
                    for spec in (s for s in specs.values() if s.advanced):
                        w.add(concept_key(slot, spec.name), field_widget(spec, eid(f"concept{slot}_{spec.name}")))


def _train_tab(w: Widgets, ctl: Controller) -> None:
    state = ctl.state()
    w.add("status", compat.component(gr.HTML, value=render.status_html(state), elem_id=eid("status")))
    w.add("progress", compat.component(gr.HTML, value=render.progress_html(state), elem_id=eid("progress")))
    with gr.Row(elem_id=eid("queue_row")):
        w.add("queue", compat.component(gr.Textbox, label="Queue", lines=3, max_lines=8, interactive=False,
                                        value=ctl.queue_text(), elem_id=eid("queue"), scale=4,
                                        info="Trainings added with Add to Queue, in order, with their status; "
                                             "kept across restarts of the app."))
        w.add("clear_queue_button", compat.component(gr.Button, value="Clear Finished", elem_id=eid("clear_queue"),
                                                     scale=1))
    with gr.Row():
        w.add("loss_plot", compat.component(gr.Image, label="Loss", type="pil", interactive=False,
                                            value=render.loss_plot(state.losses, state.val_losses), elem_id=eid("loss_plot")))
        w.add("samples", compat.component(gr.Gallery, label="Samples", columns=4, height=260,
                                          value=compat.gallery_value(state.samples) or None, elem_id=eid("samples")))
    w.add("log", compat.component(gr.Textbox, label="Log", lines=12, max_lines=12, interactive=False, autoscroll=True,
                                  value="\n".join(state.log[-LOG_LINES_SHOWN:]), elem_id=eid("log")))
    # Pressed by javascript/lora_trainer.js when the tab is shown again (hidden by style.css).
    w.add("progress_refresh", compat.component(gr.Button, value="Refresh", elem_id=eid("progress_refresh"),
                                               elem_classes=["lora_trainer_hidden"]))
    w.add("seen", gr.State({}))


# -- events ---------------------------------------------------------------------------
def _on(button, fn: Callable[..., Any], w: Widgets, in_keys: Sequence[str], out_keys: Sequence[str], *,
        event: Callable = compat.click) -> None:
    """Wire `button` (its `event`: a click) so `fn(named_inputs)` returns a dict of new values by key
    (missing: unchanged)."""
    in_keys, out_keys = list(in_keys), list(out_keys)

    def handler(*values):
        result = fn(Widgets.named(in_keys, values))
        outs = [result.get(k, compat.no_change()) if isinstance(result, dict) else compat.no_change() for k in out_keys]
        return outs[0] if len(outs) == 1 else outs

    event(button, handler, w.components(in_keys), w.components(out_keys))


def _wire(demo: gr.Blocks, w: Widgets, ctl: Controller, disabled: dict, page_polls: bool = False, *,
          cuda: bool = True) -> None:
    param_keys = w.keys("params.") + ["custom_model_name"]
    concept_keys = [k for slot in range(1, CONCEPT_SLOTS + 1) for k in w.keys(concept_key(slot, ""))]
    settings = ["model"] + param_keys + concept_keys
    info_keys = [f"info.{n}" for n in INFO_FIELDS]
    msg = ["message"]
    # Per-model fields follow the chosen model; the web UI's ui-config.json must not pin them.
    compat.keep_out_of_host_config(w.components(["model", "lora", "preset", "message", "log", "queue"] + param_keys
                                                + concept_keys + info_keys))
    for key in MESSAGE_BUTTONS:
        compat.clear_on_click(w[key], w["message"])

    _on(w["create_button"], lambda n: {"message": ctl.create(n)}, w, ["create.source", "create.name",
                                                                      "create.extract_ema", "create.overwrite"], msg)
    _on(w["train_button"], lambda n: {"message": ctl.train(n)}, w, settings, msg)
    _on(w["cancel_button"], lambda n: {"message": ctl.cancel()}, w, [], msg)
    queue_out = msg + ["queue"]
    _on(w["add_to_queue_button"], lambda n: {"message": ctl.add_to_queue(n), "queue": ctl.queue_text()}, w,
        settings, queue_out)
    _on(w["run_queue_button"], lambda n: {"message": ctl.run_queue(), "queue": ctl.queue_text()}, w, [], queue_out)
    _on(w["clear_queue_button"], lambda n: {"message": ctl.clear_queue(), "queue": ctl.queue_text()}, w, [],
        queue_out)
    _on(w["class_images_button"], lambda n: {"message": ctl.class_images(n)}, w, settings, msg)
    _on(w["check_memory_button"], lambda n: {"message": ctl.check_memory(n)}, w, ["model"] + param_keys, msg)
    _on(w["generate_ckpt_button"], lambda n: {"message": ctl.generate_ckpt(n)}, w,
        ["model", "lora", "custom_model_name", "half", "subdir", "generate_ckpt.overwrite", "into", "unet_weight",
         "text_weight", "fmt"], msg)
    _on(w["save_params_button"], lambda n: {"message": ctl.save_params(n)}, w, settings, msg)

    def load_params(n):
        message, values = ctl.load_params(n, param_keys + concept_keys)
        return {"message": message, **values, **({"preset": compat.update(value=None)} if values else {})}

    _on(w["load_params_button"], load_params, w, ["model"], msg + ["preset"] + param_keys + concept_keys)

    def apply_preset(n):
        message, values = ctl.apply_preset(n["preset"], n, param_keys, disabled, cuda=cuda)
        return {"message": message, **values}

    _on(w["apply_preset_button"], apply_preset, w, ["preset"] + param_keys, msg + param_keys)
    # Choosing a preset applies it: the dropdown never names a preset the fields do not hold.
    _on(w["preset"], apply_preset, w, ["preset"] + param_keys, msg + param_keys, event=compat.select)

    def load_concepts(n):
        message, values = ctl.load_concepts(n, concept_keys)
        return {"message": message, **values}

    _on(w["load_concepts_button"], load_concepts, w, ["concepts_file", "model"], msg + concept_keys)
    _on(w["save_concepts_button"], lambda n: {"message": ctl.save_concepts(n)}, w,
        ["concepts_file", "model"] + concept_keys, msg)

    def refresh_models(n):
        models = ctl.model_choices()
        chosen = n["model"] if n["model"] in models else (models[0] if models else None)
        return {"model": compat.update(choices=models, value=chosen),
                "lora": compat.update(choices=ctl.lora_choices(), value=ctl.latest_lora(chosen or "")),
                **ctl.info_values(chosen or "")}

    _on(w["model_refresh"], refresh_models, w, ["model"], ["model", "lora"] + info_keys)
    _on(w["source_refresh"], lambda n: _checkpoint_lists(ctl), w,
        [], ["create.source", "into"])

    follow = info_keys + ["lora", "preset"] + param_keys + concept_keys

    def model_values(model: str) -> dict[str, Any]:
        """What follows the model: its info, its newest LoRA, its saved settings; no preset claimed."""
        message, settings = ctl.settings_values(model, param_keys + concept_keys)
        for key, shown in ctl.shown_params(model).items():  # SDXL's second text encoder's fields
            if key in settings:
                settings[key] = compat.update(value=settings[key], visible=shown)
        values = {**ctl.info_values(model), **settings, "preset": compat.update(value=None),
                  "lora": compat.update(choices=ctl.lora_choices(), value=ctl.latest_lora(model))}
        if message:
            values["message"] = message
        return values

    def model_chosen(model):
        values = model_values(model or "")
        return [values.get(k, compat.no_change()) for k in follow + msg]

    compat.change(w["model"], model_chosen, [w["model"]], w.components(follow + msg))

    def page_opened(model):
        """A new page, a reload or "Reload UI": the model shown is one that exists now, with its settings.

        The jobs that ended before are counted as seen: one that ends from now on, even before the page's
        first poll (a Create Model started at once and done in a second), brings its lists and outcome."""
        models = ctl.model_choices()
        chosen = model if model in models else (models[0] if models else None)
        values = {"model": compat.update(choices=models, value=chosen), **model_values(chosen or ""),
                  "queue": ctl.queue_text(), "seen": _seen_when_opened(ctl), **_checkpoint_lists(ctl)}
        return [values.get(k, compat.no_change()) for k in opened_out]

    opened_out = ["model"] + follow + msg + ["queue", "seen", "create.source", "into"]
    compat.on_load(demo, page_opened, [w["model"]], w.components(opened_out))

    poll_out = ["seen", "status", "progress", "loss_plot", "samples", "log", "model", "lora", "create.source",
                "into", "message", "queue"] + info_keys

    def poll(seen, model, lora):
        values = _poll(ctl, seen or {}, model, lora)
        return [values.get(k, compat.no_change()) for k in poll_out]

    poll_in = [w["seen"], w["model"], w["lora"]]
    compat.poll(demo, poll, poll_in, w.components(poll_out), POLL_SECONDS, page_polls=page_polls)
    # Pressed by the page's script: on return to the tab, and every second where the page polls.
    # Only what changed since this page last looked is sent, as by the poll itself.
    compat.click(w["progress_refresh"], poll, poll_in, w.components(poll_out))


def _checkpoint_lists(ctl: Controller) -> dict[str, Any]:
    """The checkpoints folder as it is now, for "Source Checkpoint" and "Merge Into" (blank: the model itself)."""
    sources = ctl.source_choices()
    return {"create.source": compat.update(choices=sources), "into": compat.update(choices=[""] + sources)}


def _seen_when_opened(ctl: Controller) -> dict:
    """A new page's "seen": the jobs that ended before it opened; the first poll sends everything else."""
    return {"finished": ctl.state().finished_jobs}


def _poll(ctl: Controller, seen: dict, model: str | None, lora: str | None = None) -> dict[str, Any]:
    """What changed since this page last looked: only those outputs are sent."""
    state = ctl.state()
    # The queue changes also without a job of this app (another page's Add to Queue, a CLI run).
    queue = ctl.queue_text()
    queue_mark = zlib.crc32(queue.encode())
    if seen.get("version") == state.version and seen.get("finished") == state.finished_jobs \
            and seen.get("queue") == queue_mark:
        return {}
    out: dict[str, Any] = {"status": render.status_html(state), "progress": render.progress_html(state)}
    if seen.get("queue") != queue_mark:
        out["queue"] = queue
    if seen.get("losses") != len(state.losses) + len(state.val_losses) or seen.get("job") != state.started:
        out["loss_plot"] = render.loss_plot(state.losses, state.val_losses)
    if seen.get("samples") != len(state.samples) or seen.get("job") != state.started:
        out["samples"] = compat.gallery_value(state.samples)
    log_mark = (len(state.log), state.log[-1] if state.log else "")
    if seen.get("log") != list(log_mark) or seen.get("job") != state.started:
        out["log"] = "\n".join(state.log[-LOG_LINES_SHOWN:])
    if "finished" in seen and seen["finished"] != state.finished_jobs and state.name:
        # A job ended since this page last looked (the page's load event fills a new page's lists).
        out.update(_lists_after_job(ctl, state, model, lora))
        if not ctl.answered_by_click(state):
            out["message"] = ctl.outcome(state)
    elif "finished" not in seen:  # a first look before the page's load event: checkpoints may be newer than the page
        out.update(_checkpoint_lists(ctl))
    out["seen"] = {"version": state.version, "finished": state.finished_jobs,
                   "losses": len(state.losses) + len(state.val_losses),
                   "samples": len(state.samples), "log": list(log_mark), "job": state.started,
                   "queue": queue_mark}
    return out


def _lists_after_job(ctl: Controller, state, model: str | None, lora: str | None = None) -> dict[str, Any]:
    """A job ended: new models, LoRAs or checkpoints show up in our dropdowns.

    The job's own result (a new model, a new LoRA) is selected, and a choice that is gone is
    replaced. Otherwise only the lists are sent, no value: `model` and `lora` are what the page had
    when it asked, and the user may have chosen again while this answer was on its way.
    """
    pick = ctl.selection_after(state)
    models = ctl.model_choices()
    chosen = pick.get("model") or (model if model in models else (models[0] if models else None))
    loras = ctl.lora_choices()
    kept = lora in loras and chosen == model
    new_lora = pick.get("lora") or (lora if kept else ctl.latest_lora(chosen or ""))
    out = {"model": _list_update(models, chosen, chosen != model),
           "lora": _list_update(loras, new_lora, new_lora != lora),
           **_checkpoint_lists(ctl)}
    if chosen == model:  # e.g. new lifetime steps; another model's info comes with its settings (model_chosen)
        out.update(ctl.info_values(chosen or ""))
    return out


def _list_update(choices: list[str], value: str | None, select: bool) -> Any:
    """A dropdown's new list; its value only when `select`: the page's own choice is left alone."""
    return compat.update(choices=choices, value=value) if select else compat.update(choices=choices)
