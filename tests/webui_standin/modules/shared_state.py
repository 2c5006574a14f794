"""Stand-in of modules/shared_state.py (v1.10.1): the State the Interrupt button sets."""
import time

import webui_standin_calls


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    time_start = None

    def __init__(self):
        self.server_start = time.time()

    def skip(self):
        self.skipped = True

    def interrupt(self):
        self.interrupted = True
        webui_standin_calls.record("state.interrupt")

    def begin(self, job: str = "(unknown)"):
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = job
        webui_standin_calls.record("state.begin", job)

    def end(self):
        self.job = ""
        self.job_count = 0
        webui_standin_calls.record("state.end")
