"""Checkpoints: round trip, public CIFAR-ResNet layouts, clear errors, atomic writes."""

from __future__ import annotations

import errno
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from backbone.errors import CheckpointError
from backbone.models.resnet import build_resnet
from backbone.models.weights import infer_arch, load_checkpoint, load_model, load_weights, save_checkpoint

INPUT = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))



def make_model(depth=8, num_classes=10, shortcut="A", width=4, seed=0, **kwargs):
    """A tiny net whose every tensor matters for the output.

    The builder zero-inits each block's last BN weight, which would make block weights invisible
    in the output; random BN parameters and statistics make a mis-loaded tensor show.
    """
    torch.manual_seed(seed)
    model = build_resnet(depth, num_classes, shortcut, width, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(seed + 7)
    return model.eval()


def outputs(model):
    with torch.no_grad():
        return model.eval()(INPUT)


def renamed(state, *, prefix="", fc="fc.", shortcut="shortcut.", drop_counters=False):
    """``state`` re-spelled the way a public repository might publish it."""
    out = {}
    for key, value in state.items():
        if drop_counters and key.endswith("num_batches_tracked"):
            continue
        key = key.replace("fc.", fc, 1) if key.startswith("fc.") else key.replace(".shortcut.", "." + shortcut)
        out[prefix + key] = value.clone()
    return out


# --- our format -----------------------------------------------------------------------------


def test_round_trip_restores_outputs_arch_and_extra(tmp_path):
    source = make_model(depth=14, num_classes=7, shortcut="B", width=6, normalization="cifar100")
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(INPUT).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [5, 8])  # milestones: a Counter
    source.eval()
    extra = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": 3,
        "metrics": {"top1": 0.5, "history": [0.1, 0.2]},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    path = save_checkpoint(tmp_path / "deep" / "dir" / "last.pt", source, **extra)
    assert path.is_file()

    model = load_model(path)
    assert model.arch == source.arch
    torch.testing.assert_close(outputs(model), outputs(source))
    checkpoint = load_checkpoint(path)
    assert (checkpoint["format"], checkpoint["version"]) == ("dyndepth", 1)
    assert checkpoint["epoch"] == 3 and checkpoint["metrics"] == extra["metrics"]
    assert torch.equal(checkpoint["rng"]["torch"], extra["rng"]["torch"])
    assert checkpoint["rng"]["python"] == extra["rng"]["python"]
    restored = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(checkpoint["optimizer"])  # loads back into a real optimizer
    torch.optim.lr_scheduler.MultiStepLR(restored, [1]).load_state_dict(checkpoint["scheduler"])


def test_wrapped_models_save_and_load_plain_keys(tmp_path):
    source = make_model()
    path = save_checkpoint(tmp_path / "ckpt.pt", nn.DataParallel(source))
    assert all(not k.startswith("module.") for k in load_checkpoint(path)["model"])
    target = nn.DataParallel(make_model(seed=1))
    assert load_weights(target, path) is target
    torch.testing.assert_close(outputs(target.module), outputs(source))


def test_extra_that_weights_only_could_not_read_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"metrics\['top1'\].*numpy"):
        save_checkpoint(tmp_path / "x.pt", make_model(), metrics={"top1": np.float64(0.5)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", make_model(), arch={})
    assert list(tmp_path.iterdir()) == []


def test_normalization_difference_warns(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", make_model(normalization="cifar100"))
    with pytest.warns(UserWarning, match="normalization"):
        load_weights(make_model(normalization="cifar10"), path)


# --- public layouts ---------------------------------------------------------------------------

LAYOUTS = {
    "bare": (dict(), lambda sd: sd),
    # akamaster/pytorch_resnet_cifar10: DataParallel keys, "linear" classifier, option A
    "akamaster": (dict(prefix="module.", fc="linear."), lambda sd: {"state_dict": sd, "best_prec1": 91.7}),
    "under_model": (dict(), lambda sd: {"model": sd, "epoch": 200}),
    # torchvision / chenyaofo style option-B shortcut names
    "downsample": (dict(shortcut="downsample."), lambda sd: sd),
    "no_counters": (dict(drop_counters=True), lambda sd: {"state_dict": sd}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_public_layouts_load_with_identical_outputs(tmp_path, layout, shortcut):
    rename, wrap = LAYOUTS[layout]
    source = make_model(depth=14, shortcut=shortcut)
    path = tmp_path / "public.th"
    torch.save(wrap(renamed(source.state_dict(), **rename)), path)

    target = load_weights(make_model(depth=14, shortcut=shortcut, seed=1), path)
    torch.testing.assert_close(outputs(target), outputs(source))
    # a state dict already in memory works the same way
    target = load_weights(make_model(depth=14, shortcut=shortcut, seed=2), wrap(renamed(source.state_dict(), **rename)))
    torch.testing.assert_close(outputs(target), outputs(source))


def test_infer_arch_reads_public_layouts():
    state = renamed(make_model(depth=20, num_classes=100, shortcut="B", width=8).state_dict(),
                    prefix="module.", fc="linear.", shortcut="downsample.")
    assert infer_arch({"state_dict": state}) == {"depth": 20, "num_classes": 100, "shortcut": "B", "width": 8}
    with pytest.raises(CheckpointError, match="not a CIFAR ResNet"):
        infer_arch({"features.0.weight": torch.zeros(3)})


def test_load_model_refuses_public_checkpoint_with_build_hint(tmp_path):
    path = tmp_path / "public.pt"
    torch.save(make_model(depth=14, num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"build_resnet\(14, num_classes=5, shortcut='A', width=4\).*load_weights"):
        load_model(path)


# --- mismatches -------------------------------------------------------------------------------


@pytest.mark.parametrize("ours", [True, False], ids=["dyndepth", "public"])
@pytest.mark.parametrize(
    "source_kwargs, model_kwargs, expected",
    [
        (dict(depth=20), dict(depth=8), ["3 blocks per stage (ResNet-20)", "has 1 (ResNet-8)"]),
        (dict(num_classes=100), dict(num_classes=10), ["classifier has 100 classes but the model 10"]),
        (dict(shortcut="B"), dict(shortcut="A"), ["option-B shortcuts (1x1 conv)", "shortcut='A'"]),
        (dict(shortcut="A"), dict(shortcut="B"), ["option-A shortcuts", "shortcut='B'"]),
        (dict(width=8), dict(width=4), ["width 8", "the model 4"]),
    ],
    ids=["depth", "classes", "B_into_A", "A_into_B", "width"],
)
def test_architecture_mismatch_is_named(tmp_path, ours, source_kwargs, model_kwargs, expected):
    source = make_model(**source_kwargs)
    path = tmp_path / "c.pt"
    if ours:
        save_checkpoint(path, source)
    else:
        torch.save({"state_dict": renamed(source.state_dict(), prefix="module.", fc="linear.")}, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(make_model(**model_kwargs), path)
    message = str(info.value)
    assert str(path) in message and "A matching model is build_resnet(" in message
    for fragment in expected:
        assert fragment in message
    assert len(message) < 400  # no dump of every key


def test_missing_unexpected_and_shape_mismatch_name_the_keys():
    state = make_model().state_dict()
    del state["layer1.0.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys layer1\.0\.conv2\.weight; unexpected keys extra\.weight"):
        load_weights(make_model(), state)
    load_weights(make_model(), state, strict=False)  # tolerated when asked

    state = make_model().state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(8, 4, 5, 5)
    with pytest.raises(CheckpointError, match=r"layer2\.0\.conv1\.weight is \(8, 4, 5, 5\) .* \(8, 4, 3, 3\)"):
        load_weights(make_model(), state, strict=False)


def test_many_missing_keys_are_abbreviated():
    state = {k: v for k, v in make_model().state_dict().items() if not k.startswith("layer3")}
    with pytest.raises(CheckpointError, match=r"and \d+ more"):
        load_weights(make_model(), state)


# --- unreadable files -------------------------------------------------------------------------


class RunsCommand:
    """A pickle payload that would create ``marker`` if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_missing_path_directory_and_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_weights(make_model(), tmp_path / "empty.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_checkpoint(tmp_path, zip_format):
    path = tmp_path / "c.pt"
    state = {"format": "dyndepth", "version": 1, "arch": make_model().arch, "model": make_model().state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"c\.pt is truncated or corrupt"):
        load_model(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("epoch 3: top1 91.2\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch_save":  # pickling only records the call; nothing runs here
        torch.save({"model": make_model().state_dict(), "hook": RunsCommand(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"epoch": 1, "hook": RunsCommand(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"not a plain-tensor checkpoint.*system.*arbitrary code"):
        load_weights(make_model(), path)
    assert not marker.exists()


# --- atomic save ------------------------------------------------------------------------------


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    good = make_model(seed=0)
    path = save_checkpoint(tmp_path / "last.pt", good, epoch=1)

    def disk_full(fd):  # the temporary file is written, but the disk refuses to persist it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=r"could not be written \(No space left on device\).*unchanged"):
        save_checkpoint(path, make_model(seed=1), epoch=2)
    with pytest.raises(CheckpointError, match="could not be written"):
        save_checkpoint(tmp_path / "new.pt", make_model(seed=1))
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1
    torch.testing.assert_close(outputs(load_model(path)), outputs(good))
