// LoRA Trainer: only what gradio cannot do by itself.
//  1. Ask before a click that would overwrite files: "Create" with "Overwrite"
//     ticked (replaces a working model) and "Generate Ckpt" with "Overwrite"
//     ticked (replaces a checkpoint). Cancelling the question swallows the click
//     before gradio sees it.
//  2. Keep the progress view current: when the LoRA Trainer tab is shown again,
//     or the browser tab becomes visible again, press the (hidden) refresh button
//     so the view shows the running job at once instead of at the next poll.
//     On gradio 3 (the web UI's) the page is the poll: the refresh button is
//     pressed while the tab is on screen, every second while a job runs and
//     every five seconds otherwise, because gradio 3's own `every=` loop runs
//     on the server and keeps "Reload UI" from finishing.
//  3. Keep the Log box's newest line in view: whenever its text changes, scroll
//     it to the end, unless the user has scrolled up to read (gradio's own
//     autoscroll does not act on values set by an event on every version).
// The web UI injects every file of javascript/ into its page; the standalone
// app does the same. Everything here is keyed on ids starting with
// "lora_trainer_", so nothing touches the host's own elements.
(function () {
    "use strict";

    var CONFIRMS = [
        {
            button: "lora_trainer_create_button",
            overwrite: "lora_trainer_create_overwrite",
            question: "A working model with this name exists. Replace it? Its training (revision, lifetime steps, LoRA files) is lost."
        },
        {
            button: "lora_trainer_generate_ckpt_button",
            overwrite: "lora_trainer_generate_ckpt_overwrite",
            question: "Replace the checkpoint of the same name in the Stable-diffusion folder if it exists?"
        }
    ];
    var PROGRESS_VIEW = "lora_trainer_status";
    var PROGRESS_REFRESH = "lora_trainer_progress_refresh";
    var TAB_CONTENT = "lora_trainer_main";
    var STATUS_LINE = "lora_trainer_status_line";  // data-running="true" while a job runs
    var POLL_MS = 1000;
    var IDLE_POLL_MS = 5000;
    var lastPoll = 0;

    function root() {
        if (typeof gradioApp === "function") {
            return gradioApp();
        }
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function byId(id) {
        return root().querySelector("#" + id) || document.getElementById(id);
    }

    function isTicked(id) {
        var el = byId(id);
        if (!el) {
            return false;
        }
        var box = el.matches && el.matches("input[type=checkbox]") ? el : el.querySelector("input[type=checkbox]");
        return !!(box && box.checked);
    }

    function clickedElementWithId(event, id) {
        var path = event.composedPath ? event.composedPath() : [event.target];
        for (var i = 0; i < path.length; i++) {
            if (path[i] && path[i].id === id) {
                return path[i];
            }
        }
        return null;
    }

    // Capture phase on the document runs before gradio's own handlers on the button.
    document.addEventListener("click", function (event) {
        for (var i = 0; i < CONFIRMS.length; i++) {
            var rule = CONFIRMS[i];
            if (clickedElementWithId(event, rule.button) && isTicked(rule.overwrite) && !window.confirm(rule.question)) {
                event.preventDefault();
                event.stopImmediatePropagation();
                return;
            }
        }
    }, true);

    function isShown(el) {
        return !!(el && el.offsetParent !== null);
    }

    var lastRefresh = 0;

    function refreshProgressIfShown() {
        var view = byId(PROGRESS_VIEW);
        var button = byId(PROGRESS_REFRESH);
        var now = Date.now();
        if (!button || !isShown(view) || now - lastRefresh < 500) {
            return;
        }
        lastRefresh = now;
        button.click();
    }

    // Tab switches in the web UI and in gradio's own tabs are clicks on tab buttons
    // (role=tab in gradio 4 and later, a button in .tab-nav in gradio 3).
    document.addEventListener("click", function (event) {
        var path = event.composedPath ? event.composedPath() : [event.target];
        for (var i = 0; i < path.length; i++) {
            var el = path[i];
            var isTabButton = el && el.getAttribute && (el.getAttribute("role") === "tab" ||
                (el.tagName === "BUTTON" && el.parentElement && el.parentElement.classList.contains("tab-nav")));
            if (isTabButton) {
                window.setTimeout(refreshProgressIfShown, 100);
                return;
            }
        }
    }, true);

    function gradioMajorVersion() {
        var config = window.gradio_config;
        return config && config.version ? parseInt(config.version, 10) : NaN;
    }

    function pollIsOurs() {
        return gradioMajorVersion() < 4;  // gradio 4.40 and later poll with gr.Timer in the page itself
    }

    function lastPollPending() {
        // gradio 3 marks the outputs of an event that has not answered yet; do not queue another
        return !!root().querySelector("#" + TAB_CONTENT + " .generating");
    }

    function jobRunning() {
        var line = byId(STATUS_LINE);
        return !!(line && line.getAttribute("data-running") === "true");
    }

    window.setInterval(function () {
        if (document.hidden || !pollIsOurs()) {
            return;
        }
        var button = byId(PROGRESS_REFRESH);
        var now = Date.now();
        if (!button || !isShown(byId(TAB_CONTENT)) || lastPollPending()) {
            return;
        }
        if (jobRunning() || now - lastPoll >= IDLE_POLL_MS) {
            lastPoll = now;
            button.click();
        }
    }, POLL_MS);

    var LOG_BOX = "lora_trainer_log";
    var logText = null;
    var logAtEnd = true;

    function followLog() {
        var box = byId(LOG_BOX);
        var area = box && box.querySelector("textarea");
        if (!area || !isShown(area)) {
            return;  // a hidden box cannot scroll; it is scrolled when shown again
        }
        if (area.value !== logText) {
            logText = area.value;
            if (logAtEnd) {
                area.scrollTop = area.scrollHeight;
            }
        }
        logAtEnd = area.scrollTop + area.clientHeight >= area.scrollHeight - 4;
    }

    window.setInterval(followLog, 250);

    document.addEventListener("visibilitychange", function () {
        if (!document.hidden) {
            refreshProgressIfShown();
        }
    });
})();
