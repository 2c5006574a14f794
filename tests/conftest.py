"""Shared fixtures: tiny models built on the fly, and a guard against network access."""
from __future__ import annotations

import os
import socket

import pytest

pytest_plugins = ["reliability_table"]  # docs/reliability.md: written from what the fault tests observe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Under pytest-xdist (`-n N`, as .ci/run runs the suite) each worker takes its share of the cores, it and the
# processes its tests start: N workers each running torch on every core would mostly wait on one another.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)

_LOCAL = ("127.0.0.1", "::1", "localhost")
_real_connect = socket.socket.connect


class NetworkAccessError(AssertionError):
    pass


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or host in _LOCAL:
        return _real_connect(self, address)
    raise NetworkAccessError(f"test tried to reach the network: {address!r}")


# .ci/run names the environment it tests in; the slow end-to-end tests marked `one_env` run in this one only
# (each environment's suite would otherwise spend minutes repeating them). Unset, as on a developer's machine,
# every test runs.
ONE_ENV = "a1111"


def pytest_collection_modifyitems(config, items):
    where = os.environ.get("LORA_TRAINER_CI_ENV")
    if not where or where == ONE_ENV:
        return
    elsewhere = [item for item in items if item.get_closest_marker("one_env")]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if not item.get_closest_marker("one_env")]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a socket to anything but this machine."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """Path of the tiny SD 1.x checkpoint (with its .yaml) in a session folder."""
    from lora_trainer.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt-sd1"))


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory):
    from lora_trainer.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt-sd2v"), v2=True)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Path of the tiny SDXL checkpoint (with its sd_xl_base-shaped .yaml) in a session folder."""
    from lora_trainer.tiny_sdxl import write_tiny_xl_checkpoint

    return write_tiny_xl_checkpoint(tmp_path_factory.mktemp("ckpt-sdxl"))


@pytest.fixture
def models_dir(tmp_path):
    """An empty models folder laid out like the web UI's."""
    from lora_trainer.host import ModelsDir

    models = ModelsDir.at(tmp_path / "models")
    models.checkpoints.mkdir(parents=True)
    return models


def _created(tmp_path_factory, checkpoint, folder: str, name: str):
    import shutil

    from lora_trainer.checkpoint import create_model
    from lora_trainer.host import ModelsDir

    models = ModelsDir.at(tmp_path_factory.mktemp(folder))
    models.checkpoints.mkdir(parents=True)
    for p in (checkpoint, checkpoint.with_suffix(".yaml")):
        shutil.copy(p, models.checkpoints / p.name)
    create_model(models, checkpoint.name, name)
    return models


@pytest.fixture(scope="session")
def created_sd1(tmp_path_factory, tiny_sd1):
    """A working model created from the tiny SD 1.x checkpoint (shared, do not modify)."""
    return _created(tmp_path_factory, tiny_sd1, "models-sd1", "tiny")


@pytest.fixture(scope="session")
def created_xl(tmp_path_factory, tiny_sdxl):
    """A working model "xl" created from the tiny SDXL checkpoint (shared, do not modify)."""
    return _created(tmp_path_factory, tiny_sdxl, "models-sdxl", "xl")
