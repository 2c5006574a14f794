"""Print the predicted peak GPU memory of a preset on a released architecture, and how long predicting takes.

    python benchmarks/peak_prediction.py --model-type sdxl --preset "8 GB GPU (SDXL)"

Nothing is loaded or allocated: the parts are built on the meta device and run on fake tensors
(lora_trainer/training/peak.py). For each of 1 picture per step and 2 (prior preservation) it prints
the prediction and the CPU and wall seconds it took; then once more with a setting the fake run does
not read (Use 8bit Adam off), which is counted without measuring again. These are predictions, not
measurements: a GPU run is the test of them.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lora_trainer.config import TrainingParams  # noqa: E402
from lora_trainer.presets import apply_preset, preset_names  # noqa: E402
from lora_trainer.training.memory import GB  # noqa: E402
from lora_trainer.training.peak import PartConfigs, describe_peak, estimate_for_configs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="sdxl", choices=["sd1", "sd2", "sd2-v", "sdxl"])
    parser.add_argument("--preset", default="8 GB GPU (SDXL)", choices=preset_names())
    args = parser.parse_args()
    import diffusers
    import transformers

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    params = apply_preset(TrainingParams(), args.preset, cuda=True)
    configs = PartConfigs.standard(args.model_type)
    print(f"{args.model_type}, preset {args.preset!r}: resolution {params.resolution}, rank {params.rank}, "
          f"batch {params.train_batch_size}")
    for prior in (False, True):
        cpu, wall = time.process_time(), time.perf_counter()
        estimate = estimate_for_configs(configs, params, prior_preservation=prior)
        print(f"{estimate.rows} picture(s) per step: whole run {estimate.reserved / GB:.2f} GiB reserved, training "
              f"{estimate.training_reserved / GB:.2f} GiB ({describe_peak(estimate)}), filling the caches "
              f"{estimate.caching / GB:.2f} GiB allocated; "
              f"{time.process_time() - cpu:.1f} s CPU, {time.perf_counter() - wall:.1f} s wall")
    cpu, wall = time.process_time(), time.perf_counter()
    estimate_for_configs(configs, TrainingParams(**{**params.to_dict(), "use_8bit_adam": False}),
                         prior_preservation=False)
    print(f"again with Use 8bit Adam off (counted, not measured again): {time.process_time() - cpu:.2f} s CPU, "
          f"{time.perf_counter() - wall:.2f} s wall")


if __name__ == "__main__":
    main()
