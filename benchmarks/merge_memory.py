"""Peak memory and time of "Generate Ckpt" against the size of the checkpoint.

Builds a mid-sized random SD 1.x-shaped checkpoint (real CLIP-L text width,
a narrower UNet), creates a working model and a rank-16 LoRA over every
Linear of it, then merges in a fresh process each time (into the model's own
weights, and into the checkpoint file) and prints the seconds taken and the
peak memory the process owns (RssAnon, sampled; memory-mapped file pages the
OS can drop are not counted) above its baseline, as a multiple of the
checkpoint's size. Run: `python benchmarks/merge_memory.py [--channels 96]`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def build(root: Path, channels: int) -> None:
    import torch
    import yaml
    from safetensors.torch import save_file

    from lora_trainer import keymap
    from lora_trainer.architecture import spec_from_original_config
    from lora_trainer.checkpoint import create_model
    from lora_trainer.checkpoint_io import save_checkpoint
    from lora_trainer.host import ModelsDir
    from lora_trainer.tiny import tiny_original_config

    config = yaml.safe_load(tiny_original_config())
    unet = config["model"]["params"]["unet_config"]["params"]
    unet.update(model_channels=channels, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1],
                num_heads=8, context_dim=768)
    text = yaml.safe_dump(config, sort_keys=False)
    spec = spec_from_original_config(text)
    spec.text = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
    models = ModelsDir.at(root)
    models.checkpoints.mkdir(parents=True)
    tensors, lora = {}, {}
    for build_part, links, prefix in ((keymap.build_unet, keymap.unet_links, "lora_unet"), (keymap.build_vae, keymap.vae_links, None),
                                      (keymap.build_text_encoder, keymap.text_links, "lora_te")):
        model = build_part(spec, device="cpu")
        weights = {k: (torch.randn(v.shape) * 0.02 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        tensors.update(keymap.to_original(links(spec, model), weights.__getitem__))
        for name, module in model.named_modules() if prefix else ():
            if isinstance(module, torch.nn.Linear):
                key = f"{prefix}_{('text_model.' + name if prefix == 'lora_te' and not name.startswith('text_model.') else name).replace('.', '_')}"
                lora[f"{key}.lora_down.weight"] = torch.randn(16, module.in_features) * 0.01
                lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 16) * 0.01
                lora[f"{key}.alpha"] = torch.tensor(8.0)
    (models.checkpoints / "mid.yaml").write_text(text)
    save_checkpoint(tensors, models.checkpoints / "mid.safetensors")
    models.lora.mkdir()
    save_file(lora, str(models.lora / "mid_0.safetensors"))
    create_model(models, "mid.safetensors", "mid")


def merge(root: Path, into: bool) -> None:
    from lora_trainer.host import ModelsDir
    from lora_trainer.merge import merge_lora

    baseline = memory_mb("RssAnon")
    sampler = AnonPeak()
    start = time.perf_counter()
    out = merge_lora(ModelsDir.at(root), "mid", into="mid" if into else None, custom_name="into" if into else "own")
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    size = out.stat().st_size / 2**20
    print(f"{'into checkpoint' if into else 'into the model':16s} checkpoint {size:5.0f} MB  {seconds:5.1f} s  "
          f"peak owned memory {peak - baseline:5.0f} MB above the baseline = {(peak - baseline) / size:.2f} x the checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=96, help="UNet base channels (SD 1.x has 320)")
    parser.add_argument("--phase", choices=["all", "own", "into"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase != "all":
        merge(Path(args.root), into=args.phase == "into")
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.channels)
        for phase in ("own", "into"):
            subprocess.run([sys.executable, __file__, "--phase", phase, "--root", tmp], check=True,
                           stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
