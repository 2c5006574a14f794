"""javascript/lora_trainer.js in a real browser (Debian's chromium through Playwright) on a small gradio page.

The page has only the elements the script looks for, with the same ids as the
real tab: the confirm question must keep the click from gradio when dismissed
and let it through when accepted; returning to the tab must press the hidden
progress refresh button.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import gradio as gr
from helpers_browser import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium, tab_button
from playwright import sync_api

REPO = Path(__file__).resolve().parents[1]


def head_html() -> str:
    return f"<script>{(REPO / 'javascript' / 'lora_trainer.js').read_text(encoding='utf-8')}</script>"


def page_style() -> dict:
    """The script and style.css, given where this gradio takes them (Blocks before 6.0, launch from 6.0)."""
    return {"head": head_html(), "css": (REPO / "style.css").read_text(encoding="utf-8")}


def build_page():
    params = inspect.signature(gr.Blocks.__init__).parameters
    blocks_kwargs = {k: v for k, v in page_style().items() if k in params}
    with gr.Blocks(**blocks_kwargs) as demo:
        with gr.Tabs():
            with gr.Tab("Train"):
                with gr.Column(elem_id="lora_trainer_main"):
                    gr.HTML('<div id="lora_trainer_status_line" data-running="true">Running train</div>')
                    status = gr.Textbox(value="0", label="Status", elem_id="lora_trainer_status")
                    refresh = gr.Button("refresh", elem_id="lora_trainer_progress_refresh",
                                        elem_classes=["lora_trainer_hidden"])
                    overwrite = gr.Checkbox(label="Overwrite", elem_id="lora_trainer_generate_ckpt_overwrite")
                    generate = gr.Button("Generate Ckpt", elem_id="lora_trainer_generate_ckpt_button")
                    generated = gr.Textbox(value="0", label="Generated", elem_id="lora_trainer_generated")
            with gr.Tab("Other"):
                gr.Markdown("another tab")
        refresh.click(lambda n: str(int(n) + 1), inputs=status, outputs=status)
        generate.click(lambda n: str(int(n) + 1), inputs=generated, outputs=generated)
    return demo


@pytest.fixture(scope="module")
def page():
    require_chromium()
    demo = build_page()
    port = free_port()
    launch_kwargs, restore = {}, None
    if "head" not in inspect.signature(gr.Blocks.__init__).parameters:
        if "head" in inspect.signature(gr.Blocks.launch).parameters:
            launch_kwargs = page_style()
        else:
            restore = inject_like_the_web_ui()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = browser.new_page()
            pg.goto(f"http://127.0.0.1:{port}/")
            pg.wait_for_selector("#lora_trainer_generate_ckpt_button", timeout=60000)
            yield pg
            browser.close()
    finally:
        demo.close()
        if restore:
            restore()


def inject_like_the_web_ui():
    """Gradio 3 has no `head`: add the script and style to every page as the web UI does it
    (modules/ui_gradio_extensions.py reload_javascript patches gradio's TemplateResponse)."""
    import gradio.routes

    original = gradio.routes.templates.TemplateResponse
    style = page_style()

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{style['head']}</head>".encode("utf8"))
        res.body = res.body.replace(b"</body>", f"<style>{style['css']}</style></body>".encode("utf8"))
        res.init_headers()
        return res

    gradio.routes.templates.TemplateResponse = template_response

    def restore():
        gradio.routes.templates.TemplateResponse = original

    return restore


def value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def wait_at_least(page, elem_id: str, least: int) -> None:
    page.wait_for_function(
        "([id, n]) => { const e = document.querySelector('#' + id + ' textarea, #' + id + ' input'); return e && Number(e.value) >= n; }",
        arg=[elem_id, least], timeout=20000)


def wait_value(page, elem_id: str, expected: str) -> None:
    page.wait_for_function(
        "([id, v]) => { const e = document.querySelector('#' + id + ' textarea, #' + id + ' input'); return e && e.value === v; }",
        arg=[elem_id, expected], timeout=20000)


def test_generate_without_overwrite_asks_nothing(page):
    asked = []

    def accept(dialog):
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    try:
        page.click("#lora_trainer_generate_ckpt_button")
        wait_value(page, "lora_trainer_generated", "1")
    finally:
        page.remove_listener("dialog", accept)
    assert asked == []


def test_overwrite_asks_and_a_no_keeps_the_click_from_gradio(page):
    page.locator("#lora_trainer_generate_ckpt_overwrite input[type=checkbox]").check()
    before = value(page, "lora_trainer_generated")
    questions = []

    def dismiss(dialog):
        questions.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.click("#lora_trainer_generate_ckpt_button")
    page.wait_for_timeout(1500)  # gradio would have answered by now if the click had reached it
    assert len(questions) == 1 and "Replace" in questions[0]
    assert value(page, "lora_trainer_generated") == before

    page.once("dialog", lambda d: d.accept())
    page.click("#lora_trainer_generate_ckpt_button")
    wait_value(page, "lora_trainer_generated", str(int(before) + 1))


def test_returning_to_the_tab_refreshes_the_progress_view(page):
    assert not page.locator("#lora_trainer_progress_refresh").is_visible()  # style.css hides it
    before = int(value(page, "lora_trainer_status"))
    tab_button(page, "Other").click()
    tab_button(page, "Train").click()
    wait_at_least(page, "lora_trainer_status", before + 1)


def test_on_gradio_3_the_page_polls_while_the_tab_is_shown_and_only_then(page):
    """Gradio 3 gets no server-side poll in the web UI (it blocks Reload UI): the script presses refresh,
    every second while a job runs (the status line says data-running="true")."""
    gradio_3 = int(gr.__version__.split(".")[0]) < 4
    tab_button(page, "Train").click()
    page.wait_for_timeout(500)
    start = int(value(page, "lora_trainer_status"))
    page.wait_for_timeout(3500)
    shown = int(value(page, "lora_trainer_status")) - start
    tab_button(page, "Other").click()
    page.wait_for_timeout(1500)  # a poll sent just before the switch may still answer
    hidden_start = int(value(page, "lora_trainer_status"))
    page.wait_for_timeout(3000)
    hidden = int(value(page, "lora_trainer_status")) - hidden_start
    tab_button(page, "Train").click()
    if gradio_3:
        assert shown >= 2
    else:
        assert shown == 0  # gradio 4.40 and later poll with gr.Timer; the page adds nothing
    assert hidden == 0
