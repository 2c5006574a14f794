"""`train`: the "Train" button on the command line.

Every "Parameters" field is a flag named like the field (the names follow
diffusers' `train_dreambooth_lora.py`), with the UI's label and help; the
concept flags are `classimages`'s. Settings come from, in order: the defaults,
`--config FILE.json` (or the model's saved params.json), then the flags.
Ctrl-C cancels like the UI's Cancel button: what was learned and the state to
resume are saved, and the exit status is 130 (interrupted). A second Ctrl-C
while it saves changes nothing: stopping half-way through the save would lose
the run, so one and two Ctrl-C end the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ..config import PARAMS_FILE, TrainingParams, field_meta
from ..host import ModelsDir
from ..train import train
from . import INTERRUPTED, add_models_dir
from ._concepts import add_concept_args, concepts_from_args

# diffusers' default when --with_prior_preservation is given without --num_class_images.
DEFAULT_CLASS_IMAGES = 100


def add_parser(sub) -> None:
    p = sub.add_parser("train", help='"Train": train a LoRA (or fine-tune) a working model on concepts',
                       description="Train LoRA adapters DreamBooth-style on a working model and write "
                                   "DIR/Lora/NAME_STEPS.safetensors. Ctrl-C cancels and saves.")
    add_models_dir(p)
    p.add_argument("--model", required=True, metavar="NAME", help="the working model (made by create)")
    p.add_argument("--config", "--params", dest="config", metavar="FILE.json",
                   help="training parameters as JSON (ours or the dreambooth extension's db_config.json); "
                        f"default: the model folder's {PARAMS_FILE}")
    add_concept_args(p)
    p.add_argument("--concepts", dest="concepts_list", metavar="FILE.json", help="same as --concepts_list")
    p.add_argument("--with_prior_preservation", action="store_true",
                   help=f"use class pictures (with --num_class_images, default {DEFAULT_CLASS_IMAGES})")
    add_param_args(p)
    p.add_argument("--device", default=None, help="torch device, cuda or cpu; default: cuda when available")
    p.set_defaults(run=run)


def add_param_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainingParams field, from its metadata; booleans also get --no-<flag>."""
    group = parser.add_argument_group("training parameters (the Parameters tab)")
    defaults = TrainingParams()
    for f in dataclasses.fields(TrainingParams):
        meta = field_meta(TrainingParams, f.name)
        flag = meta["cli"] or f"--{f.name}"
        default = getattr(defaults, f.name)
        help_text = f'"{meta["label"]}": {meta["help"]} (default: {default})'.replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=type(default), default=None, choices=meta["choices"],
                               metavar=None if meta["choices"] else type(default).__name__.upper(), help=help_text)


def params_from_args(args: argparse.Namespace, model_dir: Path) -> TrainingParams:
    """Defaults, then the JSON file (or the model's saved parameters), then the flags given.

    Raises ConfigError for a bad file or value.
    """
    source = Path(args.config) if args.config else model_dir / PARAMS_FILE
    base = TrainingParams.load(source).to_dict() if args.config or source.is_file() else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingParams)
             if getattr(args, f.name, None) is not None}
    return TrainingParams.from_dict({**base, **given}, source="command line")


def run(args) -> int:
    models = ModelsDir.at(args.models_dir)
    model_dir = models.existing_model_dir(args.model)
    concepts = concepts_from_args(args, model_dir)
    if args.with_prior_preservation and args.num_class_images is None and not args.concepts_list \
            and not concepts[0].with_prior_preservation:
        concepts[0] = dataclasses.replace(concepts[0], num_class_images=DEFAULT_CLASS_IMAGES)
    params = params_from_args(args, model_dir)
    with cancel_on_ctrl_c() as cancel:
        result = train(models, args.model, params, concepts, cancel=cancel, device=args.device)
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun: one process prints
        return 0
    print(result.lora_path if result.lora_path is not None else model_dir)
    if result.cancelled:
        print("Training cancelled; what was learned is saved", file=sys.stderr)
        return INTERRUPTED
    return 0


@contextmanager
def cancel_on_ctrl_c():
    """Ctrl-C sets the cancel flag: training saves and stops. Further presses only say that it is saving."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if cancel.is_set():
            print("\nStill cancelling: saving what was learned, then stopping", file=sys.stderr)
            return
        print("\nCancelling: saving the LoRA and the state to resume", file=sys.stderr)
        cancel.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)
