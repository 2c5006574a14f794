"""The standalone app end to end in Debian's headless chromium (Playwright's sync API, no browser download).

`python -m lora_trainer ui` runs in a subprocess on 127.0.0.1 and a free port,
with a fresh models folder. The browser creates a model from the built-in tiny
checkpoint, sets parameters and a concept, trains a few steps and watches the
progress move, cancels once and trains again, runs Generate Ckpt and the test
finds the checkpoint on disk. Requests to anything but 127.0.0.1 are blocked
and listed. A screenshot of each stage goes to test-artifacts/.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers_browser import CHROMIUM, CHROMIUM_ARGS, free_port, open_tab, require_chromium
from playwright import sync_api
import gradio  # noqa: F401  (the UI needs it: requirements.txt)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
JOB_TIMEOUT_MS = 120_000
# gradio 3's own page template loads this from a CDN; the request is blocked and the page works without it.
GRADIO_TEMPLATE_REQUESTS = ("iframeResizer.contentWindow.min.js",)


def wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


class App:
    """The standalone app in a subprocess on a fresh models folder; unpacks as (url, models folder, log).
    `restart()` stops it and starts it again on the same folder (a new port), as a user restarting it."""

    def __init__(self, root: Path):
        self.root, self.models, self.log = root, root / "models", root / "app.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __iter__(self):
        return iter((self.url, self.models, self.log))

    def start(self) -> None:
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "a") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--models-dir",
                                             str(self.models), "--port", str(port)], cwd=self.root, env=env,
                                            stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/"
        wait_for_server(self.url, self.process, self.log)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The standalone app in a subprocess: (url, models folder, log)."""
    running = App(tmp_path_factory.mktemp("ui-app"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def page(app):
    require_chromium()
    url = app.url
    blocked: list[str] = []

    def only_this_machine(route):
        target = route.request.url
        if re.match(r"^(https?|wss?)://(127\.0\.0\.1|localhost)[:/]", target) or target.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(target)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.route("**/*", only_this_machine)
        pg.set_default_timeout(30_000)
        pg.goto(url)
        pg.wait_for_selector("#lora_trainer_train")
        pg.blocked = blocked
        yield pg
        browser.close()


# -- driving gradio widgets by element id (the same on gradio 3, 4 and 6) --------------------
def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox]):not([type=range])").first


def value(page, elem_id: str) -> str:
    return field(page, elem_id).input_value()


def type_into(page, elem_id: str, text: str) -> None:
    box = field(page, elem_id)
    box.fill(text)
    box.press("Tab")  # gradio reads numbers and text on input/blur


def tick(page, elem_id: str, on: bool = True) -> None:
    box = page.locator(f"#{elem_id} input[type=checkbox]")
    box.check() if on else box.uncheck()


def choose(page, elem_id: str, option: str) -> None:
    quoted = option.replace('"', '\\"')
    item = page.locator(f'li[aria-label="{quoted}"], li[data-value="{quoted}"]').first
    chosen = "([id, v]) => { const e = document.querySelector('#' + id + ' input'); return e && e.value === v; }"
    # A poll that updates the dropdown's choices closes an open list, and one that was asked before the click
    # answers with the value the page had then: open the list and choose again.
    for attempt in range(3):
        field(page, elem_id).click()
        try:
            item.click(timeout=5_000)
            page.wait_for_function(chosen, arg=[elem_id, option], timeout=10_000)
            return
        except sync_api.TimeoutError:
            page.keyboard.press("Escape")
    field(page, elem_id).click()
    item.click()
    page.wait_for_function(chosen, arg=[elem_id, option])


def click(page, elem_id: str) -> None:
    page.locator(f"#{elem_id}").click()


def wait_message(page, pattern: str, timeout_ms: float | None = None) -> str:
    try:
        page.wait_for_function("([id, p]) => { const e = document.querySelector('#' + id + ' textarea');"
                               " return e && new RegExp(p).test(e.value); }", arg=["lora_trainer_message", pattern],
                               **({"timeout": timeout_ms} if timeout_ms else {}))
    except sync_api.TimeoutError:
        shot(page, "message-timeout")
        raise AssertionError(f"the Message box never matched {pattern!r}; it shows "
                             f"{value(page, 'lora_trainer_message')!r}") from None
    return value(page, "lora_trainer_message")


def status(page) -> str:
    return page.locator("#lora_trainer_status_line").inner_text()


def wait_status(page, pattern: str, timeout: int = JOB_TIMEOUT_MS) -> str:
    """Wait on the Train tab (newer gradio renders a tab's contents only once it is shown)."""
    open_tab(page, "Train")
    page.wait_for_function("p => { const e = document.querySelector('#lora_trainer_status_line');"
                           " return e && new RegExp(p).test(e.textContent); }", arg=pattern, timeout=timeout)
    return status(page)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


# -- the user's journey ---------------------------------------------------------------
def test_the_tab_shows_the_labels_users_know(page):
    for label in ("Model", "Lora Model", "Custom Model Name", "Half Model", "Save Checkpoint to Subdirectory",
                  "Loaded Model", "Model Revision", "Source Checkpoint"):
        # waits (and fails after the page's timeout) rather than reading the page mid-render
        page.get_by_text(label, exact=True).first.wait_for(state="attached")
    for button in ("Train", "Cancel", "Generate Class Images", "Check GPU Memory", "Generate Ckpt", "Save Params",
                   "Load Params"):
        assert page.get_by_role("button", name=button, exact=True).count() >= 1, button
    assert value(page, "lora_trainer_create_source") == "tiny-sd1.safetensors"
    # No model yet: the second text encoder's fields show (the model chosen next may be an SDXL one); its rank
    # is the one outside "Advanced".
    open_tab(page, "Parameters")
    page.locator("#lora_trainer_param_text_encoder_2_rank").wait_for(state="visible")


def test_create_model_from_the_tiny_checkpoint(page, app):
    _, models, _ = app
    open_tab(page, "Create Model")
    type_into(page, "lora_trainer_create_name", "cat")
    click(page, "lora_trainer_create_button")
    wait_status(page, "create model 'cat' finished")
    # The Message box ends with the outcome, not "Started ...".
    assert wait_message(page, "^Create model 'cat' finished: wrote ") == \
        f"Create model 'cat' finished: wrote {models / 'lora_trainer' / 'cat'}"
    assert (models / "lora_trainer" / "cat" / "model_info.json").is_file()
    # The poll puts the new model into the dropdown and shows its info.
    page.wait_for_function("() => document.querySelector('#lora_trainer_info_model_name textarea, "
                           "#lora_trainer_info_model_name input').value === 'cat'")
    assert value(page, "lora_trainer_model") == "cat"
    assert value(page, "lora_trainer_info_model_type") == "sd1"
    assert value(page, "lora_trainer_info_source_checkpoint") == "tiny-sd1.safetensors"
    # An SD 1.x model has one text encoder: the second one's fields are hidden (on gradio 3 too).
    open_tab(page, "Parameters")
    page.locator("#lora_trainer_param_text_encoder_2_rank").wait_for(state="hidden")
    shot(page, "1-created")


def test_a_failed_create_model_shows_its_error_in_the_message_box(page):
    open_tab(page, "Create Model")
    type_into(page, "lora_trainer_create_name", "cat")  # exists, Overwrite not ticked
    click(page, "lora_trainer_create_button")
    message = wait_message(page, "^Create model 'cat' failed: ")
    assert "already exists" in message and "overwrite" in message.lower(), message


def test_set_parameters_and_a_concept(page, app, tmp_path_factory):
    from PIL import Image

    _, models, _ = app
    pictures = tmp_path_factory.mktemp("pictures")
    for i, colour in enumerate([(200, 40, 40), (40, 160, 220)]):
        Image.new("RGB", (80, 64), colour).save(pictures / f"scs_{i}.png")

    open_tab(page, "Parameters")
    choose(page, "lora_trainer_preset", "CPU / test")  # choosing applies it: no preset claimed unapplied
    wait_message(page, "Applied preset 'CPU / test'")
    assert value(page, "lora_trainer_param_resolution") == "64"
    type_into(page, "lora_trainer_param_resolution", "72")
    click(page, "lora_trainer_apply_preset")  # applied again
    wait_message(page, "Applied preset 'CPU / test'")
    wait_value(page, "lora_trainer_param_resolution", "64")  # the click's answer may land after its message
    type_into(page, "lora_trainer_param_max_train_steps", "3")
    type_into(page, "lora_trainer_param_num_train_epochs", "2")

    open_tab(page, "Concepts")
    type_into(page, "lora_trainer_concept1_instance_data_dir", str(pictures))
    type_into(page, "lora_trainer_concept1_instance_prompt", "chibi scs girl")

    click(page, "lora_trainer_save_params")
    wait_message(page, "Saved parameters")
    from lora_trainer.config import TrainingParams, load_concepts

    saved = TrainingParams.load(models / "lora_trainer" / "cat" / "params.json")
    assert (saved.max_train_steps, saved.num_train_epochs, saved.resolution, saved.rank) == (3, 2, 64, 2)
    concepts = load_concepts(models / "lora_trainer" / "cat" / "concepts_list.json")
    assert [(c.instance_data_dir, c.instance_prompt) for c in concepts] == [(str(pictures), "chibi scs girl")]

    # Load Params brings back what was saved after the widgets changed.
    open_tab(page, "Parameters")
    type_into(page, "lora_trainer_param_max_train_steps", "9")
    click(page, "lora_trainer_load_params")
    wait_message(page, "Loaded the parameters of 'cat'")
    assert value(page, "lora_trainer_param_max_train_steps") == "3"

    # What these parameters would hold on a GPU, counted before anything is loaded.
    click(page, "lora_trainer_check_memory")
    # The predicted peak runs one training step on fake tensors: seconds, more on a loaded CI machine.
    wait_message(page, "GPU memory before activations:", timeout_ms=420_000)
    shot(page, "2-parameters")


def choose_model(page, name: str) -> None:
    choose(page, "lora_trainer_model", name)
    page.wait_for_function("n => { const e = document.querySelector('#lora_trainer_info_model_name textarea, "
                           "#lora_trainer_info_model_name input'); return e && e.value === n; }", arg=name)


def wait_value(page, elem_id: str, expected: str) -> None:
    page.wait_for_function("([id, v]) => { const e = document.querySelector('#' + id + ' textarea, #' + id + "
                           "' input:not([type=checkbox]):not([type=range])'); return e && e.value === v; }",
                           arg=[elem_id, expected])


def shows_settings(page, steps: str, pictures: str, prompt: str) -> None:
    """The Parameters and Concepts tabs hold these values (waiting for the model's change to land)."""
    open_tab(page, "Parameters")
    wait_value(page, "lora_trainer_param_max_train_steps", steps)
    open_tab(page, "Concepts")
    wait_value(page, "lora_trainer_concept1_instance_data_dir", pictures)
    wait_value(page, "lora_trainer_concept1_instance_prompt", prompt)


def test_the_form_follows_the_chosen_model_and_a_reload(page, app, tmp_path_factory):
    """Model A then B then A: each shows its own saved fields; a new model starts from the defaults."""
    from lora_trainer.config import ModelInfo, TrainingParams

    _, models, _ = app
    cat_pictures = value(page, "lora_trainer_concept1_instance_data_dir")
    assert cat_pictures  # saved for 'cat' by the test before
    open_tab(page, "Create Model")
    type_into(page, "lora_trainer_create_name", "dog")
    click(page, "lora_trainer_create_button")
    wait_message(page, "^Create model 'dog' finished")
    wait_value(page, "lora_trainer_model", "dog")  # the new model is chosen: its (default) settings show
    native = ModelInfo.load(models / "lora_trainer" / "dog" / "model_info.json").resolution
    shows_settings(page, str(TrainingParams().max_train_steps), "", "")
    open_tab(page, "Parameters")
    wait_value(page, "lora_trainer_param_resolution", str(native))
    assert value(page, "lora_trainer_preset") == ""  # no preset claimed for fields it did not set
    assert value(page, "lora_trainer_lora") == ""  # 'dog' has no LoRA
    type_into(page, "lora_trainer_param_max_train_steps", "7")
    open_tab(page, "Concepts")
    dog_pictures = str(tmp_path_factory.mktemp("dog"))
    type_into(page, "lora_trainer_concept1_instance_data_dir", dog_pictures)
    type_into(page, "lora_trainer_concept1_instance_prompt", "scs dog")
    click(page, "lora_trainer_save_params")
    wait_message(page, "Saved parameters")

    choose_model(page, "cat")
    shows_settings(page, "3", cat_pictures, "chibi scs girl")
    choose_model(page, "dog")
    shows_settings(page, "7", dog_pictures, "scs dog")
    choose_model(page, "cat")
    shows_settings(page, "3", cat_pictures, "chibi scs girl")
    # Nothing of one model was written into the other's folder.
    assert TrainingParams.load(models / "lora_trainer" / "dog" / "params.json").max_train_steps == 7
    assert TrainingParams.load(models / "lora_trainer" / "cat" / "params.json").max_train_steps == 3

    # A reload shows the model on screen with its saved settings, not the defaults.
    choose_model(page, "dog")
    page.reload()
    page.wait_for_selector("#lora_trainer_train")
    page.wait_for_function("() => { const e = document.querySelector('#lora_trainer_info_model_name textarea, "
                           "#lora_trainer_info_model_name input'); return e && e.value !== ''; }")
    shown = value(page, "lora_trainer_model")
    steps, pictures, prompt = {"cat": ("3", cat_pictures, "chibi scs girl"), "dog": ("7", dog_pictures, "scs dog")}[shown]
    shows_settings(page, steps, pictures, prompt)
    if shown != "cat":
        choose_model(page, "cat")
        shows_settings(page, "3", cat_pictures, "chibi scs girl")
    shot(page, "2b-follows-the-model")


def test_train_cancel_and_train_again(page, app):
    _, models, _ = app
    open_tab(page, "Train")
    # A long run to cancel: many steps.
    open_tab(page, "Parameters")
    type_into(page, "lora_trainer_param_max_train_steps", "500")
    type_into(page, "lora_trainer_param_num_train_epochs", "500")
    open_tab(page, "Train")
    click(page, "lora_trainer_train")
    wait_message(page, "Started train 'cat'")
    page.wait_for_function("() => { const e = document.querySelector('#lora_trainer_progress_box');"
                           " return e && e.dataset.job === 'train' && e.dataset.running === 'true'"
                           " && Number(e.dataset.step) >= 2; }", timeout=JOB_TIMEOUT_MS)
    running = page.locator("#lora_trainer_progress_box")
    first_step = int(running.get_attribute("data-step"))
    figures = running.inner_text()
    assert re.search(r"Step \d+/500", figures) and "it/s" in figures and "time left" in figures, figures
    page.wait_for_function("s => Number(document.querySelector('#lora_trainer_progress_box').dataset.step) > s",
                           arg=first_step, timeout=JOB_TIMEOUT_MS)  # the progress moves
    click(page, "lora_trainer_train")  # a second job is refused, naming the running one
    wait_message(page, "A job is running: train 'cat'")
    click(page, "lora_trainer_cancel")
    wait_status(page, "train 'cat' cancelled")
    message = wait_message(page, "^Train 'cat' cancelled: ")  # not "Cancelling ..." once it has ended
    log = value(page, "lora_trainer_log")
    assert re.search(r"^Training cancelled after \d+ steps; saved .*cat_\d+\.safetensors$", log, re.M), log
    assert "Training finished" not in log
    shot(page, "3-cancelled")

    open_tab(page, "Parameters")
    type_into(page, "lora_trainer_param_max_train_steps", "3")
    type_into(page, "lora_trainer_param_save_preview_every_n_steps", "3")
    open_tab(page, "Train")
    click(page, "lora_trainer_train")
    # A run that ends within the click's quick_seconds is answered with its outcome at once (test_queue.py).
    wait_message(page, "^(Started train 'cat'|Train 'cat' finished: 3 steps)")
    wait_status(page, "train 'cat' finished")
    figures = page.locator("#lora_trainer_progress_box").inner_text()
    assert "Step 3/3" in figures and "loss" in figures
    assert "Training finished" in value(page, "lora_trainer_log")
    wait_message(page, "^Train 'cat' finished: 3 steps")
    # The Log box shows its newest line: scrolled to its end.
    page.wait_for_function("() => { const a = document.querySelector('#lora_trainer_log textarea');"
                           " return a.scrollHeight > a.clientHeight && "
                           "a.scrollTop + a.clientHeight >= a.scrollHeight - 4; }")
    assert list((models / "Lora").glob("*.safetensors"))
    page.wait_for_selector("#lora_trainer_samples img")  # the sample picture of step 3
    page.wait_for_function("() => document.querySelector('#lora_trainer_lora input').value !== ''")
    shot(page, "4-trained")


def test_generate_ckpt_writes_the_checkpoint(page, app):
    _, models, log = app
    before = set(models.joinpath("Stable-diffusion").rglob("*.safetensors"))
    type_into(page, "lora_trainer_custom_model_name", "scs")
    tick(page, "lora_trainer_half")
    click(page, "lora_trainer_generate_ckpt_button")
    wait_status(page, "generate ckpt of 'cat' finished")
    wait_message(page, "^Generate ckpt of 'cat' finished: wrote ")
    made = set(models.joinpath("Stable-diffusion").rglob("*.safetensors")) - before
    assert len(made) == 1, made
    merged = made.pop()
    lora = value(page, "lora_trainer_lora")
    assert re.fullmatch(r"scs_\d+_lora\.safetensors" if lora else r"scs_\d+\.safetensors", merged.name)
    from safetensors import safe_open

    with safe_open(str(merged), "pt") as f:
        key = next(k for k in f.keys() if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
        assert str(f.get_tensor(key).dtype) == "torch.float16"  # "Half Model"
    # Our dropdown lists the new checkpoint without a page reload.
    page.wait_for_function("n => Array.from(document.querySelectorAll('#lora_trainer_create_source input'))"
                           ".length > 0", arg=merged.name)
    open_tab(page, "Create Model")
    field(page, "lora_trainer_create_source").click()
    listed = page.locator(f'li[aria-label="{merged.relative_to(models / "Stable-diffusion").as_posix()}"], '
                          f'li[data-value="{merged.relative_to(models / "Stable-diffusion").as_posix()}"]')
    assert listed.count() >= 1
    page.keyboard.press("Escape")
    open_tab(page, "Train")
    shot(page, "5-generated")

    # The same again: refused (the file exists). The click empties the Message box at once, then the
    # refusal replaces the last outcome: every value the box shows in between is recorded, frame by frame.
    page.evaluate("""() => { window.lt_seen = []; const look = () => {
        const e = document.querySelector('#lora_trainer_message textarea');
        const v = e ? e.value : null;
        if (window.lt_seen[window.lt_seen.length - 1] !== v) window.lt_seen.push(v);
        if (!/failed/.test(v || '')) requestAnimationFrame(look); }; look(); }""")
    click(page, "lora_trainer_generate_ckpt_button")
    message = wait_message(page, "^Generate ckpt of 'cat' failed: ")
    seen = page.evaluate("() => window.lt_seen")
    assert seen[0].startswith("Generate ckpt of 'cat' finished") and seen[1:] == ["", message], seen
    assert "already exists" in message and "overwrit" in message.lower(), message
    wait_status(page, "generate ckpt of 'cat' failed")  # the poll has seen the end too (it updates the lists)

    # The LoRA of another model: the outcome says so.
    lora = value(page, "lora_trainer_lora")
    choose_model(page, "dog")
    wait_value(page, "lora_trainer_lora", "")  # the Lora Model follows the model: 'dog' has none
    choose(page, "lora_trainer_lora", lora)
    click(page, "lora_trainer_generate_ckpt_button")
    wait_message(page, rf"^Generate ckpt of 'dog' finished: .*; LoRA {re.escape(Path(lora).stem)} was trained on "
                       r"'cat'; merged into 'dog'$")
    # A model chosen as a job ends stays chosen: the poll that sees the end sends the new lists, and a value
    # only for what the job made, so an answer asked for before this choice does not set it back.
    choose_model(page, "cat")
    wait_status(page, "generate ckpt of 'dog' finished")
    page.wait_for_timeout(1_500)  # the next poll's answer too
    assert (value(page, "lora_trainer_model"), value(page, "lora_trainer_info_model_name")) == ("cat", "cat")
    ours = [u for u in page.blocked if not u.endswith(GRADIO_TEMPLATE_REQUESTS)]
    assert ours == [], f"the page tried to reach other hosts: {ours}"


def queue_shows(page, pattern: str) -> str:
    """Wait until the Train tab's Queue box matches `pattern` (a regular expression); return its text."""
    open_tab(page, "Train")
    try:
        page.wait_for_function("p => { const e = document.querySelector('#lora_trainer_queue textarea');"
                               " return e && new RegExp(p).test(e.value); }", arg=pattern, timeout=JOB_TIMEOUT_MS)
    except sync_api.TimeoutError:
        shot(page, "queue-timeout")
        raise AssertionError(f"the Queue box never matched {pattern!r}; it shows "
                             f"{value(page, 'lora_trainer_queue')!r}") from None
    return value(page, "lora_trainer_queue")


def test_the_queue_from_the_tab_survives_a_restart_and_a_failed_item_lets_the_next_run(page, app):
    """Add to Queue three times while the first trains; Cancel; restart the app; the reloaded tab shows the
    queue; Run Queue: 'dog' (no pictures) fails with its error and 'cat' trains its one step."""
    _, models, _ = app
    choose_model(page, "cat")
    open_tab(page, "Parameters")
    wait_value(page, "lora_trainer_param_max_train_steps", "3")  # cat's saved settings have landed
    type_into(page, "lora_trainer_param_max_train_steps", "500")  # long: the next two wait behind it
    type_into(page, "lora_trainer_param_num_train_epochs", "500")
    click(page, "lora_trainer_add_to_queue")
    wait_message(page, "^Added 'cat' to the queue. Started training queue")
    queue_shows(page, r"^1\. cat \[running\]$")
    choose_model(page, "dog")  # its concept's folder has no pictures: it will fail
    click(page, "lora_trainer_add_to_queue")
    wait_message(page, "^Added 'dog' to the queue. 1 waiting; they run after the current one")
    choose_model(page, "cat")
    open_tab(page, "Parameters")
    # cat's saved settings have landed: the running item's (Train writes them at its start), or still the old
    page.wait_for_function("() => /^(3|500)$/.test(document.querySelector("
                           "'#lora_trainer_param_max_train_steps input').value)")
    type_into(page, "lora_trainer_param_max_train_steps", "1")
    click(page, "lora_trainer_add_to_queue")
    wait_message(page, "^Added 'cat' to the queue. 2 waiting")
    queue_shows(page, r"^1\. cat \[running\]\n2\. dog \[pending\]\n3\. cat \[pending\]$")
    click(page, "lora_trainer_cancel")
    wait_status(page, "training queue cancelled")
    queue_shows(page, r"^1\. cat \[cancelled\]: .*cat_\d+\.safetensors\n2\. dog \[pending\]\n3\. cat \[pending\]$")
    shot(page, "6-queued")

    app.restart()
    page.goto(app.url)
    page.wait_for_selector("#lora_trainer_train")
    queue_shows(page, r"^1\. cat \[cancelled\].*\n2\. dog \[pending\]\n3\. cat \[pending\]$")
    loras = set(models.joinpath("Lora").glob("cat_*.safetensors"))
    click(page, "lora_trainer_run_queue")
    wait_message(page, "^(Started training queue|Training queue finished)")  # a quick end answers at once
    wait_status(page, "training queue finished")
    shown = queue_shows(page, r"\n3\. cat \[done\]: .*cat_\d+\.safetensors$")
    assert re.search(r"^2\. dog \[failed\]: ConfigError: Concept 1 Dataset Directory .*no pictures", shown, re.M), shown
    assert len(set(models.joinpath("Lora").glob("cat_*.safetensors")) - loras) == 1
    assert "Queue: training dog failed" in value(page, "lora_trainer_log")
    shot(page, "7-queue-ran")
    click(page, "lora_trainer_clear_queue")
    wait_message(page, "^Removed 3 finished item\\(s\\) from the queue; 0 left")
    queue_shows(page, "^The queue is empty.$")
