"""Batches for the step loop: pictures through the VAE every step, or latents cached once.

"Cache Latents" encodes every picture the run can see (each instance picture
at its size, mirrored too with "Apply Horizontal Flip", and every class
picture at each size its concept's pictures have) before the first step and
then moves the VAE off the GPU. The cache keeps the mean and spread of the
VAE's latent distribution, so every step still draws a fresh latent from it,
exactly as encoding every step would.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..caption_augment import CaptionAugment
from ..compat import shardable_batch_sampler
from ..data import DreamBoothDataset, Example, bucket_batch_sampler, collate_examples

log = logging.getLogger(__name__)

CacheKey = tuple[str, tuple[int, int], bool]
# Pictures encoded at once. One: the VAE's activations at full picture size are the largest of the whole run
# (about 0.3 GB per 512 px picture in fp16, with the UNet already on the GPU), and batching them gains little.
CACHE_BATCH = 1


class LatentDataset(DreamBoothDataset):
    """A DreamBoothDataset whose rows are cached latent distributions ("latent_dist": mean and std, 8 channels)."""

    row_key = "latent_dist"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache: dict[CacheKey, torch.Tensor] = {}

    def row(self, example: Example, size: tuple[int, int], *, flip: bool = False) -> torch.Tensor:
        return self.cache[(str(example.image_path), size, flip)]

    def needed(self) -> list[tuple[Example, tuple[int, int], bool]]:
        """Every (picture, size, mirrored) a batch of this dataset can ask for."""
        flips = (False, True) if self.hflip else (False,)
        wanted: dict[CacheKey, tuple[Example, tuple[int, int], bool]] = {}
        sizes_of: dict[int, set[tuple[int, int]]] = {}
        for example, size in zip(self.instance, self.sizes):
            sizes_of.setdefault(example.concept_index, set()).add(size)
            for flip in flips:
                wanted.setdefault((str(example.image_path), size, flip), (example, size, flip))
        for example in self.class_:
            for size in sorted(sizes_of.get(example.concept_index, ())):
                for flip in flips:
                    wanted.setdefault((str(example.image_path), size, flip), (example, size, flip))
        return list(wanted.values())

    @torch.no_grad()
    def fill_cache(self, vae, *, device: torch.device, dtype: torch.dtype, batch_size: int = CACHE_BATCH) -> None:
        """Encode every needed picture once with `vae` (on `device` in `dtype`); the cache stays on the CPU."""
        needed = self.needed()
        groups: dict[tuple[int, int], list] = {}
        for item in needed:
            groups.setdefault(item[1], []).append(item)
        bar = tqdm(total=len(needed), desc="Caching latents", unit="picture", leave=False)
        for size, items in groups.items():
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                pixels = torch.stack([self.pixels(e, s, flip=f) for e, s, f in chunk]).to(device, dtype)
                dist = vae.encode(pixels).latent_dist
                stats = torch.cat([dist.mean, dist.std], dim=1).float().cpu()
                for (example, s, flip), row in zip(chunk, stats):
                    self.cache[(str(example.image_path), s, flip)] = row
                bar.update(len(chunk))
        bar.close()
        log.info("Cached the latents of %d pictures", len(needed))


def make_dataset(instance: list[Example], class_: list[Example], params, tokenizer, *, cached: bool,
                 seed: int, tokenizer_2=None, time_ids: bool = False) -> DreamBoothDataset:
    """The run's dataset: pictures, or (`cached`) a LatentDataset whose cache `fill_cache` fills.
    SDXL passes its second tokenizer and `time_ids` (each picture's size and crop)."""
    kind = LatentDataset if cached else DreamBoothDataset
    return kind(instance, class_, resolution=params.resolution, center_crop=params.center_crop, hflip=params.hflip,
                use_buckets=params.use_buckets, tokenizer=tokenizer, seed=seed, tokenizer_2=tokenizer_2,
                time_ids=time_ids, augment=CaptionAugment.from_params(params), masked=params.masked_loss)


def make_dataloader(dataset: DreamBoothDataset, batch_size: int, *, seed: int):
    """Shuffled batches of one size each (aspect buckets when on; otherwise every picture has the same size)."""
    sampler = shardable_batch_sampler(bucket_batch_sampler(dataset, batch_size, shuffle=True, seed=seed))
    # Its own generator: starting an epoch would otherwise draw from torch's global one, and a run
    # resumed in the middle of an epoch would then draw once more than the run that never stopped.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def batch_latents(batch: dict, vae, scale: float, device: torch.device) -> torch.Tensor:
    """The batch's latents in fp32, scaled for the UNet: drawn from the cached distribution or encoded now."""
    if "latent_dist" in batch:
        mean, std = batch["latent_dist"].to(device).chunk(2, dim=1)
        latents = mean + std * torch.randn_like(mean)
    else:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=next(vae.parameters()).dtype)
            latents = vae.encode(pixels).latent_dist.sample()
    return latents.float() * scale
