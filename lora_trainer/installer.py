"""What `install.py` installs into the host's Python, decided from what the host already has.

The rule that matters most: never change the version of anything installed.
Every pip run gets a constraints file that holds each installed distribution at
its current version, so pip may only add packages; a requirement the host
already meets is not touched, and one it meets with a version outside our
range is reported (the host check then says what is needed), never "fixed".

Which diffusers fits is decided by the host's versions: pip's resolver, held
by the constraints file, skips releases whose metadata asks for newer
safetensors / huggingface-hub than the host has (diffusers >= 0.38 needs
safetensors >= 0.8); what metadata cannot say is in `IMPORT_LIMITS` (measured:
diffusers 0.32 .. 0.37.1 install beside transformers 4.30.2 but fail to import
`StableDiffusionPipeline`).

Optional packages (bitsandbytes, xformers) are tried only where they can
work (a CUDA build of torch), or when named in LORA_TRAINER_OPTIONAL; a
failure leaves the extension working with that option disabled, and is
remembered in `install-state.json` beside install.py so that the next launch
does not try again with the same torch (delete the file to retry).

This module imports nothing heavy (no torch): it runs at every web UI launch.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - every host has packaging, at worst pip's copy
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import InvalidVersion, Version

OPTIONAL_ENV = "LORA_TRAINER_OPTIONAL"
STATE_FILE = "install-state.json"


@dataclass(frozen=True)
class Need:
    """One package the extension uses: pip's name, the range we accept, its import name and what it is for."""

    name: str
    spec: str
    module: str
    purpose: str
    optional: bool = False
    no_deps: bool = False
    needs_cuda: bool = True   # optional ones: tried by default only beside a CUDA build of torch

    @property
    def requirement(self) -> str:
        return self.name + self.spec


# The ranges every supported host accepts (requirements.txt says the same; a test keeps them equal).
REQUIRED = (
    Need("diffusers", ">=0.31.0", "diffusers", "models, schedulers and pipelines"),
    Need("transformers", ">=4.30.2", "transformers", "the CLIP text encoder"),
    Need("accelerate", ">=0.21.0", "accelerate", "loading models without a second copy in memory"),
    Need("safetensors", ">=0.4.2", "safetensors", "reading and writing weights"),
    Need("Pillow", ">=9.5.0", "PIL", "pictures"),
    Need("numpy", ">=1.26", "numpy", "arrays"),
    Need("PyYAML", ">=6.0", "yaml", "checkpoint .yaml configs"),
    Need("tqdm", ">=4.64", "tqdm", "progress on the command line"),
    # Only its CLIP vocabulary file is read; its dependencies would pull a CUDA torchvision.
    Need("open-clip-torch", "", "open_clip", "the CLIP tokenizer's vocabulary", no_deps=True),
)
OPTIONAL = (
    Need("bitsandbytes", ">=0.43", "bitsandbytes", "8-bit Adam", optional=True),
    Need("xformers", "", "xformers", "memory-efficient attention", optional=True),
    # Pure Python on top of torch: it fits every host, the CPU included.
    Need("prodigyopt", ">=1.0", "prodigyopt", "the Prodigy optimizer", optional=True, needs_cuda=False),
)


@dataclass(frozen=True)
class ImportLimit:
    """A range of `package` that installs but does not work beside some versions of another package."""

    package: str
    works: str
    when: str
    when_spec: str
    why: str


IMPORT_LIMITS = (
    ImportLimit("diffusers", "<0.32", "transformers", "<4.31",
                "diffusers 0.32 to 0.37.1 cannot import StableDiffusionPipeline beside transformers 4.30"),
)


@dataclass(frozen=True)
class Step:
    """One decision about one package: install it (`requirement` set) or leave it, and why."""

    need: Need
    requirement: str | None
    reason: str

    @property
    def installs(self) -> bool:
        return self.requirement is not None


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Canonical distribution name -> version of everything importable, first on sys.path wins."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        try:
            name, version = dist.metadata["Name"], dist.version
        except Exception:  # a broken .dist-info folder (no METADATA) is not a package pip can see either
            continue
        if name and version:
            found.setdefault(canonical_name(name), version)
    return found


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def satisfies(version: str, spec: str) -> bool:
    """Whether `version` is in the range `spec` (pre-releases count as in range)."""
    parsed = _version(version)
    return parsed is not None and SpecifierSet(spec).contains(parsed, prereleases=True)


def applying_limits(need: Need, installed: Mapping[str, str]) -> list[ImportLimit]:
    """The import limits on `need` that the host's installed versions bring into force."""
    return [limit for limit in IMPORT_LIMITS if canonical_name(limit.package) == canonical_name(need.name)
            and satisfies(installed.get(canonical_name(limit.when), ""), limit.when_spec)]


def install_range(need: Need, installed: Mapping[str, str]) -> str:
    """The requirement to hand pip for `need`: our range narrowed by what the host's versions allow."""
    spec = SpecifierSet(need.spec)
    for limit in applying_limits(need, installed):
        spec &= SpecifierSet(limit.works)
    return need.name + str(spec) if str(spec) else need.name


def cuda_torch_version(installed: Mapping[str, str], torch_dir: Path | None = None) -> str | None:
    """The CUDA version torch was built for ("12.1"), None for a CPU build, read without importing torch."""
    if "torch" not in installed:
        return None
    if torch_dir is None:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        torch_dir = Path(next(iter(spec.submodule_search_locations)))
    try:
        text = (torch_dir / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return match.group(1) if match else None


def optional_wanted(setting: str, cuda: str | None) -> tuple[set[str], str]:
    """Which optional packages to try, and why the others are not: LORA_TRAINER_OPTIONAL is "auto", "none" or names."""
    setting = (setting or "auto").strip().lower()
    names = {canonical_name(n.name) for n in OPTIONAL}
    if setting == "auto":
        if cuda:
            return names, f"torch is built for CUDA {cuda}"
        anywhere = {canonical_name(n.name) for n in OPTIONAL if not n.needs_cuda}
        return anywhere, "torch is not a CUDA build and it needs an NVIDIA GPU; " + OPTIONAL_ENV + "={name} tries anyway"
    if setting == "none":
        return set(), f"{OPTIONAL_ENV}=none"
    wanted = {canonical_name(n) for n in setting.split(",") if n.strip()}
    return wanted & names, f"not named in {OPTIONAL_ENV}"


def plan(installed: Mapping[str, str], *, is_installed: Callable[[str], bool], optional_setting: str = "auto",
         cuda: str | None = None, failed_before: Mapping[str, dict] | None = None) -> list[Step]:
    """What to do about each package, from the host's `installed` versions. Pure: installs nothing.

    `is_installed` is the host's own test (`launch.is_installed`, by import name);
    `failed_before` holds optional packages whose install failed with the same torch.
    """
    failed_before = failed_before or {}
    wanted, why_optional = optional_wanted(optional_setting, cuda)
    steps = []
    for need in REQUIRED + OPTIONAL:
        key = canonical_name(need.name)
        version = installed.get(key)
        if version is not None or is_installed(need.module):
            if version is None or not need.spec or satisfies(version, need.spec):
                steps.append(Step(need, None, f"{need.name} {version or ''} is installed".replace("  ", " ")))
            else:
                steps.append(Step(need, None, f"{need.name} {version} is installed but {need.requirement} is needed; "
                                              "left as it is: the host's version is never changed"))
        elif need.optional and key not in wanted:
            steps.append(Step(need, None, f"{need.name} not installed: {need.purpose} is disabled "
                                          f"({why_optional.format(name=need.name)})"))
        elif need.optional and key in failed_before:
            reason = failed_before[key].get("reason", "pip failed")
            steps.append(Step(need, None, f"{need.name} not retried: it failed with this torch before ({reason}); "
                                          f"delete {STATE_FILE} to retry"))
        else:
            why = f"{need.name} is missing ({need.purpose})"
            for limit in applying_limits(need, installed):
                why += f"; held to {limit.works}: this host has {limit.when} {installed[canonical_name(limit.when)]} " \
                       f"and {limit.why}"
            steps.append(Step(need, install_range(need, installed), why))
    return steps


def constraints_text(installed: Mapping[str, str]) -> str:
    """A pip constraints file holding every installed distribution at its version."""
    lines = [f"{name}=={version}" for name, version in sorted(installed.items()) if _version(version) is not None]
    return "# Written by LoRA Trainer's install.py: pip may add packages, never change these.\n" + "\n".join(lines) + "\n"


def pip_command(step: Step, constraints: Path) -> str:
    """The argument of `launch.run_pip` for a step (the host adds `python -m pip` and `--prefer-binary`)."""
    no_deps = " --no-deps" if step.need.no_deps else ""
    return f'install "{step.requirement}"{no_deps} -c "{constraints}"'


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith("WARNING")]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [type(error).__name__])[-1][:300]


class InstallState:
    """Optional packages that failed to install, by the torch version they failed with (install-state.json)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}

    def failed_with(self, torch_version: str | None) -> dict[str, dict]:
        return {name: entry for name, entry in self.data.get("failed", {}).items() if entry.get("torch") == torch_version}

    def record_failure(self, name: str, torch_version: str | None, reason: str) -> None:
        self.data.setdefault("failed", {})[name] = {"torch": torch_version, "reason": reason}
        self._save()

    def forget(self, name: str) -> None:
        if self.data.get("failed", {}).pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:  # a read-only extension folder: the failure is simply retried next launch
            pass


def run(launch, state_path: Path, *, environ: Mapping[str, str] = os.environ,
        say: Callable[[str], None] = print) -> list[Step]:
    """Install what is missing through the host's `launch.is_installed` / `launch.run_pip`; say what and why.

    A required package that fails to install raises the host's error (the
    extension then refuses to load, saying what is needed); an optional one
    is reported and remembered. Returns the steps taken.
    """
    installed = installed_versions()
    state = InstallState(state_path)
    torch_version = installed.get("torch")
    steps = plan(installed, is_installed=launch.is_installed, optional_setting=environ.get(OPTIONAL_ENV, "auto"),
                 cuda=cuda_torch_version(installed), failed_before=state.failed_with(torch_version))
    todo = [s for s in steps if s.installs]
    for step in steps:
        if not step.installs and (step.need.optional or "never changed" in step.reason):
            say(f"LoRA Trainer: {step.reason}")
    if not todo:
        return steps
    with tempfile.TemporaryDirectory(prefix="lora-trainer-install-") as folder:
        constraints = Path(folder, "constraints.txt")
        for step in todo:
            # Written anew before each step: what an earlier step added is held too.
            constraints.write_text(constraints_text(installed_versions()), encoding="utf-8")
            say(f"LoRA Trainer: installing {step.requirement}: {step.reason}")
            try:
                launch.run_pip(pip_command(step, constraints), f"{step.requirement} for LoRA Trainer")
            except Exception as error:  # the host raises RuntimeError with pip's output
                if not step.need.optional:
                    raise
                reason = _last_line(error)
                state.record_failure(canonical_name(step.need.name), torch_version, reason)
                say(f"LoRA Trainer: {step.need.name} could not be installed ({reason}): "
                    f"{step.need.purpose} is disabled; everything else works")
            else:
                state.forget(canonical_name(step.need.name))
    return steps

