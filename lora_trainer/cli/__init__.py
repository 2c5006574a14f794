"""The command line. Each command lives in its own module with `add_parser` and `run`.

Errors the user can fix (LoraTrainerError) print as one line and exit 2;
anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import re
import sys
from pathlib import Path

from ..errors import LoraTrainerError

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


def command_modules() -> list[str]:
    """Every module of this package is one command, named after the module."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


class Parser(argparse.ArgumentParser):
    """argparse that reads `-1e-4` (and `-.5`, `-2`) as a value, not as an unknown option.

    argparse only knows plain negative numbers (`-2`, `-0.5`); anything with an
    exponent became an option and ended in the whole usage text instead of the
    range error the value deserves. No option of ours looks like a number.
    """

    NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER


def program_name() -> str:
    """How the user started us, for the usage line: `lora-trainer` (installed) or `python -m lora_trainer`."""
    started = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return started if started.startswith("lora-trainer") else "python -m lora_trainer"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=program_name(),
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
        return INTERRUPTED
