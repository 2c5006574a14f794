"""`create`: "Create Model" from a checkpoint."""
from __future__ import annotations

from ..checkpoint import create_model
from ..host import ModelsDir
from . import add_models_dir


def add_parser(sub) -> None:
    p = sub.add_parser("create", help='"Create Model": convert a checkpoint into a working model',
                       description="Convert an original-layout .safetensors/.ckpt into a diffusers working model "
                                   "under DIR/lora_trainer/NAME.")
    add_models_dir(p)
    p.add_argument("--source", required=True, metavar="CHECKPOINT",
                   help="a checkpoint path, or a file name or title found under DIR/Stable-diffusion")
    p.add_argument("--name", required=True, help="name of the new model")
    p.add_argument("--extract-ema", action="store_true", help="use the EMA weights (model_ema.*) when present")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model of that name")
    p.set_defaults(run=run)


def run(args) -> int:
    folder = create_model(ModelsDir.at(args.models_dir), args.source, args.name,
                          extract_ema=args.extract_ema, overwrite=args.overwrite)
    print(folder)
    return 0
