"""The command line. Each command lives in its own module with `add_parser` and `run`.

Errors the user can fix (LoraTrainerError) print as one line and exit 2;
anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ..errors import LoraTrainerError


def command_modules() -> list[str]:
    """Every module of this package is one command, named after the module."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer",
                                     description="Train LoRA adapters for Stable Diffusion checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules():
        importlib.import_module(f"{__name__}.{module}").add_parser(sub)
    return parser


def add_models_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default="models", metavar="DIR",
                        help="models folder laid out like the web UI's (Stable-diffusion/, Lora/, lora_trainer/); default: ./models")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.run(args) or 0
    except LoraTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: {e}; choose another name or allow overwriting", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
