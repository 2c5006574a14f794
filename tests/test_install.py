"""install.py as the web UI runs it: through the host's `launch` module, with real pip, offline.

Each test builds a host from this test environment (in CI: the a1111, forge
and latest environments, each with its real pins): a virtual environment
that sees this environment's installed packages through links, except those
the test hides, and installs from a local folder of wheels rebuilt from
what is installed here, so pip runs for real and nothing reaches the network.
pip never uninstalls anything outside the new environment, so this
environment cannot be touched.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from lora_trainer.installer import canonical_name

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "launch_standin"


def top_level_entries(name: str) -> set[str]:
    """The site-packages entries (package folders, modules, .dist-info) one distribution installed."""
    dist = importlib.metadata.distribution(name)
    return {Path(f).parts[0] for f in dist.files or [] if Path(f).parts and Path(f).parts[0] != ".."}


def is_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wheel_of_installed(name: str, folder: Path) -> Path:
    """A wheel of the installed pure-Python distribution `name`, rebuilt from its installed files."""
    dist = importlib.metadata.distribution(name)
    info = next(Path(f).parts[0] for f in dist.files if Path(f).parts[0].endswith(".dist-info"))
    path = folder / f"{canonical_name(name).replace('-', '_')}-{dist.version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as wheel:
        for file in dist.files:
            parts = Path(file).parts
            if parts[0] == ".." or "__pycache__" in parts or (parts[0] == info and parts[-1] in (
                    "RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            data = Path(dist.locate_file(file)).read_bytes()
            wheel.writestr(str(file), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{file},sha256={digest},{len(data)}")
        records.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(records) + "\n")
    return path


class Host:
    """A web UI-like Python: this environment minus `hidden` (whose wheels pip finds there) and minus `absent`
    (which pip cannot find), its own site-packages, a wheel folder for pip."""

    def __init__(self, folder: Path, hidden: tuple[str, ...], *, absent: tuple[str, ...] = ()):
        self.folder = folder
        site = Path(sysconfig.get_paths()["purelib"])
        view = folder / "host-packages"
        view.mkdir(parents=True)
        hide = set().union(*(top_level_entries(n) for n in hidden + absent if is_installed(n)))
        for entry in site.iterdir():
            if entry.name not in hide and not entry.name.endswith(".pth"):
                (view / entry.name).symlink_to(entry)
        venv.create(folder / "venv", with_pip=False)
        self.python = folder / "venv" / "bin" / "python"
        own_site = next((folder / "venv" / "lib").glob("python*/site-packages"))
        (own_site / "host-packages.pth").write_text(str(view) + "\n")
        self.wheels = folder / "wheels"
        self.wheels.mkdir()
        for name in hidden:
            wheel_of_installed(name, self.wheels)
        # The extension folder as the web UI has it: install.py beside the package.
        self.extension = folder / "extensions" / "lora-trainer"
        self.extension.mkdir(parents=True)
        shutil.copy(ROOT / "install.py", self.extension / "install.py")
        (self.extension / "lora_trainer").symlink_to(ROOT / "lora_trainer")
        self.env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheels),
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
        self.env.pop("PYTHONPATH", None)
        self.env.pop("LORA_TRAINER_OPTIONAL", None)

    def run_install_py(self, **env) -> str:
        """Run install.py the way the web UI does: its folder as cwd and on PYTHONPATH (here, the stand-in's)."""
        result = subprocess.run([str(self.python), str(self.extension / "install.py")], cwd=self.folder,
                                env={**self.env, "PYTHONPATH": str(STANDIN), **env},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def freeze(self) -> set[str]:
        out = subprocess.run([str(self.python), "-m", "pip", "freeze"], env=self.env, capture_output=True,
                             text=True, check=True, timeout=120).stdout
        return {line for line in out.splitlines() if line and not line.startswith("#")}

    def python_says(self, code: str) -> str:
        return subprocess.run([str(self.python), "-c", code], cwd=self.extension, env=self.env, capture_output=True,
                              text=True, check=True, timeout=300).stdout


def names(lines: set[str]) -> set[str]:
    return {canonical_name(line.split("==")[0].split(" @ ")[0]) for line in lines}


@pytest.fixture
def host_without_diffusers(tmp_path):
    return Host(tmp_path, ("diffusers",))


def test_install_adds_what_is_missing_and_changes_no_installed_version(host_without_diffusers):
    host = host_without_diffusers
    before = host.freeze()
    assert "diffusers" not in names(before)
    out = host.run_install_py()
    after = host.freeze()
    assert before <= after, f"install.py changed installed versions: {sorted(before - after)}"
    assert names(after - before) == {"diffusers"}
    assert "LoRA Trainer: installing diffusers" in out and "diffusers is missing" in out
    version = importlib.metadata.version("transformers")
    if version.startswith("4.30."):
        assert "held to <0.32: this host has transformers 4.30" in out

    second = host.run_install_py()
    assert host.freeze() == after
    assert "installing" not in second.lower()
    assert host.python_says("import diffusers, lora_trainer.checkpoint; print(diffusers.__version__)").strip() == \
        importlib.metadata.version("diffusers")


def test_an_optional_package_that_cannot_be_installed_is_reported_and_disabled(tmp_path):
    host = Host(tmp_path, (), absent=("bitsandbytes",))  # hidden where installed, and no wheel to install
    before = host.freeze()
    assert "bitsandbytes" not in names(before)
    out = host.run_install_py(LORA_TRAINER_OPTIONAL="bitsandbytes")
    assert host.freeze() == before
    assert "LoRA Trainer: installing bitsandbytes" in out
    assert "bitsandbytes could not be installed (ERROR:" in out and "8-bit Adam is disabled" in out
    state = json.loads((host.extension / "install-state.json").read_text())
    assert "bitsandbytes" in state["failed"]

    features = json.loads(host.python_says(
        "import json, lora_trainer.checkpoint; from lora_trainer.optional import optional_features; "
        "print(json.dumps(optional_features()))"))
    assert "install.py could not install it: ERROR:" in features["bitsandbytes"]

    again = host.run_install_py(LORA_TRAINER_OPTIONAL="bitsandbytes")
    assert "installing" not in again.lower() and "bitsandbytes not retried" in again
    assert host.freeze() == before
