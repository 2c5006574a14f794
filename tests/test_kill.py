"""kill -9 at 20 moments spread over Create Model, class pictures, Train and Generate Ckpt: no partial file
under a final name, what the killed process left is cleaned (or put back) by the next command with a line,
and the next command works. The children fork from a server that imported torch and the package once."""
from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import signal
from pathlib import Path

import helpers_kill
import pytest
from helpers_train import instance_pictures
from PIL import Image
from safetensors import safe_open

from lora_trainer.config import ModelInfo

# Where in each command's writing (as a fraction of the bytes it writes) the process is killed.
MOMENTS = {"create": (0.001, 0.3, 0.7, 0.95), "classimages": (0.01, 0.4, 0.9),
           "train": (0.001, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.99), "merge": (0.01, 0.3, 0.55, 0.8, 0.99)}
# Commands that keep what they finished (class pictures one by one, training at each save): each kill
# starts from the state before the command, so that every moment is reached.
INCREMENTAL = ("classimages", "train")
LEFTOVER = re.compile(r"^\..+\.(\d+\.[^.]+\.tmp|old-\d+)$")


@pytest.fixture(scope="module")
def children():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(helpers_kill.PRELOAD)

    def run(command: str, root: Path, kill_after: int | None) -> int:
        process = context.Process(target=helpers_kill.run_command, args=(command, str(root), kill_after))
        process.start()
        process.join(300)
        assert process.exitcode is not None, f"{command} did not end"
        return process.exitcode

    return run


def check_final_names(root: Path) -> int:
    """Every file under a final (not hidden) name is whole: safetensors read to the last tensor, JSON
    parses, pictures decode. Returns how many were checked."""
    checked = 0
    for folder in helpers_kill.folders(root):
        for path in folder.rglob("*"):
            if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
                continue
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            checked += 1
    return checked


def leftovers(root: Path) -> list[str]:
    """Temporaries and folders moved aside (not those inside them)."""
    found = [p for folder in helpers_kill.folders(root) for p in folder.rglob(".*") if LEFTOVER.match(p.name)]
    return [str(p.relative_to(root)) for p in found if not any(q in p.parents for q in found)]


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))


@pytest.mark.one_env
def test_kill_9_at_20_moments(created_sd1, tiny_sd1, tmp_path, children, reliability):
    root = tmp_path / "root"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    for path in (tiny_sd1, tiny_sd1.with_suffix(".yaml")):
        shutil.copy(path, root / "models" / "Stable-diffusion" / path.name)
    instance_pictures(root / "pictures")
    killed, rows = 0, []
    for command in helpers_kill.COMMANDS:
        if command == "create":  # what Create Model writes: the files of a created model (no measuring run)
            total = sum(p.stat().st_size for p in created_sd1.model_dir("tiny").rglob("*") if p.is_file())
        else:
            measure = tmp_path / f"measure-{command}"
            shutil.copytree(root, measure)
            assert children(command, measure, None) == 0, (measure / f"log-{command}").read_text()
            total = int((measure / f"bytes-{command}").read_text())
            shutil.rmtree(measure)
        before = tmp_path / f"before-{command}"
        shutil.copytree(root, before)
        left = set()
        for fraction in MOMENTS[command]:
            if command in INCREMENTAL:  # it keeps what it finished: start each kill from the same state,
                stash = tmp_path / "stash"  # with what the last kill left
                for name in leftovers(root):
                    _move(root / name, stash / name)
                shutil.rmtree(root)
                shutil.copytree(before, root)
                for name in leftovers(stash) if stash.exists() else []:
                    _move(stash / name, root / name)
                shutil.rmtree(stash, ignore_errors=True)
            code = children(command, root, max(1, int(total * fraction)))
            assert code == -signal.SIGKILL, (command, fraction, code)
            killed += 1
            check_final_names(root)
            left |= set(leftovers(root))
        shutil.rmtree(before)
        assert children(command, root, None) == 0, (root / f"log-{command}").read_text()
        log = (root / f"log-{command}").read_text()
        assert check_final_names(root) > 0 and leftovers(root) == [], (command, leftovers(root))
        lines = [line for line in log.splitlines() if line.startswith(("Removed the", "Put ", "Taking over"))]
        if left:
            assert lines, (command, left, log)
        rows.append((command, total, len(MOMENTS[command]), sorted(left), lines))
    assert killed >= 20
    info = ModelInfo.load(root / "models" / "lora_trainer" / "m" / "model_info.json")
    assert info.lifetime_steps >= 3 and (root / "models" / "Lora" / info.latest_lora).is_file()
    assert list((root / "models" / "Stable-diffusion").glob("m_*_lora.safetensors"))
    for command, total, count, left, lines in rows:
        shown = "; ".join(sorted({re.sub(r"\.\d+\.[a-z0-9_]{8}\.tmp", ".PID.XXXXXXXX.tmp",
                                         re.sub(r"process \d+", "process PID", line.replace(str(root), "...")))
                                  for line in lines})) or "nothing to clean"
        reliability(f"kill -9 during `{command}` at {count} moments (of its {total} bytes written)",
                    f"no partial file under a final name; the next `{command}` completed; it said: {shown}")
