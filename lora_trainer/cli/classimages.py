"""`classimages`: "Generate Class Images": make the missing class pictures before training."""
from __future__ import annotations

import torch

from ..classimages import generate_class_images, rate_text
from ..data import class_dir_for
from ..host import ModelsDir
from . import add_models_dir
from ._concepts import add_concept_args, concepts_from_args

PRECISION = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_parser(sub) -> None:
    p = sub.add_parser("classimages", help='"Generate Class Images": generate the missing class pictures',
                       description="Count the class pictures of each concept and generate the missing ones with "
                                   "the working model and the class prompt.")
    add_models_dir(p)
    p.add_argument("--model", required=True, metavar="NAME", help="the working model (made by create)")
    add_concept_args(p)
    p.add_argument("--sample_batch_size", type=int, default=4, metavar="N", help="pictures generated at once")
    p.add_argument("--seed", type=int, default=0, help="picture n of a class folder uses seed + n; -1: random")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu; default: cuda when available")
    p.add_argument("--prior_generation_precision", choices=tuple(PRECISION), default=None,
                   help="precision of generation; default: fp16 on CUDA, fp32 on CPU")
    p.set_defaults(run=run)


def run(args) -> int:
    models = ModelsDir.at(args.models_dir)
    model_dir = models.existing_model_dir(args.model)
    concepts = concepts_from_args(args, model_dir)
    dtype = PRECISION[args.prior_generation_precision] if args.prior_generation_precision else None
    counts = generate_class_images(models, args.model, concepts, batch_size=args.sample_batch_size,
                                   device=args.device, seed=args.seed, dtype=dtype)
    for index, (concept, count) in enumerate(zip(concepts, counts)):
        if count:
            print(class_dir_for(concept, index, model_dir))
    if sum(counts):
        print(f"Generated {rate_text(sum(counts), counts.seconds)}")
    return 0
