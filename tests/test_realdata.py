"""Real-data checks on ../shared/data/cifar10-jpg (marker ``realdata``; a few minutes on 2 CPU cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbone import build_resnet
from backbone.data.datasets import DataConfig, load_splits
from backbone.training.loop import TrainConfig, evaluate, train
from backbone.models.weights import load_weights

pytestmark = pytest.mark.realdata
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """ResNet-14 on thousands of real images: here the second core pays off."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def real_splits(cifar10_jpg, tmp_path_factory):
    cfg = DataConfig(name="imagefolder", root=str(cifar10_jpg), val_fraction=0.1, max_train_images=6000,
                     max_test_images=2000, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return cfg, load_splits(cfg)


@pytest.fixture(scope="module")
def trained(real_splits):
    _, splits = real_splits
    torch.manual_seed(0)
    model = build_resnet(14, num_classes=10, width=8)
    train(model, splits.train, None, TrainConfig(epochs=5, batch_size=64, lr=0.1, warmup_epochs=0))
    return model


def test_stratified_real_splits(real_splits):
    _, splits = real_splits
    assert len(splits.test) == 2000 and len(splits.train) + len(splits.val) == 6000
    assert torch.bincount(splits.test.labels).tolist() == [200] * 10
    assert splits.train.classes[0] == "airplane" and splits.train.classes[-1] == "truck"


def test_short_training_on_real_images_beats_chance(trained, real_splits):
    _, splits = real_splits
    assert evaluate(trained, splits.test)["accuracy"] > 0.3  # chance is 0.1


def test_public_layout_checkpoint_imports_and_scores_the_same(trained, real_splits, tmp_path):
    """A checkpoint as the widely used option-A CIFAR ResNets publish it: DataParallel 'module.'
    prefix, classifier 'linear', nested under 'state_dict' with a 'best_prec1' entry."""
    data_cfg, splits = real_splits
    public = {
        "state_dict": {f"module.{k.replace('fc.', 'linear.')}": v for k, v in trained.state_dict().items()},
        "best_prec1": 42.0,
    }
    path = tmp_path / "resnet14_public.th"
    torch.save(public, path)
    imported = load_weights(build_resnet(14, num_classes=10, width=8), path)
    expected = evaluate(trained, splits.test)
    assert evaluate(imported, splits.test) == expected

    # The same through the command line, as a user evaluates an imported checkpoint.
    overrides = [f"data.{k}={v}" for k, v in (("root", data_cfg.root), ("max_train_images", 6000),
                                               ("max_test_images", 2000), ("cache_dir", data_cfg.cache_dir))]
    overrides += ["model.arch=resnet14", "model.width=8", f"model.init_checkpoint={path}", "pretrain.epochs=0",
                  f"output_dir={tmp_path}", "name=imported"]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "--config", "cifar10jpg_resnet20"]
        + [a for o in overrides for a in ("--set", o)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "imported" / "metrics.json").read_text())["pretrain"]
    assert metrics["test_accuracy"] == pytest.approx(expected["accuracy"])
