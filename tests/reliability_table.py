"""docs/reliability.md is written by the tests: each fault test records what it tried and what happened.

A test takes the `reliability` fixture and calls `reliability(fault, outcome)` with what it observed (the
message the user saw, the files left). At the end of the session the rows of the tests that ran replace
their old rows (tests that did not run keep theirs), so the table never goes stale and a `-k` run does
not drop the rest of it. Under pytest-xdist the workers hand their rows to the controller, which writes.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
HEADER = """# Reliability: the faults and bad input tried, and what happened

Every row is written by the test named in it (`tests/reliability_table.py`): a test run rewrites its rows
from what the test observed, so the table says what the code does now. Do not edit it by hand.

| Fault or bad input | What happened | Test |
|---|---|---|
"""
_ROW = re.compile(r"^\| (.*) \| (.*) \| `(.*)` \|$")
_records: list[tuple[str, str, str]] = []
_ran: set[str] = set()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


@pytest.fixture
def reliability(request):
    """`reliability(fault, outcome)`: add a row to docs/reliability.md for this test."""
    test = request.node.nodeid.split("/")[-1]
    _ran.add(test.split("[")[0])  # every case of a parametrized test: a renamed case drops its old row

    def record(fault: str, outcome: str) -> None:
        _records.append((_cell(fault), _cell(outcome), test))

    return record


def _existing() -> list[tuple[str, str, str]]:
    if not DOC.is_file():
        return []
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match and match.group(1) != "Fault or bad input":
            rows.append(match.groups())
    return rows


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its controller writes the table
        session.config.workeroutput["reliability"] = {"records": _records, "ran": sorted(_ran)}
        return
    if not _ran:
        return
    kept = [row for row in _existing() if row[2].split("[")[0] not in _ran]
    rows = sorted(kept + _records, key=lambda row: (row[2].split("::")[0], row[2], row[0]))
    text = HEADER + "".join(f"| {fault} | {outcome} | `{test}` |\n" for fault, outcome, test in rows)
    DOC.write_text(text, encoding="utf-8")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: take the rows of a worker that finished."""
    output = getattr(node, "workeroutput", {}).get("reliability")
    if output:
        _records.extend(tuple(row) for row in output["records"])
        _ran.update(output["ran"])
