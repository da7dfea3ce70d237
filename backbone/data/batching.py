"""Batches cut and augmented on the device, from a uint8 dataset copied there once.

No CPU data pipeline: a whole CIFAR split fits on the device, so a batch is an ``index_select``
and the standard augmentation one gather. Every random choice is a function of
``(seed, epoch, batch)``, so a run resumed at any batch sees exactly the batches it would have.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from backbone.data.datasets import ImageDataset


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    padding: int = 4,
    flip: bool = True,
    rows_of: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Standard CIFAR augmentation of a uint8 batch (B, C, H, W): a random crop of the zero-padded
    image, then a random horizontal flip; output has the input's shape, dtype and device.

    One gather on ``images.device``, no per-image loop. ``generator`` draws the offsets and
    flips; it may live on the CPU while ``images`` is on a GPU (the draws are moved over, and the
    result is then the same on every device). None uses the global RNG of ``images.device``.
    ``rows_of=(start, total)``: ``images`` are rows ``start ...`` of a batch of ``total`` rows;
    the draws are made for all ``total`` rows (cheap), so each rank's share of a batch gets the
    crops and flips the whole batch would.
    """
    b, c, h, w = images.shape
    device = images.device
    rng_device = generator.device if generator is not None else device
    start, total = rows_of or (0, b)

    def draw(values: torch.Tensor) -> torch.Tensor:
        # non_blocking: from the host, the copy is staged at once and the GPU stream is not waited for.
        return values[start : start + b].to(device, non_blocking=True)

    dy = draw(torch.randint(0, 2 * padding + 1, (total, 1), generator=generator, device=rng_device))
    dx = draw(torch.randint(0, 2 * padding + 1, (total, 1), generator=generator, device=rng_device))
    mirror = draw(torch.rand(total, 1, generator=generator, device=rng_device) < 0.5)
    cols = torch.arange(w, device=device).expand(b, w)
    if flip:  # a flip only reverses the column order, so it joins the same gather
        cols = torch.where(mirror, w - 1 - cols, cols)
    rows, cols = dy + torch.arange(h, device=device), dx + cols  # (B, H), (B, W) in the padded image
    padded = F.pad(images, (padding, padding, padding, padding))
    batch_idx = torch.arange(b, device=device)[:, None, None, None]
    channel_idx = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_idx, channel_idx, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Batches ``(images_uint8, labels)`` of a dataset that is copied to ``device`` once.

    Epoch ``e`` takes its order from a CPU generator seeded by ``(seed, e)`` and batch ``i`` its
    augmentation from one seeded by ``(seed, e, i)``, so any batch replays exactly after a resume.
    ``shuffle=False``: dataset order (evaluation). ``drop_last``: drop a final short batch.
    ``augment``: :func:`augment_batch` with ``padding``.

    ``rank``, ``world_size``: data-parallel training. ``batch_size`` stays the global batch and
    every rank cuts the same one, keeping rows ``rank * b ... (rank + 1) * b`` of it (``b =
    batch_size // world_size``) with the augmentation the whole batch would get: the union over
    ranks is exactly the one-process batch, whatever the world size.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"rank {rank} of {world_size}: the global batch_size {batch_size} must split evenly")
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.padding, self.seed, self.epoch = augment, padding, seed, 0
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that ``iter(loader)`` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch ``epoch``, from batch ``start`` on. Batch ``i`` depends only on
        ``(seed, epoch, i)``, so a run stopped in the middle of an epoch continues exactly."""
        n = len(self.images)
        order = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device, non_blocking=True)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            total, first = len(idx), 0
            if self.world_size > 1:  # this rank's rows (a short last batch splits as evenly as it can)
                bounds = [total * r // self.world_size for r in (self.rank, self.rank + 1)]
                first, idx = bounds[0], idx[bounds[0] : bounds[1]]
            images = self.images.index_select(0, idx)
            if self.augment:
                images = augment_batch(images, _generator(self.seed, epoch, i + 1), self.padding,
                                       rows_of=(first, total))
            yield images, self.labels.index_select(0, idx)


def _generator(*key: int) -> torch.Generator:
    # SeedSequence mixes the key into unrelated streams; "seed + epoch" would make seed 1's
    # epoch 0 replay seed 0's epoch 1.
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))
