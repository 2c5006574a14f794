"""Version differences: CLIP key layouts, the install plan, the host check and the optional features."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from lora_trainer import compat, hostcheck, installer, optional

ROOT = Path(__file__).resolve().parent.parent

A1111 = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "accelerate": "0.21.0", "safetensors": "0.4.2",
         "pillow": "9.5.0", "numpy": "1.26.2", "pyyaml": "6.0.1", "tqdm": "4.66.1", "open-clip-torch": "2.20.0",
         "gradio": "3.41.2", "huggingface-hub": "0.20.3"}
FORGE = {**A1111, "torch": "2.3.1+cu121", "transformers": "4.46.1", "accelerate": "0.31.0", "diffusers": "0.31.0",
         "huggingface-hub": "0.26.2", "gradio": "4.40.0"}


def by_name(steps):
    return {installer.canonical_name(s.need.name): s for s in steps}


def plan_for(installed, **kw):
    """The plan for a host whose importable modules are exactly its installed distributions."""
    return by_name(installer.plan(installed, is_installed=lambda module: False, **kw))


# --- CLIP key layouts -------------------------------------------------------------------------------

def tiny_clip():
    config = transformers.CLIPTextConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, max_position_embeddings=8)
    return transformers.CLIPTextModel(config)


def test_installed_layout_matches_the_transformers_major_version():
    expected = Version(transformers.__version__).major < 5
    assert compat.clip_has_text_model_level() is expected
    assert any(k.startswith("text_model.") for k in tiny_clip().state_dict()) is expected


@pytest.mark.parametrize("name", ["text_model.encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.weight",
                                  "text_model.final_layer_norm.bias", "embeddings.token_embedding.weight"])
def test_both_layouts_map_to_the_canonical_name_and_back(name):
    canonical = compat.canonical_clip_name(name)
    assert canonical.startswith("text_model.") and canonical.count("text_model.") == 1
    assert canonical.endswith(name.removeprefix("text_model."))
    installed = compat.installed_clip_name(canonical)
    assert installed == (canonical if compat.clip_has_text_model_level() else canonical.removeprefix("text_model."))
    assert compat.installed_clip_name(installed) == installed


def test_canonical_weights_load_into_the_installed_model():
    source, target = tiny_clip(), tiny_clip()
    canonical = {compat.canonical_clip_name(k): v for k, v in source.state_dict().items()}
    assert all(k.startswith("text_model.") for k in canonical)
    missing, unexpected = target.load_state_dict({compat.installed_clip_name(k): v for k, v in canonical.items()},
                                                 strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


# --- the install plan ---------------------------------------------------------------------------------

def test_a1111_gets_the_newest_diffusers_that_imports_beside_transformers_4_30():
    steps = plan_for(A1111)
    assert steps["diffusers"].requirement == "diffusers<0.32,>=0.31.0"
    assert "held to <0.32: this host has transformers 4.30.2" in steps["diffusers"].reason
    # prodigyopt is pure Python: the one optional package every host gets (Prodigy, "Adaptive" preset).
    assert [name for name, s in steps.items() if s.installs] == ["diffusers", "prodigyopt"]


def test_forge_has_everything_but_the_prodigy_optimizer():
    assert [name for name, s in plan_for(FORGE).items() if s.installs] == ["prodigyopt"]


def test_a_host_with_newer_transformers_gets_the_plain_range():
    host = {k: v for k, v in FORGE.items() if k != "diffusers"}
    assert plan_for(host)["diffusers"].requirement == "diffusers>=0.31.0"


def test_an_installed_version_outside_the_range_is_left_alone_and_said():
    step = plan_for({**FORGE, "accelerate": "0.18.0"})["accelerate"]
    assert not step.installs
    assert "0.18.0" in step.reason and "accelerate>=0.21.0" in step.reason and "never changed" in step.reason


def test_the_hosts_is_installed_counts_even_without_a_distribution():
    host = {k: v for k, v in FORGE.items() if k != "open-clip-torch"}
    steps = installer.plan(host, is_installed=lambda module: module == "open_clip")
    assert not by_name(steps)["open-clip-torch"].installs


def test_open_clip_is_added_without_its_dependencies():
    step = plan_for({k: v for k, v in FORGE.items() if k != "open-clip-torch"})["open-clip-torch"]
    assert step.installs and step.need.no_deps
    assert "--no-deps" in installer.pip_command(step, Path("c.txt"))


def test_torch_is_never_installed():
    steps = plan_for({k: v for k, v in FORGE.items() if k != "torch"})
    assert "torch" not in steps and not any("torch" == s.need.name for s in steps.values())


@pytest.mark.parametrize("setting, cuda, expected", [
    ("auto", None, set()),
    ("auto", "12.1", {"bitsandbytes", "xformers"}),
    ("none", "12.1", set()),
    ("bitsandbytes", None, {"bitsandbytes"}),
    ("xformers, unknown", None, {"xformers"}),
])
def test_which_optional_packages_are_tried(setting, cuda, expected):
    steps = plan_for(FORGE, optional_setting=setting, cuda=cuda)
    assert {n for n in ("bitsandbytes", "xformers") if steps[n].installs} == expected
    for name in {"bitsandbytes", "xformers"} - expected:
        assert "disabled" in steps[name].reason


def test_an_optional_package_that_failed_with_this_torch_is_not_retried():
    failed = {"bitsandbytes": {"torch": "2.3.1+cu121", "reason": "ERROR: no wheel"}}
    steps = plan_for(FORGE, cuda="12.1", failed_before=failed)
    assert not steps["bitsandbytes"].installs and "ERROR: no wheel" in steps["bitsandbytes"].reason
    assert steps["xformers"].installs


def test_install_state_remembers_failures_by_torch_version(tmp_path):
    path = tmp_path / installer.STATE_FILE
    installer.InstallState(path).record_failure("bitsandbytes", "2.1.2", "ERROR: nope")
    state = installer.InstallState(path)
    assert state.failed_with("2.1.2") == {"bitsandbytes": {"torch": "2.1.2", "reason": "ERROR: nope"}}
    assert state.failed_with("2.3.1") == {}
    state.forget("bitsandbytes")
    assert json.loads(path.read_text()) == {"failed": {}}


def test_constraints_hold_every_installed_version():
    text = installer.constraints_text({"torch": "2.1.2+cu121", "gradio": "3.41.2", "odd": "not a version"})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["gradio==3.41.2", "torch==2.1.2+cu121"]


def test_cuda_version_is_read_from_torchs_version_file(tmp_path):
    (tmp_path / "version.py").write_text("__version__ = '2.1.2+cu121'\ncuda: Optional[str] = '12.1'\n")
    assert installer.cuda_torch_version({"torch": "2.1.2"}, tmp_path) == "12.1"
    (tmp_path / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert installer.cuda_torch_version({"torch": "2.13.0"}, tmp_path) is None
    assert installer.cuda_torch_version({}, tmp_path) is None


def test_requirements_txt_states_the_installers_ranges():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    ranged = [need.requirement for need in installer.REQUIRED if need.spec]
    assert [line for line in lines if not line.startswith("gradio")] == ranged
    assert "gradio>=3.41.2" in lines


# --- the host check -------------------------------------------------------------------------------------

def test_this_environment_is_a_supported_host():
    assert hostcheck.unsupported_host_reason() is None


def test_supported_hosts_pass():
    assert hostcheck.unsupported_host_reason({**A1111, "diffusers": "0.31.0"}, (3, 10)) is None
    assert hostcheck.unsupported_host_reason(FORGE, (3, 11)) is None


def test_one_message_names_everything_that_is_needed():
    host = {**A1111, "torch": "1.13.1", "accelerate": "0.18.0"}
    message = hostcheck.unsupported_host_reason(host, (3, 9))
    assert message.startswith("LoRA Trainer is not loaded: it needs ")
    for part in ("Python >= 3.10 (found 3.9)", "torch>=2.1 (found 1.13.1)", "diffusers>=0.31.0 (not installed)",
                 "accelerate>=0.21.0 (found 0.18.0)", "install.py", "docs/hosts.md"):
        assert part in message
    assert "\n" not in message


def test_a_diffusers_that_cannot_import_beside_old_transformers_is_named():
    message = hostcheck.unsupported_host_reason({**A1111, "diffusers": "0.35.0"}, (3, 10))
    assert "diffusers<0.32 beside transformers 4.30.2 (found 0.35.0" in message


# --- optional features ------------------------------------------------------------------------------------

@pytest.fixture
def fresh_features(monkeypatch, tmp_path):
    monkeypatch.setattr(optional, "STATE_PATH", tmp_path / installer.STATE_FILE)
    optional.optional_features.cache_clear()
    yield tmp_path / installer.STATE_FILE
    optional.optional_features.cache_clear()


def test_optional_features_say_usable_or_why_not(fresh_features):
    features = optional.optional_features()
    assert set(features) == {"cuda", "bitsandbytes", "xformers", "prodigyopt"}
    assert (features["cuda"] is None) == torch.cuda.is_available()
    # prodigyopt is pure Python: usable exactly where it is installed (install.py adds it on every host).
    import importlib.util
    assert (features["prodigyopt"] is None) == (importlib.util.find_spec("prodigyopt") is not None), features["prodigyopt"]
    for name in ("bitsandbytes", "xformers"):
        reason = features[name]
        assert reason is None or (isinstance(reason, str) and reason)
        if not torch.cuda.is_available():  # only bitsandbytes >= 0.50 runs on the CPU
            assert (reason is None) == (name == "bitsandbytes" and optional.bitsandbytes_runs_on_cpu()), reason


def test_an_install_failure_is_the_reason_shown(fresh_features, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # bitsandbytes as on a host where install.py could not install it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    installer.InstallState(fresh_features).record_failure("bitsandbytes", torch.__version__, "ERROR: no wheel for this")
    reason = optional.optional_features()["bitsandbytes"]
    assert "not installed" in reason and "install.py could not install it: ERROR: no wheel for this" in reason


def test_the_installer_and_the_host_check_import_nothing_heavy():
    """They run at every web UI launch, before the host has loaded torch."""
    import subprocess
    import sys

    code = ("import sys, lora_trainer.installer, lora_trainer.hostcheck; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
