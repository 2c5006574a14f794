"""Every difference between the gradio versions we run on, in one place.

gradio 3.41.2 (the web UI v1.10.1 pin), 4.40.0 (Forge) and the newest (6.x):
- keyword arguments a version lacks (`info=`, `minimum=`, `columns=`,
  `allow_custom_value=`, ...) are dropped by looking at the signature;
- updates: `gr.update(...)` exists everywhere; "leave it as it is" is
  `gr.skip()` where it exists, else an empty update;
- polling: `gr.Timer` (4.40 and later) or `every=` on a load event (3.x);
- `theme`/`css`/`head` go to `Blocks(...)` before 6.0 and to `launch(...)` from 6.0 on.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Sequence

import gradio as gr

GRADIO_VERSION = gr.__version__
GRADIO_MAJOR = int(GRADIO_VERSION.split(".")[0])
_LAUNCH_STYLE = "_lora_trainer_launch_style"


def component(cls, **kwargs) -> Any:
    """`cls(**kwargs)` without the keywords this gradio's `cls` does not take."""
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in params})


def update(**kwargs) -> Any:
    """A change of some properties of an output (value, choices, interactive, ...)."""
    return gr.update(**kwargs)


def no_change() -> Any:
    """An output left exactly as it is."""
    return gr.skip() if hasattr(gr, "skip") else gr.update()


def blocks(*, theme=None, css: str | None = None, head: str | None = None, **kwargs) -> gr.Blocks:
    """A Blocks; `theme`, `css` and `head` are kept for `launch` on gradio 6+, where they moved.

    `head` (HTML for the page's head, e.g. scripts) is dropped on gradio 3, which has no such option
    (`run_scripts_on_load` runs its scripts there).
    """
    style = {k: v for k, v in (("theme", theme), ("css", css), ("head", head)) if v is not None}
    if GRADIO_MAJOR >= 6:
        demo = gr.Blocks(**kwargs)
        setattr(demo, _LAUNCH_STYLE, style)
        return demo
    params = inspect.signature(gr.Blocks.__init__).parameters
    return gr.Blocks(**{k: v for k, v in style.items() if k in params}, **kwargs)


def takes_head() -> bool:
    """Whether this gradio puts `head` HTML (our page scripts) into the page (4.x `Blocks`, 6.x `launch`)."""
    return GRADIO_MAJOR >= 6 or "head" in inspect.signature(gr.Blocks.__init__).parameters


def run_scripts_on_load(demo: gr.Blocks, head: str) -> None:
    """Gradio 3 has no `head`: run the `<script>` bodies of `head` when the page loads instead.

    Must be called inside `with demo:`.
    """
    bodies = re.findall(r"<script[^>]*>(.*?)</script>", head, flags=re.S)
    if bodies:
        script = "() => {\n" + "\n".join(bodies) + "\n}"
        demo.load(None, inputs=None, outputs=None, _js=script)


def launch(demo: gr.Blocks, **kwargs) -> Any:
    """`demo.launch(**kwargs)` plus the theme and css `blocks` kept, minus what this version lacks."""
    kwargs = {**getattr(demo, _LAUNCH_STYLE, {}), **kwargs}
    params = inspect.signature(demo.launch).parameters
    return demo.launch(**{k: v for k, v in kwargs.items() if k in params})


def queue(demo: gr.Blocks) -> gr.Blocks:
    """Enable the queue (needed for polling on gradio 3)."""
    return demo.queue()


def poll(demo: gr.Blocks, fn: Callable, inputs: Sequence, outputs: Sequence, seconds: float, *,
         page_polls: bool = False) -> None:
    """Call `fn(*inputs)` every `seconds` while the page is open, setting `outputs`.

    `page_polls`: the page presses the tab's hidden refresh button itself
    (javascript/lora_trainer.js does on gradio 3). Then gradio 3 gets no
    `every=`: that loop runs on the server for as long as a page is open, and
    inside the web UI it keeps "Reload UI" from ever finishing (seen on 1.10.1).
    Must be called inside `with demo:`.
    """
    if hasattr(gr, "Timer"):
        timer = gr.Timer(seconds)
        timer.tick(fn, inputs=list(inputs), outputs=list(outputs), **_quiet(timer.tick))
    elif not page_polls:
        demo.load(fn, inputs=list(inputs), outputs=list(outputs), every=seconds, **_quiet(demo.load))


def _quiet(listener: Callable) -> dict:
    """No spinner over the outputs of a background refresh, where the version allows it."""
    params = inspect.signature(listener).parameters
    out = {}
    if "show_progress" in params:
        out["show_progress"] = "hidden" if GRADIO_MAJOR >= 4 else False
    if "queue" in params and GRADIO_MAJOR >= 4:
        out["queue"] = True
    return out


def click(button, fn: Callable, inputs: Sequence, outputs: Sequence) -> None:
    """`button.click` without a progress overlay on the outputs (they are filled by polling)."""
    button.click(fn, inputs=list(inputs), outputs=list(outputs), **_quiet(button.click))


def change(widget, fn: Callable, inputs: Sequence, outputs: Sequence) -> None:
    widget.change(fn, inputs=list(inputs), outputs=list(outputs), **_quiet(widget.change))


def select(widget, fn: Callable, inputs: Sequence, outputs: Sequence) -> None:
    """`widget.select`: only the user's own choice, not a value set by the server."""
    widget.select(fn, inputs=list(inputs), outputs=list(outputs), **_quiet(widget.select))


def on_load(demo: gr.Blocks, fn: Callable, inputs: Sequence, outputs: Sequence) -> None:
    """Call `fn(*inputs)` when a page opens (also after a reload and the web UI's "Reload UI").

    Must be called inside `with demo:`; inside the web UI the tab's Blocks is rendered into the
    host's page and its load events come along.
    """
    demo.load(fn, inputs=list(inputs), outputs=list(outputs), **_quiet(demo.load))


def clear_on_click(button, output) -> None:
    """Empty `output` in the page the moment `button` is clicked, before the server answers.

    A javascript-only event: `js=` from gradio 4 on, `_js=` on gradio 3; the function returns
    the list of output values.
    """
    key = "js" if "js" in inspect.signature(button.click).parameters else "_js"
    hidden = {k: v for k, v in _quiet(button.click).items() if k == "show_progress"}
    button.click(None, inputs=None, outputs=[output], **{key: "() => ['']"}, **hidden)


def keep_out_of_host_config(components: Sequence) -> None:
    """The web UI (A1111 and Forge) saves every labelled component's value into its ui-config.json
    and sets it back at the next start, unless the component has `do_not_save_to_config`
    (modules/ui_loadsave.py). Per-model fields must follow the model, not that file.
    """
    for component in components:
        component.do_not_save_to_config = True


def gallery_value(paths: Sequence) -> list:
    """A Gallery's value from picture paths (a list of file paths works on 3.x, 4.x and 6.x)."""
    return [str(p) for p in paths]
