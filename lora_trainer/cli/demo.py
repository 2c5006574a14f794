"""`demo`: the whole path on the built-in tiny model, with nothing downloaded."""
from __future__ import annotations

import logging

from ..checkpoint import create_model
from ..host import ModelsDir
from ..tiny import write_tiny_checkpoint
from . import add_models_dir

log = logging.getLogger(__name__)
DEMO_MODEL = "tiny-demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole path on a built-in tiny model (no downloads)")
    add_models_dir(p)
    p.set_defaults(run=run)


def run(args) -> int:
    models = ModelsDir.at(args.models_dir)
    checkpoint = write_tiny_checkpoint(models.checkpoints)
    log.info("Wrote the tiny checkpoint %s", checkpoint)
    folder = create_model(models, checkpoint.name, DEMO_MODEL, overwrite=True)
    log.info("Created the model %s", folder)
    print(folder)
    return 0
