"""Aspect-ratio bucketing: train each picture at a shape close to its own.

Buckets hold about resolution x resolution pixels each, with sides that are
multiples of 64 (8 below 256 pixels, so tiny test models get buckets too) and
aspect ratios up to about 4:1 either way. Each picture goes to the bucket whose
aspect ratio is closest to its own; a batch only ever holds one bucket, so the
pictures of a batch stack into one tensor.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence


def bucket_step(resolution: int) -> int:
    """Side granularity: 64 pixels (8 latent pixels), or 8 for tiny resolutions."""
    return 64 if resolution >= 256 else 8


def bucket_resolutions(resolution: int) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), sorted, square one included.

    Every bucket has at most resolution**2 pixels, sides between half and twice
    the resolution, and sides divisible by `bucket_step(resolution)`.
    """
    step = bucket_step(resolution)
    area = resolution * resolution
    smallest = max(step, resolution // 2 // step * step)
    largest = 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(smallest, largest + 1, step):
        height = min(largest, area // width // step * step)
        if height >= smallest:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


def closest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log scale) to `size` = (width, height).

    Ties go to the larger bucket, so nothing is shrunk more than needed.
    """
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


class BucketBatchSampler:
    """Batches of dataset indices, each from one bucket; usable as a DataLoader `batch_sampler`.

    `buckets` gives the bucket of every index. With `shuffle`, the order within
    buckets and the order of batches change every epoch, reproducibly from
    `seed`: iterating again starts the next epoch, or call `set_epoch`.
    The last batch of a bucket may be smaller; no picture is dropped.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        # No per-index sampler behind the batches; accelerate 0.21 reads this attribute when sharding them.
        self.sampler = None
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # batches the next iteration leaves out: an interrupted epoch resumes after them

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (the same for the same seed and epoch)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        return iter(self.batches(epoch)[skip:])

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = {}
        for bucket in self.buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        return sum(math.ceil(n / self.batch_size) for n in counts.values())
