"""The installable package: `pip install .` gives a `lora-trainer` command that works from any folder.

A real wheel is built from a copy of the sources (offline, with the setuptools that torch requires anyway)
and installed into a scratch virtual environment that sees this environment's packages; the command then
runs from a folder that holds no sources.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "requirements.txt", "style.css", "javascript", "lora_trainer"]


def run(*command, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_pip_install_gives_a_lora_trainer_command_that_works_from_any_folder(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-w", tmp_path / "dist", source, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("lora_trainer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"lora_trainer/{p.relative_to(ROOT / 'lora_trainer').as_posix()}"
               for p in (ROOT / "lora_trainer").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped <= names, shipped - names  # every module and the configs/*.yaml
    assert {"lora_trainer/web/style.css", "lora_trainer/web/javascript/lora_trainer.js"} <= names
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert [line[len("Requires-Dist: "):] for line in metadata.splitlines()
            if line.startswith("Requires-Dist: ")] == requirements  # torch: the host's own, never installed by us

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    # The scratch environment sees this one's packages (torch, diffusers, ...) but not the sources.
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    (site / "this_env.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel,
                    cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import lora_trainer.cli.ui as ui; print(ui.__file__); print(ui.STYLE_FILE.is_file(), "
                "ui.SCRIPTS_DIR.is_dir())", cwd=elsewhere)
    assert where.stdout.split() == [str(site / "lora_trainer" / "cli" / "ui.py"), "True", "True"], where.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = run(venv / "bin" / "lora-trainer", "ui", "--port", port, cwd=elsewhere)
    assert command.returncode == 2, command.stderr
    assert command.stderr.strip() == (f"error: port {port} on 127.0.0.1: in use by another program (the web UI?); "
                                      f"choose another with --port, e.g. --port {port + 1}")
