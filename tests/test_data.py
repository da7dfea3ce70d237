"""Datasets, cache, split, augmentation and batching (backbone/data.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg, write_png

from backbone.data import datasets as data
from backbone.data import imagefolder
from backbone.data.batching import BatchLoader, augment_batch
from backbone.data.datasets import (
    ImageDataset,
    load_cifar,
    load_dataset,
    load_imagefolder,
    make_synthetic,
    split_train_val,
)
from backbone.errors import DatasetError

# write_png/encode_jpeg in the fixtures trigger torchvision's deprecation notice on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")



# ---------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_in_the_seed():
    a, b, c = make_synthetic(300, seed=5), make_synthetic(300, seed=5), make_synthetic(300, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.difficulty, b.difficulty)
    assert not torch.equal(a.images, c.images)


def test_synthetic_shapes_labels_and_levels():
    ds = make_synthetic(400, num_classes=7, image_size=24, seed=1, difficulty_levels=4)
    assert ds.images.shape == (400, 3, 24, 24) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.difficulty.dtype == torch.int64
    assert ds.num_classes == 7 and ds.classes[:3] == ["disk", "ring", "square"]
    assert torch.bincount(ds.labels, minlength=7).tolist() == [58] + [57] * 6  # balanced
    assert torch.bincount(ds.difficulty).tolist() == [100, 100, 100, 100]
    assert len(ds) == 400 and ds.images.float().std() > 20  # not blank


def _noise_level(images: torch.Tensor) -> torch.Tensor:
    """Median |pixel - 3x3 local mean| per image: near 0 on clean flat regions, grows with noise."""
    x = images.float()
    local_mean = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (x - local_mean).abs().flatten(1).median(1).values


def test_synthetic_difficulty_degrades_images():
    ds = make_synthetic(800, seed=2)
    noise = torch.stack([_noise_level(ds.images[ds.difficulty == lvl]).mean() for lvl in range(4)])
    assert noise[0] < 1.0  # the easiest level is clean
    assert (noise[1:] > noise[:-1] + 2).all(), noise  # every level is clearly noisier
    # Harder levels draw smaller, lower-contrast shapes: less spread between pixel values.
    spread = torch.stack([ds.images[ds.difficulty == lvl].float().std((1, 2, 3)).mean() for lvl in range(4)])
    assert spread[0] > 1.5 * spread[3], spread


def test_load_dataset_synthetic_uses_distinct_seeds_per_split():
    train = load_dataset("synthetic", train=True, synthetic_size=60, seed=3, num_classes=5)
    test = load_dataset("synthetic", train=False, synthetic_size=60, seed=3, num_classes=5)
    assert torch.equal(train.images, make_synthetic(60, num_classes=5, seed=6).images)
    assert torch.equal(test.images, make_synthetic(60, num_classes=5, seed=7).images)
    assert train.num_classes == 5 and len(load_dataset("synthetic", train=False)) == data.SYNTHETIC_SIZES["test"]

def _write_pickle(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _fake_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_fake_cifar100_loads_with_chw_layout(tmp_path, protocol):
    folder = tmp_path / "cifar-100-python"
    rows = _fake_rows(6, 0)
    rows[2, 1024 + 5 * 32 + 7] = 201  # green channel (c=1), row 5, column 7 of image 2
    names = [f"class{i}".encode() for i in range(100)]
    _write_pickle(folder / "train", {b"data": rows, b"fine_labels": [0, 1, 2, 99, 5, 5], b"coarse_labels": [0] * 6}, protocol)
    _write_pickle(folder / "test", {b"data": _fake_rows(3, 1), b"fine_labels": [7, 8, 9]}, protocol)
    _write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []}, protocol)

    train = load_cifar("cifar100", tmp_path, train=True)
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 2, 99, 5, 5] and train.classes[99] == "class99"
    assert train.images[2, 1, 5, 7] == 201
    assert torch.equal(train.images.flatten(1), torch.from_numpy(rows))
    test = load_dataset("cifar100", root=tmp_path, train=False)
    assert len(test) == 3 and test.labels.tolist() == [7, 8, 9] and test.num_classes == 100


def test_fake_cifar10_loads_all_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", {b"data": _fake_rows(2, i), b"labels": [i, i], b"batch_label": b"x"})
    _write_pickle(folder / "test_batch", {b"data": _fake_rows(4, 9), b"labels": [0, 1, 2, 3]})
    _write_pickle(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile"] + [b"c"] * 8})
    train = load_cifar("cifar10", tmp_path, train=True)
    assert len(train) == 10 and train.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert train.classes[:2] == ["airplane", "automobile"] and train.difficulty is None
    assert len(load_cifar("cifar10", tmp_path, train=False)) == 4


def test_missing_cifar_names_the_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar100", root=tmp_path, download=False)
    message = str(err.value)
    assert "cifar-100-python" in message and "cs.toronto.edu" in message and "download" in message


def test_cifar_download_failure_is_a_dataset_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_cifar("cifar10", tmp_path, train=True, download=True)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_forbidden_global_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    marker = tmp_path / "pwned"
    _write_pickle(folder / "train", {b"data": _Exploit(marker), b"fine_labels": []})
    _write_pickle(folder / "meta", {b"fine_label_names": [b"a"]})
    with pytest.raises(DatasetError, match="train.*system|system.*train"):
        load_cifar("cifar100", tmp_path, train=True)
    assert not marker.exists()


def test_corrupt_cifar_file_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_pickle(folder / "meta", {b"fine_label_names": [b"a"]})
    (folder / "test").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DatasetError, match="cifar-100-python/test"):
        load_cifar("cifar100", tmp_path, train=False)


# ---------------------------------------------------------------------------------- imagefolder
def _image(seed: int, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _write_tree(root: Path, sizes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """root/{train,test}/{cat,ant,bee}/: PNGs (lossless, so pixels can be compared) and one JPEG."""
    written = {}
    for split, count in (("train", 3), ("test", 2)):
        for c, cls in enumerate(["cat", "ant", "bee"]):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                rel = f"{split}/{cls}/{i}.png"
                img = _image(100 * c + 10 * i + len(split), (sizes or {}).get(rel, 8))
                write_png(img, str(root / rel))
                written[rel] = img
    (root / "train" / "bee" / "x.jpg").write_bytes(encode_jpeg(_image(7)).numpy().tobytes())
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    return written


def test_imagefolder_loads_and_uses_the_cache(tmp_path, monkeypatch):
    written = _write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    train = load_imagefolder(tmp_path / "tree", train=True, cache_dir=cache, progress=False)
    assert train.classes == ["ant", "bee", "cat"]  # alphabetical, like torchvision
    assert train.images.shape == (10, 3, 8, 8) and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert torch.equal(train.images[0], written["train/ant/0.png"])
    assert torch.equal(train.images[9], written["train/cat/2.png"])
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp"))

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(imagefolder, "decode_image_file", no_decoding)
    again = load_dataset("imagefolder", root=tmp_path / "tree", train=True, cache_dir=cache, progress=False)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert again.classes == train.classes


def test_imagefolder_cache_is_invalidated_and_survives_corruption(tmp_path):
    _write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    test = load_imagefolder(tmp_path / "tree", train=False, cache_dir=cache, progress=False)
    assert len(test) == 6
    (cache_file,) = cache.glob("*.pt")
    cache_file.write_bytes(b"garbage")
    assert torch.equal(load_imagefolder(tmp_path / "tree", False, cache, progress=False).images, test.images)
    assert torch.load(cache_file, weights_only=True)["images"].shape == (6, 3, 8, 8)  # rewritten
    write_png(_image(99), str(tmp_path / "tree" / "test" / "ant" / "new.png"))
    assert len(load_imagefolder(tmp_path / "tree", False, cache, progress=False)) == 7


def test_imagefolder_rejects_mixed_sizes_and_missing_splits(tmp_path):
    _write_tree(tmp_path / "tree", sizes={"train/bee/1.png": 9})
    with pytest.raises(DatasetError, match="bee/1.png"):
        load_imagefolder(tmp_path / "tree", train=True, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DatasetError, match="train"):
        load_imagefolder(tmp_path / "nowhere", train=True, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_imagefolder_names_an_undecodable_image(tmp_path, content):
    _write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "cat" / "broken.jpg").write_bytes(content)
    with pytest.raises(DatasetError, match="cat/broken.jpg"):
        load_imagefolder(tmp_path / "tree", train=False, cache_dir=tmp_path / "cache", progress=False)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError, match="synthetic.*cifar10.*cifar100.*imagefolder"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------- split
def _indexed(labels: list[int]) -> ImageDataset:
    """A dataset whose image i stores i in its first two pixels, so subsets can be traced back."""
    n = len(labels)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return ImageDataset(images, torch.tensor(labels), ["a", "b", "c"], torch.arange(n) % 4, "indexed")


def _ids(ds: ImageDataset) -> list[int]:
    return (ds.images[:, 0, 0, 0].long() + 256 * ds.images[:, 0, 0, 1].long()).tolist()


def test_split_train_val_is_stratified_disjoint_and_deterministic():
    ds = _indexed([0] * 100 + [1] * 300 + [2] * 200)
    train, val = split_train_val(ds, 0.2, seed=1)
    assert torch.bincount(val.labels).tolist() == [20, 60, 40]
    assert set(_ids(train)).isdisjoint(_ids(val)) and sorted(_ids(train) + _ids(val)) == list(range(600))
    assert _ids(val) == sorted(_ids(val))  # original order kept
    assert val.difficulty.tolist() == [i % 4 for i in _ids(val)]  # difficulty follows its image
    assert _ids(split_train_val(ds, 0.2, seed=1)[1]) == _ids(val)
    assert _ids(split_train_val(ds, 0.2, seed=2)[1]) != _ids(val)


def test_split_train_val_edge_cases():
    ds = make_synthetic(50)
    train, val = split_train_val(ds, 0.0, seed=0)
    assert len(train) == 50 and len(val) == 0 and val.images.shape[1:] == (3, 32, 32)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            split_train_val(ds, bad, seed=0)


# ---------------------------------------------------------------------------------- augmentation
def test_augment_identity_mirror_and_shifted_window():
    images = make_synthetic(16, seed=4).images
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert out.dtype == torch.uint8 and torch.equal(out, images)

    # padding=0 leaves only the flip; compare each image with itself mirrored or unchanged.
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=0, flip=True)
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert (mirrored | unchanged).all() and mirrored.any() and unchanged.any()

    # With padding, each output is one 32x32 window of its zero-padded image (without a flip).
    out = augment_batch(images, torch.Generator().manual_seed(1), padding=4, flip=False)
    padded = F.pad(images, (4, 4, 4, 4))
    offsets = []
    for k in range(16):
        windows = [(y, x) for y in range(9) for x in range(9) if torch.equal(out[k], padded[k, :, y : y + 32, x : x + 32])]
        assert windows, f"image {k} is not a window of the padded image"
        offsets.append(windows[0])
    assert len(set(offsets)) > 4  # the offsets vary between images


def test_augment_depends_on_the_generator_seed():
    images = make_synthetic(64, seed=4).images
    a = augment_batch(images, torch.Generator().manual_seed(0))
    b = augment_batch(images, torch.Generator().manual_seed(0))
    c = augment_batch(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------- loader
def _order(batches) -> list[int]:
    """Indices of the images in a sequence of batches of an ``_indexed`` dataset, checking labels."""
    ids = []
    for images, labels in batches:
        batch_ids = _ids(ImageDataset(images, labels, ["a", "b", "c"]))
        assert labels.tolist() == [i % 3 for i in batch_ids]  # each label travels with its image
        ids += batch_ids
    return ids


def test_batch_loader_epochs_are_permutations_and_reproducible():
    ds = _indexed([i % 3 for i in range(103)])
    loader = BatchLoader(ds, batch_size=10, seed=7)
    assert len(loader) == 11
    epoch0 = _order(loader.epoch_batches(0))
    assert sorted(epoch0) == list(range(103)) and epoch0 != list(range(103))  # each sample once, shuffled
    assert _order(loader.epoch_batches(0)) == epoch0  # replayable
    assert _order(loader.epoch_batches(1)) != epoch0
    loader.set_epoch(1)
    assert _order(loader) == _order(loader.epoch_batches(1))
    assert _order(BatchLoader(ds, 10, seed=8).epoch_batches(0)) != epoch0  # the seed matters


def test_batch_loader_drop_last_eval_order_and_augment():
    ds = make_synthetic(103, seed=3)
    loader = BatchLoader(ds, 10, drop_last=True)
    assert len(loader) == 10 and all(len(labels) == 10 for _, labels in loader)
    evaluation = BatchLoader(ds, 25, shuffle=False)
    assert torch.equal(torch.cat([images for images, _ in evaluation]), ds.images)
    augmented = BatchLoader(ds, 25, shuffle=False, augment=True, seed=1)
    first = [images for images, _ in augmented.epoch_batches(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in augmented.epoch_batches(3)]))
    assert not torch.equal(torch.cat(first), ds.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_loader_on_cuda_matches_cpu():
    ds = make_synthetic(100, seed=3)
    cpu = list(BatchLoader(ds, 32, augment=True, seed=5).epoch_batches(2))
    gpu = list(BatchLoader(ds, 32, augment=True, seed=5, device="cuda").epoch_batches(2))
    for (ci, cl), (gi, gl) in zip(cpu, gpu):
        assert gi.device.type == "cuda" and torch.equal(gi.cpu(), ci) and torch.equal(gl.cpu(), cl)
    assert augment_batch(ds.images.cuda()).device.type == "cuda"  # global CUDA RNG when no generator


# ---------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_cifar10_jpg_test_split(cifar10_jpg, tmp_path):
    test = load_imagefolder(cifar10_jpg, train=False, cache_dir=tmp_path, progress=False)
    assert test.images.shape == (10_000, 3, 32, 32)
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    cached = load_imagefolder(cifar10_jpg, train=False, cache_dir=tmp_path, progress=False)
    assert torch.equal(cached.images, test.images)
