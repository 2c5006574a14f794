"""The child side of test_kill.py: run one command on a models folder and kill -9 itself once it has
written a given number of bytes into the folders the commands write (a real SIGKILL of a real process,
in the middle of a file: no Python cleanup, no finally blocks run)."""
from __future__ import annotations

import builtins
import io
import logging
import os
import signal
from pathlib import Path

from helpers_writes import watching_copy_file_range, watching_open, write_part

COMMANDS = ("create", "classimages", "train", "merge")
CHECKPOINT = "tiny-sd1.safetensors"
PRELOAD = ["torch", "diffusers", "transformers", "accelerate", "lora_trainer.train", "lora_trainer.merge",
           "lora_trainer.checkpoint", "lora_trainer.classimages"]


def folders(root: Path) -> list[Path]:
    """Where the commands write: the models folder and the class pictures' folder."""
    return [root / "models", root / "class"]


def concept(root: Path):
    from lora_trainer.config import Concept

    return Concept(instance_data_dir=str(root / "pictures"), instance_prompt="scs thing", class_prompt="thing",
                   class_data_dir=str(root / "class"), num_class_images=3, class_infer_steps=1)


def run_command(command: str, root: str, kill_after: int | None) -> None:
    """Run `command` on `root`; with `kill_after`, SIGKILL this process at that many bytes written.
    Without it, the bytes written go to `root/bytes-<command>`. The log goes to `root/log-<command>`."""
    import torch

    torch.set_num_threads(1)
    root = Path(root)
    logging.basicConfig(filename=root / f"log-{command}", level=logging.INFO, format="%(message)s", force=True)
    written = [0]

    def before_write(file, data, size: int) -> None:
        if kill_after is not None and written[0] + size >= kill_after:
            write_part(file, data, kill_after - written[0])
            os.kill(os.getpid(), signal.SIGKILL)
        written[0] += size

    real_open, real_copy = builtins.open, os.copy_file_range
    counting_open = watching_open(real_open, folders(root), before_write)
    builtins.open = io.open = counting_open
    os.copy_file_range = watching_copy_file_range(real_copy, folders(root), before_write)
    _run(command, root)
    builtins.open, io.open, os.copy_file_range = real_open, real_open, real_copy
    if kill_after is None:
        (root / f"bytes-{command}").write_text(str(written[0]))


def _run(command: str, root: Path) -> None:
    from lora_trainer.host import ModelsDir

    models = ModelsDir.at(root / "models")
    if command == "create":
        from lora_trainer.checkpoint import create_model

        create_model(models, CHECKPOINT, "m")
    elif command == "classimages":
        from lora_trainer.classimages import generate_class_images

        generate_class_images(models, "m", [concept(root)], device="cpu")
    elif command == "train":
        from lora_trainer.config import TrainingParams
        from lora_trainer.train import train

        params = TrainingParams(max_train_steps=3, save_every_n_steps=1, resolution=32, train_batch_size=1,
                                seed=0, hflip=False)
        train(models, "m", params, [concept(root)], device="cpu")
    elif command == "merge":
        from lora_trainer.merge import merge_lora

        merge_lora(models, "m", overwrite=True)
