"""Concept flags shared by the commands that take concepts (`classimages`, and `train` may use them).

Flags are named like diffusers' `train_dreambooth_lora.py` where the meaning is
the same; their help text is the field help of `Concept`, so the command line
and the UI say the same thing. A leading underscore keeps this module out of
the command list.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import CONCEPTS_FILE, Concept, field_meta, load_concepts
from ..errors import ConfigError

# Concept fields settable one by one on the command line (one concept).
CONCEPT_FLAGS = ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt", "instance_token",
                 "class_token", "num_class_images", "num_class_images_per_image", "class_negative_prompt",
                 "class_guidance_scale", "class_infer_steps")


def add_concept_args(parser: argparse.ArgumentParser) -> None:
    """--concepts_list FILE.json, or one concept from --instance_data_dir, --class_prompt, ..."""
    parser.add_argument("--concepts_list", metavar="FILE.json",
                        help="concepts as JSON (ours or the dreambooth extension's concepts_list.json); "
                             "default: the flags below, else the model folder's concepts_list.json")
    defaults = Concept()
    for name in CONCEPT_FLAGS:
        meta = field_meta(Concept, name)
        kind = type(getattr(defaults, name))
        parser.add_argument(f"--{name}", type=kind, default=None, metavar=kind.__name__.upper(),
                            help=f"{meta['label']}: {meta['help']}".replace("%", "%%"))  # argparse formats help with %


def concepts_from_args(args: argparse.Namespace, model_dir: Path) -> list[Concept]:
    """The concepts the flags describe.

    Single-concept flags change only those fields of the first saved concept (the
    model folder's concepts_list.json), so `--instance_data_dir X` alone keeps its
    prompts and class-picture count; without a saved file they describe a new concept.
    Raises ConfigError when both a concepts file and single-concept flags are
    given, or when nothing describes a concept.
    """
    given = {name: getattr(args, name) for name in CONCEPT_FLAGS if getattr(args, name, None) is not None}
    if args.concepts_list and given:
        flags = ", ".join(f"--{name}" for name in given)
        raise ConfigError(f"--concepts_list and {flags}: give either a concepts file or one concept's flags")
    if args.concepts_list:
        return load_concepts(args.concepts_list)
    saved_file = Path(model_dir) / CONCEPTS_FILE
    saved = load_concepts(saved_file) if saved_file.is_file() else []
    if given:
        first = saved[0].to_dict() if saved else {}
        return [Concept.from_dict({**first, **given}, source="command line"), *saved[1:]]
    if saved:
        return saved
    raise ConfigError(f"Concepts: give --concepts_list FILE.json or --instance_data_dir/--class_prompt "
                      f"(no {CONCEPTS_FILE} saved in {model_dir})")
