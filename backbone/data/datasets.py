"""Image datasets as in-memory uint8 tensors (batching and augmentation on the device: ``backbone.data.batching``).

Sources: a built-in synthetic shape dataset (offline, with a known difficulty per image),
CIFAR-10/100 (the standard python-pickle folders) and ImageFolder trees of JPEG/PNG files
(decoded once, then cached: ``backbone.data.imagefolder``). Every loader returns an :class:`ImageDataset`. Images stay uint8
(the model normalises its own input), so a whole CIFAR split fits on the device and batches are
cut and augmented there, without a CPU data pipeline.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backbone.errors import ConfigError, DatasetError
from backbone.data.imagefolder import IMAGE_EXTENSIONS, default_cache_dir, load_imagefolder  # noqa: F401 (re-exported)
from backbone.data.synthetic import SHAPES, render_synthetic

log = logging.getLogger(__name__)

DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder", "streamed_imagefolder")
#: Streamed from disk by ``backbone.data.streaming`` (ImageNet-sized ImageFolder trees), not held in memory.
STREAMED_DATASETS = ("streamed_imagefolder",)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
#: Synthetic split sizes used when ``load_dataset(..., synthetic_size=None)``.
SYNTHETIC_SIZES = {"train": 10_000, "test": 2_000}


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    ``images``: uint8 (N, 3, H, W); ``labels``: int64 (N,); ``classes``: class names (index =
    label); ``difficulty``: int64 (N,) difficulty level per image (synthetic data), else None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    difficulty: torch.Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (n,) or (self.difficulty is not None and self.difficulty.shape != (n,)):
            raise ValueError(f"labels and difficulty must have shape ({n},)")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The images at ``indices`` (in that order) with their labels and difficulty."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        difficulty = None if self.difficulty is None else self.difficulty[idx.to(self.difficulty.device)]
        return ImageDataset(self.images[idx.to(self.images.device)], self.labels[idx.to(self.labels.device)],
                            list(self.classes), difficulty, self.name)


# ----------------------------------------------------------------------------- synthetic shapes
def make_synthetic(
    num_images: int, num_classes: int = 10, image_size: int = 32, seed: int = 0, difficulty_levels: int = 4
) -> ImageDataset:
    """The built-in synthetic dataset (arguments: ``backbone.data.synthetic.render_synthetic``)."""
    images, labels, difficulty, classes = render_synthetic(num_images, num_classes, image_size, seed, difficulty_levels)
    return ImageDataset(images, labels, classes, difficulty, "synthetic")


# ----------------------------------------------------------------------------- CIFAR-10 / CIFAR-100
CIFAR_LAYOUT = {  # name: (folder, train files, test files, meta file, label key, class-names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}
# A pickle runs whatever callables it names, so only those that rebuild an ndarray are allowed
# (plus _codecs.encode, which protocol-2 pickles written by Python 3 use for bytes).
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}
_NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only NumPy arrays and plain containers; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if _NUMPY_2 and module.startswith("numpy.core."):  # numpy 2 renamed it (old name warns)
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # whatever went wrong, the file is not a CIFAR pickle we can use
        raise DatasetError(f"cannot read CIFAR file {path}: {exc}") from exc
    if not isinstance(content, dict):
        raise DatasetError(f"cannot read CIFAR file {path}: expected a dict, got {type(content).__name__}")
    return content


def load_cifar(name: str, root: str | os.PathLike, train: bool, download: bool = False) -> ImageDataset:
    """CIFAR-10, or CIFAR-100 with its 100 fine labels, read from ``<root>/cifar-10-batches-py/``
    or ``<root>/cifar-100-python/`` (the "python version" archives).

    ``train``: training split (else test). ``download``: if the folder is missing, let
    torchvision fetch and extract it into ``root`` (needs internet).
    """
    if name not in CIFAR_LAYOUT:
        raise DatasetError(f"unknown CIFAR dataset {name!r}: expected one of {sorted(CIFAR_LAYOUT)}")
    folder, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    directory, files = Path(root) / folder, (train_files if train else test_files)
    missing = not all((directory / f).is_file() for f in files + [meta_file])
    if missing and download:
        import torchvision

        try:
            getattr(torchvision.datasets, name.upper())(str(root), train=train, download=True)
            missing = False
        except (OSError, RuntimeError) as exc:  # no internet: urllib's URLError is an OSError
            log.warning("downloading %s failed: %s", name, exc)
    if missing:
        raise DatasetError(
            f"{name} not found: expected the folder {directory}/ containing {', '.join(files + [meta_file])}. "
            f"Download the python version from {CIFAR_URL} and extract it into {Path(root)}/, "
            "or set `download: true` to fetch it (needs internet)."
        )
    names = _read_pickle(directory / meta_file).get(names_key, [])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    images, labels = [], []
    for file in files:
        batch = _read_pickle(directory / file)
        rows, batch_labels = batch.get(b"data"), batch.get(label_key)
        if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.shape[1] != 3072 \
                or batch_labels is None or len(batch_labels) != len(rows):
            raise DatasetError(f"cannot read CIFAR file {directory / file}: expected b'data' (N, 3072) and {label_key!r} (N,)")
        # A row holds the red, green, then blue 32x32 plane, each row-major: exactly CHW order.
        images.append(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8)).view(-1, 3, 32, 32))
        labels.append(torch.as_tensor(np.asarray(batch_labels, dtype=np.int64)))
    labels_t = torch.cat(labels)
    if len(labels_t) and not 0 <= labels_t.min() <= labels_t.max() < len(classes):
        raise DatasetError(f"{directory / meta_file}: {names_key!r} lists {len(classes)} classes, too few for the labels")
    return ImageDataset(torch.cat(images), labels_t, classes, None, name)


# ----------------------------------------------------------------------------- entry point, split
def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    synthetic_size: int | None = None,
    seed: int = 0,
    num_classes: int = 10,
    progress: bool = True,
    image_size: int | None = None,
) -> ImageDataset:
    """The training (``train=True``) or test split of dataset ``name``, one of ``DATASETS``.

    ``root``: cifar: folder holding ``cifar-*-python`` (default ``data``); imagefolder: the tree
    (required). ``download``: cifar only. ``cache_dir``, ``progress``: imagefolder only.
    ``synthetic_size``, ``seed``, ``num_classes``, ``image_size`` (default 32): synthetic only; the size
    defaults to ``SYNTHETIC_SIZES``, and the splits use seeds ``2 * seed`` (train) and ``2 * seed + 1`` (test).
    A streamed dataset is not loaded into memory: see ``backbone.data.streaming.scan_imagefolder``.
    """
    if name == "synthetic":
        size = SYNTHETIC_SIZES["train" if train else "test"] if synthetic_size is None else synthetic_size
        return make_synthetic(size, num_classes=num_classes, image_size=image_size or 32, seed=2 * seed + (0 if train else 1))
    if name in CIFAR_LAYOUT:
        return load_cifar(name, "data" if root is None else root, train, download)
    if name == "imagefolder":
        if root is None:
            raise DatasetError("dataset 'imagefolder' needs a root folder holding train/ and test/")
        return load_imagefolder(root, train, cache_dir, progress)
    if name in STREAMED_DATASETS:
        raise DatasetError(f"dataset {name!r} streams from disk and is never loaded whole: list it with "
                           "backbone.data.streaming.scan_imagefolder (or load_splits) and batch it with make_loader")
    raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def split_train_val(dataset: ImageDataset, val_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split into (train, val), stratified: each class puts ``val_fraction`` of its images in val.

    Deterministic in ``seed``; both parts keep the original order; every class keeps at least
    one training image. Used to hold out images the backbone never trained on for the policy.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    labels, in_val = dataset.labels.cpu(), torch.zeros(len(dataset), dtype=torch.bool)
    for cls in range(dataset.num_classes):
        members = (labels == cls).nonzero().squeeze(1)
        n_val = min(round(len(members) * val_fraction), max(len(members) - 1, 0))
        in_val[members[torch.randperm(len(members), generator=g)[:n_val]]] = True
    return dataset.subset(torch.nonzero(~in_val).squeeze(1)), dataset.subset(torch.nonzero(in_val).squeeze(1))


@dataclass
class DataConfig:
    """The data of a run: dataset ``name`` (one of ``DATASETS``) and how it is split.

    ``val_fraction`` of the training split is held out (stratified, seeded by ``split_seed``):
    the backbone never trains on it, so the policy can learn on images the backbone has not
    memorised. ``max_train_images``/``max_test_images`` take a stratified subset (quick CPU runs
    on real data). ``train_size``, ``test_size``, ``num_classes``, ``seed``: synthetic data only.
    ``max_policy_images``: a stratified subset of the policy's held-out images (null: all). Streamed,
    they and the test split are decoded into memory for the env: 10k ImageNet images at 224 px ≈ 1.5 GB.

    ``streamed_imagefolder``: an ImageFolder tree too large for memory (ImageNet: ``root/train`` and
    ``root/val``), streamed by ``backbone.data.streaming``; ``image_size`` is its crop size (default
    224) and ``num_workers`` its decoding processes. ``image_size`` also renders synthetic images at
    that size (default 32); CIFAR and in-memory image folders keep their stored size.
    """

    name: str = "synthetic"
    root: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    split_seed: int = 0
    max_train_images: int | None = None
    max_test_images: int | None = None
    train_size: int = SYNTHETIC_SIZES["train"]
    test_size: int = SYNTHETIC_SIZES["test"]
    num_classes: int = 10
    seed: int = 0
    cache_dir: str | None = None
    image_size: int | None = None
    num_workers: int = 4
    max_policy_images: int | None = None

    @property
    def streamed(self) -> bool:
        """Whether the splits are files streamed from disk (``ImageFiles``), not in-memory images."""
        return self.name in STREAMED_DATASETS

    def __post_init__(self) -> None:
        checks = [
            (self.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}, got {self.name!r}"),
            (0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.train_size >= 1 and self.test_size >= 1, "data.train_size and data.test_size must be >= 1"),
            (1 <= self.num_classes <= len(SHAPES), f"data.num_classes must be in [1, {len(SHAPES)}]"),
            (all(n is None or n >= 1 for n in (self.max_train_images, self.max_test_images, self.max_policy_images)),
             "data.max_train_images / max_test_images / max_policy_images must be >= 1 (or null for all)"),
            (self.image_size is None or self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}"),
            (self.image_size is None or self.name in ("synthetic", *STREAMED_DATASETS),
             f"data.image_size applies to synthetic and streamed data only; {self.name} images keep their size"),
            (self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class Splits:
    """``train``: the backbone's training images; ``val``: held out of the training split;
    ``test``: the test split, for final evaluation only."""

    train: ImageDataset  # or, for a streamed dataset, backbone.data.streaming.ImageFiles
    val: ImageDataset
    test: ImageDataset


def load_splits(cfg: DataConfig) -> Splits:
    """Load train/val/test of ``cfg`` (decoding or generating once; cached where possible).

    For a streamed dataset (``cfg.streamed``) the splits are ``backbone.data.streaming.ImageFiles``
    (file lists, split the same way); ``backbone.data.streaming.make_loader`` batches either kind.
    """
    if cfg.streamed:
        from backbone.data.streaming import scan_imagefolder  # streaming imports this module

        if cfg.root is None:
            raise DatasetError(f"dataset {cfg.name!r} needs data.root, the folder holding train/ and val/")
        read = dict(image_size=cfg.image_size or 224, num_workers=cfg.num_workers)
        full_train, test = scan_imagefolder(cfg.root, True, **read), scan_imagefolder(cfg.root, False, **read)
    else:
        kwargs = dict(root=cfg.root, download=cfg.download, cache_dir=cfg.cache_dir, seed=cfg.seed,
                      num_classes=cfg.num_classes, image_size=cfg.image_size)
        full_train = load_dataset(cfg.name, train=True, synthetic_size=cfg.train_size, **kwargs)
        test = load_dataset(cfg.name, train=False, synthetic_size=cfg.test_size, **kwargs)
    full_train = stratified_subset(full_train, cfg.max_train_images, cfg.split_seed)
    test = stratified_subset(test, cfg.max_test_images, cfg.split_seed)
    train, val = split_train_val(full_train, cfg.val_fraction, cfg.split_seed)
    return Splits(train, val, test)


def stratified_subset(dataset, size: int | None, seed: int):
    """At most ``size`` images of ``dataset`` (an ``ImageDataset`` or ``ImageFiles``), the same
    share of every class, in their order; ``dataset`` itself when ``size`` is None or not smaller."""
    if size is None or size >= len(dataset):
        return dataset
    return split_train_val(dataset, size / len(dataset), seed)[1]
