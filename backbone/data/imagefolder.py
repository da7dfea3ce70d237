"""ImageFolder trees (``root/<split>/<class>/*.jpg|jpeg|png``): listing, decoding and the decode cache.

One listing serves both data paths: :func:`load_imagefolder` decodes a small tree into memory
(cached on disk, so it is decoded once), ``backbone.data.streaming.scan_imagefolder`` keeps the
file names of a large one and decodes in loader workers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch

from backbone.errors import DatasetError, DyndepthError
from backbone.files import write_atomically

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def default_cache_dir() -> Path:
    """``$DYNDEPTH_CACHE`` if set, else ``~/.cache/dyndepth``."""
    return Path(os.environ.get("DYNDEPTH_CACHE") or Path.home() / ".cache" / "dyndepth")


def list_images(root: Path, split_dir: Path) -> tuple[list[str], list[tuple[str, int, os.DirEntry]]]:
    """The classes (the sub-folders of ``root/train``, alphabetical, for every split) and the
    image files of ``split_dir``: ``(path relative to split_dir, label, directory entry)`` by
    class, then file name (no ``stat`` here: a streamed ImageNet split does not need 1.3M of
    them). Class folders unknown to ``root/train`` and a split without images are errors."""
    classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
    unknown = sorted({e.name for e in os.scandir(split_dir) if e.is_dir()} - set(classes))
    if unknown:
        raise DatasetError(f"{split_dir}: class folders {unknown[:5]} are missing from {root / 'train'}")
    files = []
    for label, cls in enumerate(classes):
        if (split_dir / cls).is_dir():
            for entry in sorted(os.scandir(split_dir / cls), key=lambda e: e.name):
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((f"{cls}/{entry.name}", label, entry))
    if not files:
        raise DatasetError(f"no .jpg/.jpeg/.png images found in {split_dir}/<class>/")
    return classes, files


def decode_image_file(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB pixels of a JPEG or PNG file."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)


def load_imagefolder(root: str | os.PathLike, train: bool, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True):
    """Images from ``<root>/{train,test}/<class>/*.jpg|jpeg|png`` as an ``ImageDataset``.

    The classes are the sub-folders of ``<root>/train`` in alphabetical order, for both splits;
    other files are ignored; all images must have one size. The decoded split is cached in
    ``cache_dir`` (default :func:`default_cache_dir`) under a hash of the folder's absolute path,
    the split and every file's (path, size, mtime), so a changed tree is decoded afresh.
    ``progress``: show a progress bar while decoding.
    """
    from backbone.data.datasets import ImageDataset  # datasets imports this module

    root, split = Path(root).expanduser().resolve(), ("train" if train else "test")
    split_dir = root / split
    if not (root / "train").is_dir() or not split_dir.is_dir():
        raise DatasetError(f"image folder not found: expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    classes, files = list_images(root, split_dir)
    key = hashlib.sha256(f"imagefolder-v1\0{root}\0{split}".encode())
    for rel, _, entry in files:
        st = entry.stat()
        key.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    cache_file = Path(cache_dir or default_cache_dir()) / f"imagefolder-{root.name}-{split}-{key.hexdigest()[:20]}.pt"
    labels = torch.tensor([label for _, label, _ in files], dtype=torch.long)
    images = _load_cache(cache_file, labels, classes)
    if images is None:
        images = _decode_all(split_dir, [rel for rel, _, _ in files], progress)
        _save_cache(cache_file, {"images": images, "labels": labels, "classes": classes})
    return ImageDataset(images, labels, classes, None, root.name)


def _decode_all(split_dir: Path, files: list[str], progress: bool) -> torch.Tensor:
    from tqdm import tqdm

    images = None
    with warnings.catch_warnings():  # torchvision >= 0.29 warns on every decode call
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        for i, rel in enumerate(tqdm(files, desc=f"decoding {split_dir}", disable=not progress, unit="img")):
            try:
                img = decode_image_file(split_dir / rel)
            except (RuntimeError, OSError, ValueError) as exc:  # ValueError: empty file
                raise DatasetError(f"cannot decode image {split_dir / rel}: {exc}") from exc
            if images is None:  # the first image fixes the size of all
                images = torch.empty((len(files),) + tuple(img.shape), dtype=torch.uint8)
            elif img.shape != images.shape[1:]:
                raise DatasetError(f"{split_dir / rel} is {tuple(img.shape[1:])} pixels but {split_dir / files[0]} "
                                   f"is {tuple(images.shape[2:])}: all images must have one size")
            images[i] = img
    return images


def _load_cache(path: Path, labels: torch.Tensor, classes: list[str]) -> torch.Tensor | None:
    """The cached images, or None if the cache is missing, unreadable or does not fit."""
    if not path.is_file():
        return None
    try:
        content = torch.load(path, weights_only=True)
        images = content["images"]
        if content["classes"] == classes and torch.equal(content["labels"], labels) \
                and images.dtype == torch.uint8 and images.dim() == 4 and len(images) == len(labels):
            return images
        log.warning("ignoring cache %s: it does not match the image folder", path)
    except Exception as exc:  # a cache is disposable: any problem just means decoding again
        log.warning("ignoring unreadable cache %s: %s", path, exc)
    return None


def _save_cache(path: Path, content: dict) -> None:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    try:
        write_atomically(path, buffer.getbuffer(), what="image cache", error=DatasetError)
    except DyndepthError as exc:  # without a cache the next run is slower, not wrong
        log.warning("%s", exc)
