"""What the create and merge benchmarks share: a full-size checkpoint, the plain-copy yardstick, the measuring.

- `full_size_checkpoint`: an original-layout SD 1.x / 2.x checkpoint with the real key set and shapes and
  seeded random weights (about 2 GB in fp16, 4 GB in fp32). The models are built on the meta device (no
  memory) only to learn the keys and shapes; each tensor is then drawn from one seeded generator and
  written as it is drawn, so building it needs one tensor of memory, and the same seed gives the same file.
- `measure`: runs a job in this process and returns its seconds and the peak memory it owned
  (RssAnon, sampled every 5 ms, above the level before it started: memory-mapped file pages the
  OS can drop are not counted) and the process's peak resident set (VmHWM, file pages included).
- `run_phase`: one phase (the copy, or the job) in a fresh child process, so that each figure is
  its own; before each, dirty pages are written out (`os.sync`) and the source file is read once,
  so the copy and the job start from the same page-cache state.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT = {"sd1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
        "sd2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")}
# The DDPM schedule buffers every ldm checkpoint carries beside the weights (kept as extras by Create Model).
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def full_size_layout(family: str, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Original key -> (dtype, shape) of a full-size checkpoint of `family` (sd1, sd2; tiny: the built-in
    tiny model, for tests), from meta-device models."""
    from lora_trainer import keymap
    from lora_trainer.architecture import shipped_config, spec_from_original_config
    from lora_trainer.tiny import tiny_original_config, tiny_text_config

    if family == "tiny":
        spec = spec_from_original_config(tiny_original_config())
        spec.text = tiny_text_config()
    else:
        spec = spec_from_original_config(shipped_config(family))
        spec.text = TEXT[family]
    layout = {}
    for build, links in ((keymap.build_unet, keymap.unet_links), (keymap.build_vae, keymap.vae_links),
                         (keymap.build_text_encoder, keymap.text_links)):
        model = build(spec)  # meta device: shapes only
        state = model.state_dict()
        for key, tensor in keymap.to_original(links(spec, model), state.__getitem__).items():
            layout[key] = (dtype if tensor.is_floating_point() else tensor.dtype, tuple(tensor.shape))
    for name in DDPM_BUFFERS:
        layout[name] = (torch.float32, (1000,))
    return layout


def full_size_checkpoint(path: Path, family: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """Write a full-size checkpoint of `family` with seeded random weights to `path`, one tensor at a time
    (the tiny one with its .yaml beside it: the web UI and Create Model need it for a non-standard config)."""
    from lora_trainer.safetensors_stream import write_safetensors
    from lora_trainer.tiny import tiny_original_config

    if family == "tiny":
        path.with_suffix(".yaml").write_text(tiny_original_config(), encoding="utf-8")
    layout = full_size_layout(family, dtype)
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for key, (kind, shape) in layout.items():
            if not kind.is_floating_point:  # position ids
                yield key, torch.arange(shape[-1], dtype=kind).expand(shape).clone()
            else:
                mean = 1.0 if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) else 0.0
                yield key, torch.empty(shape, dtype=torch.float32).normal_(mean, 0.02, generator=generator).to(kind)

    return write_safetensors(path, layout, tensors(), overwrite=True)


def memory_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class AnonPeak:
    """Samples RssAnon (memory the process owns, not file pages it maps and the OS can drop) every 5 ms."""

    def __init__(self):
        self.peak = memory_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, memory_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, memory_mb("RssAnon"))


def measure(job: Callable[[], object]) -> dict:
    """Wall seconds of `job()`, the CPU seconds of this process over it (all threads, user + system: what
    a loaded machine changes least) and of its main thread alone (the critical path where helper threads,
    such as the checkpoint's hash, have a core of their own), the peak memory it owned above the level before it (MB) and the
    process's VmHWM (MB)."""
    baseline = memory_mb("RssAnon")
    sampler = AnonPeak()
    start, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
    job()
    seconds, cpu, main = time.perf_counter() - start, time.process_time() - cpu, time.thread_time() - main
    return {"seconds": seconds, "cpu_seconds": cpu, "main_cpu_seconds": main, "owned_mb": sampler.stop() - baseline,
            "baseline_mb": baseline, "hwm_mb": memory_mb("VmHWM")}


def read_once(path: Path) -> None:
    """Read a file (or every file under a folder) once, so that it is in the page cache as it was for the last phase."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def run_phase(script: str, phase: str, args: list[str], warm: Path) -> dict:
    """Run `script --phase PHASE ARGS` in a fresh process after syncing and warming `warm`; its RESULT as a dict."""
    os.sync()
    read_once(warm)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, script, "--phase", phase, *args], capture_output=True, text=True, cwd=ROOT)
    total = time.perf_counter() - start
    figures = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not figures:
        raise RuntimeError(f"{phase} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(figures[-1].removeprefix("RESULT ")), "process_seconds": total}


def print_result(figures: dict) -> None:
    """The line a child phase prints for `run_phase`."""
    print("RESULT " + json.dumps(figures), flush=True)


def copy_file(source: Path, target: Path) -> dict:
    """The yardstick: `shutil.copyfile` of the checkpoint (measured like the job, in its own process)."""
    figures = measure(lambda: shutil.copyfile(source, target))
    target.unlink()
    return figures


def header(title: str) -> str:
    """Date, machine, load and versions: the line every figure is printed under."""
    import safetensors

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"safetensors {safetensors.__version__}"]
    for name in ("diffusers", "transformers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return (f"# {title}: {time.strftime('%Y-%m-%d %H:%M')} {cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, "
            f"load average {load}; {', '.join(versions)}")


def forget_hashes(work: Path) -> None:
    """Remove the checkpoint hashes Create Model and merges keep (models/lora_trainer), so the next job hashes."""
    (work / "lora_trainer" / "checkpoint_hashes.json").unlink(missing_ok=True)


def copy_seconds(copies: list[dict]) -> float:
    """The mean seconds of the copies measured around a job."""
    return sum(c["seconds"] for c in copies) / len(copies)


def verdict(job: dict, copies: list[dict], size_mb: float, name: str) -> list[str]:
    """The figures of one job against the mean of the copies measured around it, and the issue's targets."""
    copy = copy_seconds(copies)
    copy_cpu = sum(c["cpu_seconds"] for c in copies) / len(copies)
    main = job["main_cpu_seconds"]
    ratio = job["seconds"] / copy
    memory = job["owned_mb"] / size_mb
    return [f"{name}: {job['seconds']:.2f} s (whole process {job['process_seconds']:.1f} s) vs plain copy "
            f"{copy:.2f} s ({', '.join('%.2f' % c['seconds'] for c in copies)}) = {ratio:.2f}x the copy "
            f"[target <= 2x: {'met' if ratio <= 2 else 'MISSED'}]; CPU time {job['cpu_seconds']:.2f} s vs "
            f"{copy_cpu:.2f} s = {job['cpu_seconds'] / max(copy_cpu, 1e-9):.2f}x, main thread alone {main:.2f} s = "
            f"{main / max(copy_cpu, 1e-9):.2f}x",
            f"{name}: peak owned memory {job['owned_mb']:.0f} MB above a baseline of {job['baseline_mb']:.0f} MB = "
            f"{memory:.2f}x the {size_mb:.0f} MB file [target <= 1.3x: {'met' if memory <= 1.3 else 'MISSED'}]; "
            f"process peak RSS incl. mapped file pages {job['hwm_mb']:.0f} MB"]


def run_benchmark(title: str, workdir: Path | None, dtypes: str, bench: Callable[[Path, str], list[str]]) -> list[str]:
    """`bench(work, dtype)` for each of `dtypes` (comma-separated) in `workdir` (default: a temporary folder,
    removed after), its lines printed as they come between two headers; the lines."""
    import tempfile

    print(header(title), flush=True)
    work = workdir or Path(tempfile.mkdtemp(prefix=f"{title}-bench-"))
    lines = []
    try:
        for dtype in dtypes.split(","):
            for line in bench(work, dtype):
                print(line, flush=True)
                lines.append(line)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(header(f"{title}, end"), flush=True)
    return lines


def benchmark_arguments(description: str, phases: tuple[str, ...]):
    """The options create_memory.py and merge_memory.py share, with the hidden ones of their child phases."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the built checkpoints for the next run")
    parser.add_argument("--dtype", default="fp16,fp32", help="fp16, fp32 or both (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", choices=("copy", *phases), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    return parser
