"""Concepts -> training examples -> batches.

`collect_examples` turns the "Concepts" tab into lists of examples (a picture
and its prompt), `DreamBoothDataset` makes tensors of them (resize, crop or
pad, flip, optional aspect-ratio buckets) and `collate_examples` stacks a batch
with the instance rows first and the class rows after them, as DreamBooth's
prior preservation needs (diffusers' `train_dreambooth_lora.py` collate).

Pictures, captions and buckets live in images.py, prompts.py and buckets.py;
their public names are re-exported here.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .buckets import BucketBatchSampler, bucket_resolutions, closest_bucket
from .config import Concept
from .errors import ConfigError
from .images import IMAGE_EXTENSIONS, crop_top_left, list_images, load_image, resize_to, to_tensor
from .prompts import build_prompt, read_caption, tidy, uses_filewords

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image", "read_caption", "build_prompt", "Example",
           "collect_examples", "class_dir_for", "instance_pictures", "num_class_images_wanted",
           "DreamBoothDataset", "collate_examples", "bucket_batch_sampler"]

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One training picture and the prompt it is trained with."""

    image_path: Path
    prompt: str
    is_class: bool
    concept_index: int
    size: tuple[int, int] | None = None  # (width, height) upright; set by collect_examples


def class_dir_for(concept: Concept, index: int, model_dir: Path) -> Path:
    """The concept's class-picture folder; blank means `<model_dir>/classifiers_<index>` (0-based)."""
    if concept.class_data_dir.strip():
        return Path(concept.class_data_dir.strip()).expanduser()
    return Path(model_dir) / f"classifiers_{index}"


def instance_pictures(concept: Concept, index: int, model_dir: Path | None = None) -> list[Path]:
    """The picture files of a concept's Dataset Directory, subfolders included (as the dreambooth
    extension reads them) except a class folder placed inside it.

    Raises ConfigError naming the concept's Dataset Directory when it is missing or has no pictures.
    """
    label = f"Concept {index + 1} Dataset Directory ('instance_data_dir')"
    folder = Path(concept.instance_data_dir.strip()).expanduser()
    if not concept.instance_data_dir.strip():
        raise ConfigError(f"{label} is blank; choose the folder with the pictures to train on")
    if not folder.is_dir():
        raise ConfigError(f"{label}: folder {folder} not found; choose the folder with the pictures to train on")
    class_dir = class_dir_for(concept, index, model_dir or folder).resolve()
    pictures = [p for p in list_images(folder, recursive=True) if class_dir not in p.resolve().parents]
    if not pictures:
        kinds = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        raise ConfigError(f"{label}: no pictures ({kinds}) in {folder}; put the training pictures there")
    return pictures


def num_class_images_wanted(concept: Concept, instance_count: int) -> int:
    """Class pictures a concept uses: per-image count x pictures when set, else the total."""
    if concept.num_class_images_per_image > 0:
        return concept.num_class_images_per_image * instance_count
    return concept.num_class_images


def collect_examples(concepts: list[Concept], model_dir: Path) -> tuple[list[Example], list[Example]]:
    """(instance examples, class examples) of every concept that names a Dataset Directory.

    `concept_index` is the position in `concepts`. Unreadable pictures are
    skipped with a warning naming them. Class examples are the first
    `num_class_images_wanted` readable pictures of the class folder (sorted,
    subfolders included); fewer is a warning.
    Raises ConfigError for a missing or empty dataset, a concept whose pictures
    are all unreadable, a blank prompt without captions, or prior preservation
    with no class pictures at all.
    """
    instance: list[Example] = []
    class_: list[Example] = []
    for index, concept in enumerate(concepts):
        if not concept.is_set:
            continue
        pictures, found = instance_examples(concept, index, model_dir)
        instance += found
        wanted = num_class_images_wanted(concept, len(pictures))
        classes = _class_examples(concept, index, Path(model_dir), wanted) if wanted else []
        class_ += classes
        log.info("Concept %d: %d pictures, %d class pictures", index + 1, len(found), len(classes))
    if not instance:
        raise ConfigError("Concepts: no concept has a Dataset Directory; set Concept 1's Dataset Directory ('instance_data_dir')")
    return instance, class_


def instance_examples(concept: Concept, index: int, model_dir: Path) -> tuple[list[Path], list[Example]]:
    """(picture files, readable examples with their prompts) of one concept's Dataset Directory.

    Raises ConfigError for a missing or empty dataset, pictures that are all
    unreadable, or a blank Instance Prompt where a picture has no caption.
    """
    pictures = instance_pictures(concept, index, model_dir)
    found = [e for e in (_instance_example(p, concept, index) for p in pictures) if e is not None]
    if not found:
        raise ConfigError(f"Concept {index + 1} Dataset Directory ('instance_data_dir'): none of the "
                          f"{len(pictures)} pictures in {concept.instance_data_dir} can be read; see the warnings above")
    return pictures, found


def _instance_example(path: Path, concept: Concept, index: int) -> Example | None:
    image = load_image(path)
    if image is None:
        return None
    prompt = build_prompt(concept.instance_prompt, read_caption(path), concept, is_class=False)
    if not prompt:
        raise ConfigError(f"Concept {index + 1} Instance Prompt ('instance_prompt') is blank and {path} has no "
                          "caption .txt beside it; give an instance prompt")
    return Example(path, prompt, False, index, image.size)


def _class_examples(concept: Concept, index: int, model_dir: Path, wanted: int) -> list[Example]:
    folder = class_dir_for(concept, index, model_dir)
    examples = []
    for path in list_images(folder, recursive=True):
        if len(examples) == wanted:
            break
        image = load_image(path)
        if image is not None:
            examples.append(Example(path, _class_prompt(path, concept, index), True, index, image.size))
    if not examples:
        raise ConfigError(f"Concept {index + 1} Classification Dataset Directory ('class_data_dir'): {folder} has no "
                          f"class pictures but {wanted} are wanted; generate them first (python -m lora_trainer "
                          "classimages) or set Total Number of Class/Reg Images to 0")
    if len(examples) < wanted:
        log.warning("Concept %d: class dir %s has only %d of the %d class pictures wanted; using those",
                    index + 1, folder, len(examples), wanted)
    return examples


def _class_prompt(path: Path, concept: Concept, index: int) -> str:
    caption = read_caption(path)
    # A class picture's caption is already a finished class prompt (generated pictures carry the
    # prompt they were made with), so with [filewords] it is taken as it is, as the extension does.
    if caption and uses_filewords(concept.class_prompt):
        return tidy(caption)
    prompt = build_prompt(concept.class_prompt, caption, concept, is_class=True)
    if not prompt:
        raise ConfigError(f"Concept {index + 1} Class Prompt ('class_prompt') is blank and {path} has no caption "
                          ".txt beside it; give a class prompt")
    return prompt


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance pictures, each paired with a class picture when there are class examples.

    One item per instance example: "pixel_values" [3, H, W] in [-1, 1],
    "prompt", "is_class" (False), "input_ids" [77] with a tokenizer, and with
    class examples also "class_pixel_values", "class_prompt", "class_input_ids".
    The class partner is drawn from the same concept's class pictures and moves
    on by one every epoch, so all class pictures are used when there are more
    of them than instance pictures. Prior preservation is per concept: items of
    a concept without class pictures have no class partner (and no class keys).
    H x W is resolution x resolution, or the instance picture's bucket with
    `use_buckets` (its class partner is made at the same size). With `tokenizer_2`
    (SDXL) items also hold "input_ids_2"; with `time_ids` "time_ids" [6]: the
    picture's real (height, width), the (top, left) of the crop and the (height,
    width) trained at, as SDXL's size/crop conditioning wants them (and the class_ keys alike).
    Flips are random but reproducible: they depend on `seed`, the epoch and the index.
    """

    row_key = "pixel_values"

    def __init__(self, instance: list[Example], class_: list[Example], *, resolution: int, center_crop: bool,
                 hflip: bool, use_buckets: bool = False, tokenizer=None, seed: int = 0, tokenizer_2=None,
                 time_ids: bool = False):
        if not instance:
            raise ConfigError("Concepts: no instance pictures to train on; set a Dataset Directory")
        self.instance, self.class_ = list(instance), list(class_)
        self.resolution, self.center_crop, self.hflip = resolution, center_crop, hflip
        self.use_buckets, self.tokenizer, self.seed = use_buckets, tokenizer, seed
        self.tokenizer_2, self.with_time_ids = tokenizer_2, time_ids
        self.epoch = 0
        buckets = bucket_resolutions(resolution) if use_buckets else [(resolution, resolution)]
        self.sizes = [closest_bucket(_size_of(e), buckets) if use_buckets else buckets[0] for e in self.instance]
        self._pools, self._rank, self._concept_count = self._class_pools()

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_)

    def __len__(self) -> int:
        return len(self.instance)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch: flips and class partners change with it, reproducibly."""
        self.epoch = epoch

    def bucket_of(self, index: int) -> tuple[int, int]:
        """(width, height) of item `index`."""
        return self.sizes[index]

    def class_partner(self, index: int) -> Example | None:
        """The class example paired with instance example `index` in the current epoch;
        None when its concept has no class pictures (no prior preservation for it)."""
        concept = self.instance[index].concept_index
        pool = self._pools.get(concept)
        if not pool:
            return None
        position = self._rank[index] + self.epoch * self._concept_count[concept]
        return self.class_[pool[position % len(pool)]]

    def flips(self, index: int, kind: str = "instance") -> bool:
        """Whether item `index` is mirrored this epoch (`kind` "instance" or "class")."""
        if not self.hflip:
            return False
        return random.Random(f"{self.seed}:{self.epoch}:{kind}:{index}").random() < 0.5

    def pixels(self, example: Example, size: tuple[int, int], *, flip: bool = False) -> torch.Tensor:
        """The picture of `example` as [3, H, W] in [-1, 1] at `size` = (width, height).

        Raises ConfigError when the file can no longer be read.
        """
        image = load_image(example.image_path)
        if image is None:
            raise ConfigError(f"{example.image_path}: picture became unreadable during training; restore or remove it")
        return to_tensor(resize_to(image, size, center_crop=self.center_crop), flip=flip)

    def row(self, example: Example, size: tuple[int, int], *, flip: bool = False) -> torch.Tensor:
        """What one batch row holds for `example` (under the key `row_key`): its pixels here;
        training's latent cache gives the encoded picture instead."""
        return self.pixels(example, size, flip=flip)

    def tokenize(self, prompt: str, tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        ids = tokenizer(prompt, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return ids[0]

    def time_ids(self, example: Example, size: tuple[int, int], flip: bool) -> torch.Tensor:
        """SDXL's [original height, width, crop top, left, target height, width] of `example` at `size`."""
        width, height = _size_of(example)
        top, left = crop_top_left((width, height), size, center_crop=self.center_crop, flip=flip)
        return torch.tensor([height, width, top, left, size[1], size[0]], dtype=torch.float32)

    def conditioning_of_prompt(self, prompt: str) -> dict:
        """The token ids of `prompt` (of each tokenizer), as a row holds them."""
        out = {"input_ids": self.tokenize(prompt)}
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = self.tokenize(prompt, self.tokenizer_2)
        return out

    def conditioning(self, example: Example, size: tuple[int, int], flip: bool) -> dict:
        """The prompt-side keys of one row: token ids (of each tokenizer) and time ids."""
        out = {}
        if self.tokenizer is not None:
            out["input_ids"] = self.tokenize(example.prompt)
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = self.tokenize(example.prompt, self.tokenizer_2)
        if self.with_time_ids:
            out["time_ids"] = self.time_ids(example, size, flip)
        return out

    def __getitem__(self, index: int) -> dict:
        example, size, flip = self.instance[index], self.sizes[index], self.flips(index)
        item = {self.row_key: self.row(example, size, flip=flip), "prompt": example.prompt, "is_class": False,
                **self.conditioning(example, size, flip)}
        partner = self.class_partner(index)
        if partner is not None:
            flip = self.flips(index, "class")
            item["class_" + self.row_key] = self.row(partner, size, flip=flip)
            item["class_prompt"] = partner.prompt
            item.update({"class_" + k: v for k, v in self.conditioning(partner, size, flip).items()})
        return item

    def _class_pools(self):
        pools: dict[int, list[int]] = {}
        for i, example in enumerate(self.class_):
            pools.setdefault(example.concept_index, []).append(i)
        rank, count = [], {}
        for example in self.instance:
            rank.append(count.get(example.concept_index, 0))
            count[example.concept_index] = rank[-1] + 1
        return pools, rank, count


def _size_of(example: Example) -> tuple[int, int]:
    if example.size is not None:
        return example.size
    image = load_image(example.image_path)
    return image.size if image is not None else (1, 1)


ROW_KEYS = ("pixel_values", "latent_dist")
CONDITIONING_KEYS = ("input_ids", "input_ids_2", "time_ids")


def collate_examples(batch: list[dict]) -> dict:
    """Stack items: instance rows first, then the class rows of prior preservation
    (one per item that has a class partner, in the same order).

    Returns "pixel_values" [B + class rows, 3, H, W] (or "latent_dist" [B + class rows, 8, h, w]
    from training's latent cache: mean and std of the VAE's latent distribution), "prompts" (list of str),
    "is_class" BoolTensor [B + class rows], and "input_ids" ("input_ids_2", "time_ids") when the items have them.
    """
    key = next(k for k in ROW_KEYS if k in batch[0])
    rows = [item[key] for item in batch]
    prompts = [item["prompt"] for item in batch]
    is_class = [bool(item.get("is_class", False)) for item in batch]
    partnered = [item for item in batch if "class_" + key in item]
    rows += [item["class_" + key] for item in partnered]
    prompts += [item["class_prompt"] for item in partnered]
    is_class += [True] * len(partnered)
    out = {key: torch.stack(rows).contiguous().float(), "prompts": prompts,
           "is_class": torch.tensor(is_class, dtype=torch.bool)}
    for extra in CONDITIONING_KEYS:
        values = [item[extra] for item in batch if extra in item]
        values += [item["class_" + extra] for item in partnered if "class_" + extra in item]
        if values:
            out[extra] = torch.stack(values)
    return out


def bucket_batch_sampler(dataset: DreamBoothDataset, batch_size: int, *, shuffle: bool = True,
                         seed: int = 0) -> BucketBatchSampler:
    """Batches of indices whose items share one size; pass as a DataLoader's `batch_sampler`.

    Iterating again gives the next epoch's (reproducible) order. Without buckets
    every item has the same size and this is plain (shuffled) batching.
    """
    return BucketBatchSampler([dataset.bucket_of(i) for i in range(len(dataset))], batch_size,
                              shuffle=shuffle, seed=seed)

