"""JobRunner: one job at a time, cancel, the host's Interrupt, host hooks in order (also after a failure)."""
from __future__ import annotations

import logging
import threading

import pytest

from lora_trainer.errors import ModelError
from lora_trainer.jobs import JobBusy, JobRunner
from lora_trainer.progress import Progress, TrainResult

from helpers_hosts import RecordingHost


@pytest.fixture
def host(models_dir):
    return RecordingHost(models_dir)


def wait_done(runner: JobRunner) -> None:
    assert runner.wait(timeout=20), "the job did not end"


def test_a_second_job_is_refused_naming_the_running_one(host):
    runner = JobRunner(host)
    release = threading.Event()
    runner.start("train", "train 'cat'", lambda report, cancel: release.wait(10))
    try:
        with pytest.raises(JobBusy, match="train 'cat'"):
            runner.start("merge", "generate ckpt of 'cat'", lambda report, cancel: None)
        assert runner.snapshot().name == "train 'cat'"
    finally:
        release.set()
        wait_done(runner)
    runner.start("merge", "generate ckpt of 'cat'", lambda report, cancel: "done")
    wait_done(runner)
    state = runner.snapshot()
    assert state.name == "generate ckpt of 'cat'" and state.result == "done" and state.error is None
    assert state.finished_jobs == 2


def test_cancel_stops_the_job_and_is_reported(host):
    runner = JobRunner(host)
    started = threading.Event()

    def job(report, cancel):
        step = 0
        started.set()
        while not cancel.is_set() and step < 10_000:
            step += 1
            report(Progress(job="train", message="Training", step=step, total_steps=10_000, loss=1.0 / step))
            threading.Event().wait(0.001)
        return TrainResult(lora_path=None, lifetime_steps=step, revision=1, steps=step, cancelled=cancel.is_set())

    runner.start("train", "train 'cat'", job)
    assert started.wait(10)
    assert runner.cancel() is True
    wait_done(runner)
    state = runner.snapshot()
    assert state.result.cancelled and state.result.steps < 10_000
    assert "cancelled" in state.status
    assert runner.cancel() is False  # nothing runs any more


def test_the_hosts_interrupt_cancels_too(host):
    runner = JobRunner(host)
    seen = []

    def job(report, cancel):
        host.interrupt.set()  # the user presses the web UI's Interrupt while we run
        seen.append(cancel.is_set())
        return None

    host.interrupt.set()  # pressed before our job: must not cancel it
    runner.start("class images", "generate class images", job)
    wait_done(runner)
    assert seen == [True]
    assert host.calls[0] == "clear_interrupt"


def test_training_borrows_the_gpu_and_refreshes_loras_in_order(host):
    runner = JobRunner(host)
    runner.start("train", "train 'cat'", lambda report, cancel: host.calls.append("job"))
    wait_done(runner)
    assert host.calls == ["clear_interrupt", "release_gpu", "job", "restore_gpu", "loras_changed"]


def test_after_a_failure_the_gpu_comes_back_and_the_error_is_shown(host):
    runner = JobRunner(host)

    def job(report, cancel):
        host.calls.append("job")
        raise ModelError("Model: 'cat' not found; create it first")

    runner.start("train", "train 'cat'", job)
    wait_done(runner)
    assert host.calls == ["clear_interrupt", "release_gpu", "job", "restore_gpu", "loras_changed"]
    state = runner.snapshot()
    assert state.error == "Model: 'cat' not found; create it first"
    assert "failed" in state.status and "create it first" in state.status
    assert state.log[-1] == "Error: Model: 'cat' not found; create it first"


def test_a_bug_in_a_job_keeps_its_traceback_in_the_log(host):
    runner = JobRunner(host)
    runner.start("class images", "generate class images", lambda report, cancel: 1 / 0)
    wait_done(runner)
    state = runner.snapshot()
    assert state.error.startswith("ZeroDivisionError")
    assert any("Traceback" in line for line in state.log)
    assert host.calls == ["clear_interrupt", "release_gpu", "restore_gpu"]


def test_merge_refreshes_checkpoints_only_when_it_worked_and_needs_no_gpu(host):
    runner = JobRunner(host)
    runner.start("merge", "generate ckpt", lambda report, cancel: "file")
    wait_done(runner)
    assert host.calls == ["clear_interrupt", "checkpoints_changed"]
    host.calls.clear()
    runner.start("merge", "generate ckpt", lambda report, cancel: (_ for _ in ()).throw(FileExistsError("x exists")))
    wait_done(runner)
    assert host.calls == ["clear_interrupt"]
    assert runner.snapshot().error == "x exists"


def test_progress_losses_samples_and_logging_lines_are_kept(host, tmp_path):
    runner = JobRunner(host)
    sample = tmp_path / "sample-2.png"

    def job(report, cancel):
        logging.getLogger("lora_trainer.classimages").info("Concept requires 10 images.")
        report(Progress(job="train", message="Training", step=1, total_steps=2, loss=0.5))
        report(Progress(job="train", message="Training", step=1, total_steps=2, loss=0.5))  # the same step twice
        report(Progress(job="train", message="Training", step=2, total_steps=2, loss=0.25, samples=[sample]))
        logging.getLogger("lora_trainer.train").info("Training finished. Total lifetime steps: 2")
        return "ok"

    runner.start("train", "train 'cat'", job)
    wait_done(runner)
    state = runner.snapshot()
    assert state.losses == [(1, 0.5), (2, 0.25)]
    assert state.samples == [sample]
    assert state.progress.step == 2 and state.progress.fraction == 1.0
    assert "Concept requires 10 images." in state.log
    assert "Training finished. Total lifetime steps: 2" in state.log
    # The log handler is gone once the job ended.
    assert not any(type(h).__name__ == "_LogCollector" for h in logging.getLogger("lora_trainer").handlers)


def test_snapshots_are_copies(host):
    runner = JobRunner(host)
    runner.start("merge", "generate ckpt", lambda report, cancel: report(Progress(job="merge", message="Saving")))
    wait_done(runner)
    first = runner.snapshot()
    first.log.append("changed by the reader")
    first.progress.message = "changed"
    assert "changed by the reader" not in runner.snapshot().log
    assert runner.snapshot().progress.message == "Saving"


def test_a_rebuilt_tab_shares_the_running_job(host, models_dir):
    from lora_trainer.jobs import process_runner

    first = process_runner(host)
    release = threading.Event()
    first.start("train", "train 'cat'", lambda report, cancel: release.wait(10))
    try:
        newer_host = RecordingHost(models_dir)  # the web UI rebuilt the tab with a new host object
        again = process_runner(newer_host)
        assert again is first and again.host is host  # the running job keeps its host
        with pytest.raises(JobBusy, match="train 'cat'"):
            again.start("merge", "generate ckpt", lambda report, cancel: None)
    finally:
        release.set()
        wait_done(first)
    assert process_runner(newer_host).host is newer_host
