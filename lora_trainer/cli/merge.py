"""`merge`: "Generate Ckpt", a LoRA merged into a checkpoint for txt2img."""
from __future__ import annotations

from ..config import field_meta
from ..errors import LoraTrainerError
from ..host import ModelsDir
from ..merge import MergeOptions, OutputExistsError, merge_lora
from . import add_models_dir


def _help(name: str) -> str:
    meta = field_meta(MergeOptions, name)
    return f'"{meta["label"]}": {meta["help"]}'


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help='"Generate Ckpt": merge a LoRA into a checkpoint txt2img loads',
                       description="Merge a LoRA into the model's weights (or into another checkpoint of the same "
                                   "family) and write DIR/Stable-diffusion/NAME_STEPS_lora.safetensors.")
    add_models_dir(p)
    p.add_argument("--model", required=True, help="the working model (made by `create`)")
    p.add_argument("--lora", default="", metavar="FILE", help=_help("lora"))
    p.add_argument("--into", default="", metavar="CHECKPOINT", help=_help("into"))
    p.add_argument("--unet-weight", type=float, default=1.0, metavar="W", help=_help("unet_weight"))
    p.add_argument("--text-weight", type=float, default=1.0, metavar="W", help=_help("text_weight"))
    p.add_argument("--half", action="store_true", help=_help("half"))
    p.add_argument("--subdir", action="store_true", help=_help("subdir"))
    p.add_argument("--format", dest="fmt", default="safetensors", choices=field_meta(MergeOptions, "fmt")["choices"],
                   help=_help("fmt"))
    p.add_argument("--name", default="", metavar="CUSTOM", help=_help("custom_name"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of the same name")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        path = merge_lora(ModelsDir.at(args.models_dir), args.model, lora=args.lora or None, into=args.into or None,
                          unet_weight=args.unet_weight, text_weight=args.text_weight, half=args.half,
                          subdir=args.subdir, fmt=args.fmt, custom_name=args.name or None, overwrite=args.overwrite)
    except OutputExistsError as e:
        raise LoraTrainerError(f"{e.path} {e.why}; pass a new --name (or --overwrite)") from None
    print(path)
    return 0
