"""Image trees too large for memory (ImageNet), streamed from disk through a ``DataLoader`` with workers.

Layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (ImageNet's validation images
sorted into class folders, as torchvision's ImageFolder expects; ``test/`` is accepted instead of
``val/``). :func:`scan_imagefolder` lists a split (:class:`ImageFiles`, no pixels); a
:class:`StreamingLoader` decodes, crops and batches it in worker processes and yields what
``BatchLoader`` yields: ``(images uint8 (B, 3, S, S), labels int64 (B,))`` on the device, with the
same resumable interface (:class:`BatchSource`). :func:`make_loader` picks the right one for
either kind of split, so a training loop takes both. What needs pixels in memory (the RL env's
episodes, a policy's images) gets them from :func:`materialize` (decoded once at the evaluation
resolution, capped by the caller).

Transforms, as in torchvision's ImageNet recipe: training (``augment=True``) a random resized crop
(scale 0.08-1, aspect 3/4-4/3) to ``image_size`` and a horizontal flip; evaluation a resize of
the shorter side to ``image_size / 0.875`` (256 for 224) and a centre crop. Images stay uint8: the
model normalises its own input.

Determinism: the order of epoch ``e`` is a permutation seeded by ``(seed, e)`` (the one
``BatchLoader`` uses) and every image's crop and flip come from its own seed, drawn from
``(seed, e)`` for its position in the epoch. The ``DataLoader`` returns batches in sampler order,
so batch ``i`` is the same whatever ``num_workers`` is and after a resume at any batch. Not
covered: other versions of libjpeg/torchvision may decode or resize a few pixel values
differently, and how long a batch takes (workers race; only their results are ordered).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from backbone.data.batching import BatchLoader, _generator
from backbone.data.datasets import ImageDataset, stratified_subset
from backbone.data.imagefolder import decode_image_file, list_images
from backbone.errors import DatasetError

#: The usual ratio of crop to resize in evaluation (224 / 256).
CROP_FRACTION = 0.875


@runtime_checkable
class BatchSource(Protocol):
    """What a training or evaluation loop needs of its batches (``BatchLoader`` and
    ``StreamingLoader`` both are one): ``len`` batches per epoch, and batch ``i`` of epoch ``e``
    a function of ``(seed, e, i)`` only, so a run resumed at any batch continues exactly."""

    batch_size: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class ImageFiles:
    """A split as image files on disk: ``root/files[i]`` has label ``labels[i]``.

    ``files``: paths relative to ``root`` as one NumPy bytes array, not a list of str: forked
    workers share it, whereas touching millions of Python objects would copy them into every
    worker (copy-on-write pages dirtied by reference counts). ``classes``: names (index = label).
    Has the ``labels``/``num_classes``/``subset`` of an ``ImageDataset``, so ``split_train_val``
    splits it the same way. ``image_size`` (side of the crops) and ``num_workers`` (decoding
    processes) say how the split is read: ``make_loader`` and :func:`materialize` take them from
    here, so every stage that gets the split reads it the way ``DataConfig`` asked.
    """

    root: Path
    files: np.ndarray
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    difficulty: None = None  # no known difficulty per image (as for real data in ImageDataset)
    image_size: int = 224
    num_workers: int = 4

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode()

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageFiles:
        """The files at ``indices`` (in that order) with their labels."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageFiles(self.root, self.files[idx.numpy()], self.labels[idx], list(self.classes), self.name,
                          image_size=self.image_size, num_workers=self.num_workers)


def scan_imagefolder(root: str | os.PathLike, train: bool, image_size: int = 224, num_workers: int = 4) -> ImageFiles:
    """The training split (``root/train``) or evaluation split (``root/val``, else ``root/test``)
    of an ImageFolder tree: ``.jpg``/``.jpeg``/``.png`` files (any case) by class, then file name,
    to be read at ``image_size`` by ``num_workers`` processes.

    The classes are the sub-folders of ``root/train`` in alphabetical order, for both splits.
    """
    root = Path(root).expanduser().resolve()
    split_dir = root / "train" if train else next((root / s for s in ("val", "test") if (root / s).is_dir()), root / "val")
    if not (root / "train").is_dir() or not split_dir.is_dir():
        raise DatasetError(f"image folder not found: expected {root}/train/<class>/*.JPEG and "
                           f"{root}/val/<class>/*.JPEG (ImageNet's val images sorted into class folders)")
    classes, listed = list_images(root, split_dir)
    files, labels = [rel for rel, _, _ in listed], [label for _, label, _ in listed]
    return ImageFiles(split_dir, np.array(files, dtype=np.bytes_), torch.tensor(labels, dtype=torch.long), classes,
                      root.name, image_size=image_size, num_workers=num_workers)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area with aspect ``ratio``
    (torchvision's RandomResizedCrop rule: 10 tries, then the centred crop clamped to ``ratio``),
    drawn from ``generator`` so that each image's crop is a function of its own seed."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class StreamedImages(Dataset):
    """Decodes and transforms one image per item ``(index, sample_seed)``; what the workers run.

    ``image_size``: output side S. ``resize_size``: evaluation's shorter side before the centre
    crop. ``augment``: training transforms (random resized crop + flip) instead.
    """

    def __init__(self, files: ImageFiles, image_size: int, resize_size: int, augment: bool):
        self.files, self.image_size, self.resize_size, self.augment = files, image_size, resize_size, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2 import functional as TF

        index, sample_seed = item
        path = self.files.path(index)
        try:
            with warnings.catch_warnings():  # torchvision >= 0.29 warns on every decode call
                warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
                image = decode_image_file(path)
        except (RuntimeError, OSError, ValueError) as exc:  # ValueError: empty file
            raise DatasetError(f"cannot decode image {path}: {exc}") from exc
        size = [self.image_size, self.image_size]
        if self.augment:
            g = torch.Generator().manual_seed(sample_seed)
            top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], g)
            image = TF.resized_crop(image, top, left, h, w, size, antialias=True)
            if torch.rand(1, generator=g).item() < 0.5:
                image = TF.horizontal_flip(image)
        else:
            image = TF.center_crop(TF.resize(image, [self.resize_size], antialias=True), size)
        return image.contiguous(), int(self.files.labels[index])


class StreamingLoader:
    """Batches ``(images_uint8, labels)`` of image files, decoded by ``num_workers`` processes.

    Arguments as ``BatchLoader`` (``shuffle``, ``drop_last``, ``augment``, ``device``, ``seed``),
    plus ``image_size`` (side of the square crops), ``resize_size`` (evaluation's shorter side
    before the centre crop; default ``image_size / 0.875``), ``num_workers`` (0: decode in this
    process) and ``prefetch_factor`` (batches each worker prepares ahead). Batches reach a CUDA
    ``device`` through pinned memory, copied without blocking.

    ``rank``, ``world_size``: data-parallel training, as ``BatchLoader``: ``batch_size`` is the
    global batch, and each rank decodes only its rows ``total * rank // world_size ...`` of it,
    with the crops the whole batch would get (each image's seed belongs to its global position).
    """

    def __init__(
        self,
        dataset: ImageFiles,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        image_size: int = 224,
        resize_size: int | None = None,
        num_workers: int = 4,
        prefetch_factor: int = 2,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or image_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1, image_size >= 1, num_workers >= 0; got {batch_size}, "
                             f"{image_size}, {num_workers}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"rank {rank} of {world_size}: the global batch_size {batch_size} must split evenly")
        resize_size = resize_size or round(image_size / CROP_FRACTION)
        self.samples = StreamedImages(dataset, image_size, resize_size, augment)
        self.batch_size, self.shuffle, self.drop_last, self.augment = batch_size, shuffle, drop_last, augment
        self.device, self.seed, self.epoch = torch.device(device), seed, 0
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.samples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that ``iter(loader)`` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch ``epoch`` from batch ``start`` on; batch ``i`` depends only on
        ``(seed, epoch, i)``. Each call starts its own workers (a second or so), which end when
        the iterator is exhausted or dropped."""
        n = len(self.samples)
        order = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        # One seed per position in the epoch: a resumed epoch gives each image the crop it would have had.
        seeds = torch.randint(0, 2**62, (n,), generator=_generator(self.seed, epoch, 0))
        batches = _BatchIndices(order, seeds, self.batch_size, start, len(self), self.rank, self.world_size)
        if not len(batches):
            return
        workers = self.num_workers
        loader = DataLoader(self.samples, batch_sampler=batches, num_workers=workers,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=self.prefetch_factor if workers else None)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class _BatchIndices:
    """The ``DataLoader``'s batch sampler: this rank's rows of batches ``start`` .. ``stop - 1``
    as lists of ``(index, sample_seed)``, built as they are needed (an ImageNet epoch as Python
    tuples up front would take ~100 MB)."""

    def __init__(self, order: torch.Tensor, seeds: torch.Tensor, batch_size: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1):
        self.order, self.seeds, self.batch_size, self.start, self.stop = order, seeds, batch_size, start, stop
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for i in range(self.start, self.stop):
            first = i * self.batch_size
            total = min(self.batch_size, len(self.order) - first)
            # This rank's share of the global batch (a short last batch splits as evenly as it can).
            lo, hi = (first + total * r // self.world_size for r in (self.rank, self.rank + 1))
            yield list(zip(self.order[lo:hi].tolist(), self.seeds[lo:hi].tolist()))


def make_loader(
    dataset: ImageDataset | ImageFiles,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    augment: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    image_size: int | None = None,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> BatchSource:
    """The loader for a split of either kind: a ``BatchLoader`` (in memory, batches cut and
    augmented on the device; ``image_size``/``num_workers`` unused) for an ``ImageDataset``, a
    ``StreamingLoader`` for ``ImageFiles`` (``image_size``, ``num_workers``: default the split's
    own, which ``load_splits`` sets from ``DataConfig``); ``rank``/``world_size`` as both loaders take them."""
    if isinstance(dataset, ImageFiles):
        workers = dataset.num_workers if num_workers is None else num_workers
        return StreamingLoader(dataset, batch_size, shuffle, drop_last, augment, device, seed,
                               image_size=image_size or dataset.image_size, num_workers=workers, rank=rank,
                               world_size=world_size)
    ranks = {"rank": rank, "world_size": world_size} if world_size > 1 else {}
    return BatchLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, augment=augment, device=device,
                       seed=seed, **ranks)


def image_size_of(dataset: ImageDataset | ImageFiles) -> int:
    """The side of the images a split yields: its stored size in memory, its crop size streamed
    (FLOPs are measured at it)."""
    return dataset.image_size if isinstance(dataset, ImageFiles) else dataset.images.shape[-1]


#: The last few splits decoded by :func:`materialize` in this process: the policy's images and the
#: test split are asked for again by every stage of one ``experiments.run`` (each λ, fine-tuning,
#: evaluation), and decoding 50,000 ImageNet images takes minutes.
_MATERIALIZED: OrderedDict[tuple, ImageDataset] = OrderedDict()
_KEEP_MATERIALIZED = 3


def materialize(files: ImageFiles, image_size: int | None = None, num_workers: int | None = None,
                progress: bool = True, batch_size: int = 256) -> ImageDataset:
    """The images of ``files`` decoded once into an in-memory ``ImageDataset`` (uint8, CPU), at
    the evaluation resolution (shorter side resized to ``image_size / 0.875``, centre crop
    ``image_size``: the pixels a streamed evaluation sees), in order, with their labels.

    Memory: ``3 · image_size²`` bytes per image, e.g. 10,000 ImageNet images at 224 px ≈ 1.5 GB,
    50,000 ≈ 7.5 GB; cap the count before calling (``data.max_policy_images``,
    ``data.max_test_images``). ``image_size``, ``num_workers``: default the split's own.
    """
    size = image_size or files.image_size
    key = (str(files.root), hashlib.sha256(files.files.tobytes()).hexdigest(), size)
    if key in _MATERIALIZED:
        _MATERIALIZED.move_to_end(key)
        return _MATERIALIZED[key]
    from tqdm.auto import tqdm

    nbytes = len(files) * 3 * size * size
    memory = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
    if progress:  # the memory note a user needs before a large decode, not a debug detail
        tqdm.write(f"decoding {len(files)} images of {files.root} at {size} px into memory: {memory} uint8 "
                   "(data.max_policy_images / data.max_test_images cap how many)")
    workers = files.num_workers if num_workers is None else num_workers
    loader = StreamingLoader(files, batch_size, shuffle=False, image_size=size, num_workers=workers)
    images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    start = 0
    desc = f"decoding {len(files)} images into memory ({memory})"
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch, _ in loader.epoch_batches(0):
            images[start : start + len(batch)] = batch
            start += len(batch)
            bar.update(len(batch))
    dataset = ImageDataset(images, files.labels.clone(), list(files.classes), None, files.name)
    _MATERIALIZED[key] = dataset
    while len(_MATERIALIZED) > _KEEP_MATERIALIZED:
        _MATERIALIZED.popitem(last=False)
    return dataset


def in_memory(dataset: ImageDataset | ImageFiles, max_images: int | None = None, seed: int = 0) -> ImageDataset:
    """``dataset`` with its pixels in memory, about ``max_images`` of them (a stratified subset,
    each class rounded to whole images, seeded by ``seed``; None: all): an ``ImageDataset`` as it is, ``ImageFiles`` through
    :func:`materialize`. For what needs every image at hand (the RL env, a policy's update)."""
    dataset = stratified_subset(dataset, max_images, seed)
    return materialize(dataset) if isinstance(dataset, ImageFiles) else dataset
