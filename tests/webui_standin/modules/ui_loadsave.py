"""Stand-in of modules/ui_loadsave.py (v1.10.1): the web UI's ui-config.json of component defaults.

After building every tab the web UI walks its blocks (`add_block(tab, tab_id)`): each labelled
component's value (and a slider's limits, a component's visibility) is stored under
"<tab id>/<label>/<field>", or, when the file already holds that key, set from the file before the
page is served; `dump_defaults` writes the file. Forge keeps the same code. Copied: the key
scheme, `do_not_save_to_config`, the Dropdown check that a saved value is one of the choices, the
Textbox/Number conversions. Left out: the "Defaults" settings page and InputAccordion.
"""
import json
import os

import gradio as gr


class UiLoadsave:
    """Saving and restoring default values of gradio components."""

    def __init__(self, filename):
        self.filename = filename
        self.ui_settings = {}
        self.component_mapping = {}
        self.error_loading = False
        try:
            self.ui_settings = self.read_from_file()
        except FileNotFoundError:
            pass

    def add_component(self, path, x):
        def apply_field(obj, field, condition=None):
            key = f"{path}/{field}"
            if getattr(obj, "do_not_save_to_config", False):
                return
            saved_value = self.ui_settings.get(key, None)
            if saved_value is None:
                self.ui_settings[key] = getattr(obj, field)
            elif condition and not condition(saved_value):
                pass
            else:
                if isinstance(obj, gr.Textbox) and field == "value":
                    saved_value = str(saved_value)
                elif isinstance(obj, gr.Number) and field == "value":
                    try:
                        saved_value = float(saved_value)
                    except ValueError:
                        return
                setattr(obj, field, saved_value)
            if field == "value" and key not in self.component_mapping:
                self.component_mapping[key] = obj

        if type(x) in [gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown, gr.Button] and x.visible:
            apply_field(x, "visible")
        if type(x) == gr.Slider:
            for field in ("value", "minimum", "maximum", "step"):
                apply_field(x, field)
        if type(x) == gr.Radio:
            apply_field(x, "value", lambda val: val in _choices(x))
        if type(x) in (gr.Checkbox, gr.Textbox, gr.Number):
            apply_field(x, "value")
        if type(x) == gr.Dropdown:
            def check_dropdown(val):
                if getattr(x, "multiselect", False):
                    return all(value in _choices(x) for value in val)
                return val in _choices(x)

            apply_field(x, "value", check_dropdown)

    def add_block(self, x, path=""):
        """Adds all components inside a gradio block x to the registry of tracked components."""
        if hasattr(x, "children"):
            if isinstance(x, gr.Tabs) and x.elem_id is not None:
                self.add_component(f"{path}/Tabs@{x.elem_id}", x)
            for c in x.children:
                self.add_block(c, path)
        elif x.label is not None:
            self.add_component(f"{path}/{x.label}", x)
        elif isinstance(x, gr.Button) and x.value is not None:
            self.add_component(f"{path}/{x.value}", x)

    def read_from_file(self):
        with open(self.filename, "r", encoding="utf8") as file:
            return json.load(file)

    def write_to_file(self, current_ui_settings):
        with open(self.filename, "w", encoding="utf8") as file:
            json.dump(current_ui_settings, file, indent=4, ensure_ascii=False, default=str)

    def dump_defaults(self):
        """Saves default values to a file unless there was an error loading them at start."""
        if self.error_loading and os.path.exists(self.filename):
            return
        self.write_to_file(self.ui_settings)


def _choices(x):
    # gradio 3.41 and later keep (name, value) pairs
    return [c[0] if isinstance(c, (tuple, list)) else c for c in x.choices]
