"""Stand-in of modules/script_callbacks.py (v1.10.1): the callbacks an extension registers.

Same names and signatures; extension ordering is left out. A callback that
raises is reported and skipped, as the real `report_exception` does.
"""
import dataclasses
import inspect
import os
import traceback

import webui_standin_calls


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'
    callback_name = f"base/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'
    callbacks.append(ScriptCallback(filename, fun, callback_name))


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def report_exception(c, job):
    webui_standin_calls.record("errors.report", f"Error executing callback {job} for {c.script}", traceback.format_exc())


def ui_tabs_callback():
    res = []
    for c in callback_map['callbacks_ui_tabs']:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_settings_callback():
    for c in callback_map['callbacks_ui_settings']:
        try:
            c.callback()
        except Exception:
            report_exception(c, 'ui_settings_callback')


def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


def on_ui_tabs(callback, *, name=None):
    """The callback returns None or a list of (gradio_component, title, elem_id)."""
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_train_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_train_tabs'], callback, name=name, category='ui_train_tabs')


def on_ui_settings(callback, *, name=None):
    """Add settings with shared.opts.add_option(shared.OptionInfo(...))."""
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')
