"""Streamed ImageFolder trees: uint8 batches from worker processes, ImageNet's transforms,
deterministic and resumable order, selection through DataConfig, and synthetic data at any size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as T
from torchvision.io import encode_jpeg, encode_png

from backbone.data.batching import BatchLoader
from backbone.data.datasets import DataConfig, load_splits, make_synthetic
from backbone.data.imagefolder import decode_image_file
from backbone.data.streaming import (BatchSource, ImageFiles, StreamingLoader, make_loader, random_resized_crop_box,
                                     scan_imagefolder)
from backbone.errors import ConfigError, DatasetError

# The tests encode and decode reference images with torchvision.io, which warns on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CLASSES = ("n01", "n02", "n03")  # ImageNet-style class folders


def write_tree(root: Path, per_class: dict[str, int], split_names=("train", "val")) -> Path:
    """A tiny ImageNet-layout tree of JPEGs (and one PNG, one greyscale JPEG) of mixed sizes."""
    sizes = [(40, 56), (64, 48), (50, 50), (72, 60)]
    for split in split_names:
        count = per_class[split]
        shapes = make_synthetic(len(CLASSES) * count, num_classes=3, image_size=72, seed=len(split))
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = sizes[(c + i) % len(sizes)]
                image = shapes.images[c * count + i][:, :h, :w].contiguous()
                if i == 1 and c == 0:
                    (root / split / cls / f"{cls}_{i}.png").write_bytes(encode_png(image).numpy().tobytes())
                    continue
                if i == 2 and c == 1:
                    image = image[:1]  # greyscale: decoded to RGB
                (root / split / cls / f"{cls}_{i}.JPEG").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
            (root / split / cls / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "imagenet", {"train": 4, "val": 2})


def collect(batches) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


def test_scan_lists_images_by_class_then_name(tree):
    train, val = scan_imagefolder(tree, train=True), scan_imagefolder(tree, train=False)
    assert train.classes == list(CLASSES) and len(train) == 12 and len(val) == 6
    assert val.root == tree.resolve() / "val" and val.path(0).name == "n01_0.JPEG"
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and train.labels.dtype == torch.int64
    subset = train.subset([5, 0])
    assert subset.labels.tolist() == [1, 0] and subset.path(1) == train.path(0)


def test_scan_errors_name_the_folder(tmp_path, tree):
    with pytest.raises(DatasetError, match="image folder not found.*val/<class>"):
        scan_imagefolder(tmp_path / "nowhere", train=True)
    (tree / "val" / "n99").mkdir()
    with pytest.raises(DatasetError, match=r"class folders \['n99'\] are missing"):
        scan_imagefolder(tree, train=False)
    test_named = write_tree(tmp_path / "cifar_like", {"train": 1, "test": 1}, ("train", "test"))
    assert scan_imagefolder(test_named, train=False).root.name == "test"  # test/ stands in for val/


def test_eval_batches_are_resized_centre_crops_in_order(tree):
    files = scan_imagefolder(tree, train=False)
    loader = StreamingLoader(files, batch_size=4, shuffle=False, image_size=32, num_workers=0)
    assert len(loader) == 2 and isinstance(loader, BatchSource)
    images, labels = collect(loader.epoch_batches(0))
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    assert torch.equal(labels, files.labels)
    reference = T.Compose([T.Resize(round(32 / 0.875), antialias=True), T.CenterCrop(32)])
    for i in range(6):
        assert torch.equal(images[i], reference(decode_image_file(files.path(i)).expand(3, -1, -1)))
    assert len(StreamingLoader(files, 4, drop_last=True, num_workers=0)) == 1


def test_order_and_crops_replay_exactly_with_workers_and_after_a_resume(tree):
    files = scan_imagefolder(tree, train=True)

    def loader(workers, seed=0):
        return StreamingLoader(files, 5, shuffle=True, augment=True, image_size=24, num_workers=workers, seed=seed)

    in_process = list(loader(0).epoch_batches(1))
    images, labels = collect(in_process)
    assert images.shape == (12, 3, 24, 24) and len(in_process) == 3
    assert sorted(labels.tolist()) == sorted(files.labels.tolist())  # every image once
    with_workers = collect(loader(2).epoch_batches(1))
    assert torch.equal(with_workers[0], images) and torch.equal(with_workers[1], labels)
    resumed = collect(loader(1).epoch_batches(1, start=1))
    assert torch.equal(resumed[0], images[5:]) and torch.equal(resumed[1], labels[5:])
    assert not torch.equal(collect(loader(0).epoch_batches(2))[0], images)  # a new epoch, new order and crops
    assert not torch.equal(collect(loader(0, seed=1).epoch_batches(1))[0], images)
    assert list(loader(0).epoch_batches(1, start=3)) == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_global_batch_with_its_crops(tree, world_size):
    files = scan_imagefolder(tree, train=True)
    kwargs = dict(batch_size=6, augment=True, image_size=24, num_workers=0, seed=4)
    whole = list(StreamingLoader(files, **kwargs).epoch_batches(1))
    ranks = [list(StreamingLoader(files, rank=r, world_size=world_size, **kwargs).epoch_batches(1)) for r in range(world_size)]
    for i, (images, labels) in enumerate(whole):
        assert torch.equal(torch.cat([rank[i][0] for rank in ranks]), images)
        assert torch.equal(torch.cat([rank[i][1] for rank in ranks]), labels)
    with pytest.raises(ValueError, match="must split evenly"):
        StreamingLoader(files, 5, world_size=2)


def test_random_resized_crop_box_stays_inside_with_the_allowed_shapes():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 80, g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.08 * 0.8 <= h * w / (60 * 80) <= 1.0 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    # No crop of a very wide image fits the aspect range: the centred fallback, clamped to 4/3.
    assert random_resized_crop_box(10, 400, g) == (0, 193, 10, 13)


def test_corrupt_image_is_named_even_from_a_worker(tree):
    bad = tree / "val" / "n02" / "n02_9.JPEG"
    bad.write_bytes(b"\xff\xd8 truncated")
    for workers in (0, 1):
        loader = StreamingLoader(scan_imagefolder(tree, train=False), 8, shuffle=False, num_workers=workers)
        with pytest.raises(DatasetError, match="cannot decode image .*n02_9.JPEG"):
            list(loader.epoch_batches(0))


def test_data_config_selects_the_streamed_loader(tree):
    cfg = DataConfig(name="streamed_imagefolder", root=str(tree), image_size=32, num_workers=0, val_fraction=0.25)
    assert cfg.streamed and not DataConfig().streamed
    splits = load_splits(cfg)
    assert all(isinstance(s, ImageFiles) for s in (splits.train, splits.val, splits.test))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    assert splits.val.labels.tolist() == [0, 1, 2]  # stratified: one held-out image per class
    held_out = {p.decode() for p in splits.val.files}
    assert held_out.isdisjoint(p.decode() for p in splits.train.files)
    loader = make_loader(splits.train, 4, augment=True, image_size=cfg.image_size, num_workers=cfg.num_workers)
    assert isinstance(loader, StreamingLoader) and next(iter(loader))[0].shape == (4, 3, 32, 32)
    in_memory = make_loader(make_synthetic(8), 4)
    assert isinstance(in_memory, BatchLoader) and isinstance(in_memory, BatchSource)
    with pytest.raises(DatasetError, match="needs data.root"):
        load_splits(DataConfig(name="streamed_imagefolder"))


@pytest.mark.parametrize("fields, message", [
    (dict(name="cifar10", image_size=64), "image_size applies to synthetic and streamed data only"),
    (dict(name="streamed_imagefolder", image_size=4), "data.image_size must be >= 8"),
    (dict(name="streamed_imagefolder", num_workers=-1), "data.num_workers must be >= 0"),
])
def test_bad_data_config_is_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**fields)


@pytest.mark.parametrize("size", [64, 112, 224])
def test_synthetic_data_at_imagenet_like_sizes(size):
    data = make_synthetic(20, num_classes=5, image_size=size, seed=3)
    assert data.images.shape == (20, 3, size, size) and data.images.dtype == torch.uint8
    assert data.images.float().std() > 20  # shapes on a background, not a blank image
    if size == 64:
        splits = load_splits(DataConfig(train_size=20, test_size=10, image_size=64, val_fraction=0.2))
        assert splits.train.images.shape[-1] == splits.test.images.shape[-1] == 64


def test_streamed_batches_feed_a_torchvision_resnet_with_a_mask(tree):
    from backbone.models.torchvision_resnet import build_torchvision_resnet

    model = build_torchvision_resnet("resnet18", num_classes=3).eval()
    images, labels = next(iter(StreamingLoader(scan_imagefolder(tree, train=True), 4, image_size=64, num_workers=0)))
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1]] * 4, dtype=torch.bool)
    with torch.no_grad():
        assert model(images, mask).shape == (4, 3) and labels.shape == (4,)
