"""The tab rendered inside another page, as the web UI and Forge do (`blocks.render()` in their own Blocks):
the polling still brings a running job's progress to the page, in Debian's headless chromium."""
from __future__ import annotations

import threading


import gradio as gr
from helpers_browser import CHROMIUM, CHROMIUM_ARGS, free_port, open_tab, require_chromium
from playwright import sync_api

from lora_trainer.hosts import Host  # noqa: E402
from lora_trainer.progress import Progress  # noqa: E402

def test_progress_reaches_the_page_when_the_tab_is_inside_the_hosts_page(models_dir):
    require_chromium()
    from lora_trainer.ui import build_ui, gradio_compat
    from lora_trainer.ui.controller import Controller

    ctl = Controller(Host(models_dir))
    tab = build_ui(ctl.host, controller=ctl)
    with gr.Blocks(analytics_enabled=False) as page_blocks:  # the host's page
        with gr.Tabs():
            with gr.Tab("txt2img"):
                gr.Textbox(label="Prompt")
            with gr.Tab("LoRA Trainer"):
                tab.render()
    gradio_compat.queue(page_blocks)
    port = free_port()
    gradio_compat.launch(page_blocks, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                         quiet=True, show_api=False)
    step_reached, go_on = threading.Event(), threading.Event()

    def job(report, cancel):
        report(Progress(job="train", message="Training", step=7, total_steps=10, loss=0.5))
        step_reached.set()
        go_on.wait(60)
        return None

    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("http://127.0.0.1") else r.abort())
            page.goto(f"http://127.0.0.1:{port}/")
            open_tab(page, "LoRA Trainer")
            open_tab(page, "Train")  # the progress box is drawn once its sub-tab is shown (gradio 5 and later)
            ctl.runner.start("train", "train 'cat'", job)
            assert step_reached.wait(30)
            page.wait_for_function("() => { const e = document.querySelector('#lora_trainer_progress_box');"
                                   " return e && e.dataset.step === '7'; }", timeout=30_000)
            assert "Step 7/10" in page.locator("#lora_trainer_progress_box").inner_text()
            go_on.set()
            page.wait_for_function("() => /finished/.test(document.querySelector('#lora_trainer_status_line')"
                                   ".textContent)", timeout=30_000)
            browser.close()
    finally:
        go_on.set()
        ctl.runner.wait(30)
        # gradio 3's server may wait for its polling connections to end: do not let that hang the tests.
        closing = threading.Thread(target=page_blocks.close, daemon=True)
        closing.start()
        closing.join(15)
