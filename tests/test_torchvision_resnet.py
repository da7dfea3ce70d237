"""torchvision ResNets as skippable backbones: torchvision's outputs and names, real skipping,
FLOPs, and weights from torchvision enums, torch hub's cache and local files (never downloaded)."""

from __future__ import annotations

import copy
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

from backbone.errors import CheckpointError, ConfigError
from backbone.models.cost import count_flops, measure_backbone_cost
from backbone.models.masked import memory_format_of
from backbone.models.resnet import CifarResNet
from backbone.models.torchvision_resnet import (TorchvisionResNet, build_backbone, build_torchvision_resnet,
                                                weights_cache_path)
from backbone.models.weights import infer_arch, load_model, load_weights, save_checkpoint

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def torchvision_model(name: str = "resnet18", num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """torchvision's own network with random weights and BN statistics that all matter; the last
    BN of each residual is kept small so that deep random nets stay in a sane range."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    last_bn = ".bn2" if name in ("resnet18", "resnet34") else ".bn3"  # the residual's last BN
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(*((0.1, 0.4) if module_name.endswith(last_bn) else (0.5, 1.5)))
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def skippable(name: str = "resnet18", num_classes: int = 1000, seed: int = 0) -> TorchvisionResNet:
    model = build_torchvision_resnet(name, num_classes)
    model.load_state_dict(torchvision_model(name, num_classes, seed).state_dict())  # torchvision's keys, strictly
    return model.eval()


def images(batch: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,blocks,downsampling", [
    ("resnet18", 8, [2, 4, 6]), ("resnet34", 16, [3, 7, 13]), ("resnet50", 16, [0, 3, 7, 13]),
    ("resnet101", 33, [0, 3, 7, 30]), ("resnet152", 50, [0, 3, 11, 47]),
])
def test_flat_block_sequence_and_torchvision_names(name, blocks, downsampling):
    model = build_torchvision_resnet(f"tv_{name}", num_classes=10)
    assert model.num_blocks == len(model.blocks) == blocks and model.depth == int(name[6:])
    assert model.blocks[0] is model.layer1[0] and model.blocks[-1] is model.layer4[-1]
    assert [i for i, b in enumerate(model.blocks) if b.downsamples] == downsampling
    reference = getattr(torchvision.models, name)(weights=None, num_classes=10).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    assert model.arch == {"family": "torchvision", "name": name, "num_classes": 10,
                          "normalization": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_plain_and_all_ones_forward_equal_torchvision(name):
    reference = torchvision_model(name)
    model = skippable(name)
    x = images(3)
    with torch.no_grad():
        expected = reference((x.float() / 255 - MEAN) / STD)
        out = model(x)
        assert torch.equal(model(x, torch.ones(3, model.num_blocks, dtype=torch.bool)), out)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(x.float() / 255), out)  # uint8 or [0, 1] floats alike


def test_mixed_mask_rows_equal_rows_run_alone():
    model = skippable("resnet50")
    x = images(6)
    mask = torch.rand(6, model.num_blocks, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[0], mask[1] = True, False
    with torch.no_grad():
        out = model(x, mask)
        alone = torch.cat([model(x[i : i + 1], mask[i : i + 1]) for i in range(6)])
        none = model(x[:1], torch.zeros(1, model.num_blocks, dtype=torch.bool))
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[0], none[0], atol=1e-3)  # the mask is not ignored


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_skipped_first_block_of_a_stage_applies_its_downsample(name):
    model = skippable(name)
    x = images(4)
    skipped = [i for i, b in enumerate(model.blocks) if b.downsamples]
    mask = torch.ones(4, model.num_blocks, dtype=torch.bool)
    mask[:, skipped[0]] = False  # skipped by every row
    mask[1::2, skipped[1]] = False  # skipped by half the rows: the gather/scatter path
    with torch.no_grad():
        out = model(x, mask)
        for r in range(4):
            h = model.stem(x[r : r + 1])
            for i, block in enumerate(model.blocks):
                h = block(h) if mask[r, i] else block.downsample(h)
            torch.testing.assert_close(out[r : r + 1], model.head(h), rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_kept_blocks_only():
    model = skippable("resnet18").train()
    mask = torch.ones(4, model.num_blocks, dtype=torch.bool)
    mask[:, 2] = False  # layer2.0, a downsampling block: its shortcut still runs
    mask[:, 5] = False
    mask[:2, 7] = False
    model(images(4, 32), mask).sum().backward()
    for i in (2, 5):
        assert model.blocks[i].conv1.weight.grad is None and model.blocks[i].conv2.weight.grad is None
    assert model.blocks[2].downsample[0].weight.grad.abs().sum() > 0
    for i in (0, 1, 3, 4, 6, 7):
        assert model.blocks[i].conv1.weight.grad.abs().sum() > 0
    assert model.conv1.weight.grad.abs().sum() > 0 and model.fc.weight.grad.abs().sum() > 0


def test_float_mask_with_grad_acts_as_hard_gate():
    model = skippable("resnet18")
    gate = torch.ones(2, model.num_blocks)
    gate[:, 3] = 0
    gate.requires_grad_(True)
    x = images(2, 32)
    out = model(x, gate)
    torch.testing.assert_close(out, model(x, gate.detach().bool()))
    out.sum().backward()
    assert gate.grad[:, 4].abs().sum() > 0 and torch.all(gate.grad[:, 3] == 0)


def test_channels_last_by_default_and_nchw_agrees():
    model = skippable("resnet18")
    assert memory_format_of(model.conv1.weight) == torch.channels_last
    assert memory_format_of(model.stem(images(2))) == torch.channels_last
    x = images(5)
    mask = torch.rand(5, model.num_blocks, generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.no_grad():
        fast = model(x, mask)
        nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)(x, mask)
    torch.testing.assert_close(fast, nchw, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_match_eager():
    """compile_blocks works for torchvision blocks. Only dynamo and AOT autograd are exercised
    (backend="aot_eager"): inductor's C++ compile of resnet18's graphs takes ~45 s on one CPU core,
    and test_resnet covers inductor on the same shared runner."""
    model = skippable("resnet18", num_classes=5)
    compiled = copy.deepcopy(model).compile_blocks(backend="aot_eager")
    with torch.no_grad():
        for batch in (1, 3, 5):
            x = images(batch, 32, seed=batch)
            mask = torch.rand(batch, model.num_blocks, generator=torch.Generator().manual_seed(batch)) < 0.5
            torch.testing.assert_close(compiled(x, mask), model(x, mask), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_resnet50_at_224_has_4_1_giga_multiply_adds():
    model = build_torchvision_resnet("resnet50")
    cost = measure_backbone_cost(model)  # 224 px: the family's default
    assert 8.1e9 < cost.full_flops < 8.3e9  # 2 FLOPs per multiply-add: ~4.1 G multiply-adds
    reference = torchvision.models.resnet50(weights=None)
    assert cost.total_params == sum(p.numel() for p in reference.parameters())  # 25.6 M
    assert count_flops(lambda: reference(torch.zeros(1, 3, 224, 224))) == cost.full_flops


def test_masked_forward_counted_whole_equals_the_cost_table():
    model = skippable("resnet50")
    cost = measure_backbone_cost(model, image_size=64)
    assert cost.skip_flops[0] > 0 and cost.skip_flops[1] == 0  # layer1.0's downsample conv costs
    mask = torch.ones(1, model.num_blocks, dtype=torch.bool)
    mask[0, [0, 2, 3, 9, 15]] = False
    x = torch.zeros(1, 3, 64, 64)
    assert count_flops(lambda: model(x, mask)) == cost.mask_flops(mask).item()
    assert count_flops(lambda: model(x)) == cost.full_flops


# --- names and bad input ---------------------------------------------------------------------


def test_build_backbone_keeps_the_families_apart():
    assert isinstance(build_backbone("tv_resnet18", 10), TorchvisionResNet)
    cifar = build_backbone("resnet50", 10, width=4)  # 50 = 6n+2: a CIFAR depth without the prefix
    assert isinstance(cifar, CifarResNet) and cifar.num_blocks == 24
    with pytest.raises(ConfigError, match="width do not apply to torchvision ResNets"):
        build_backbone("tv_resnet18", 10, width=4)
    with pytest.raises(ConfigError, match="unknown torchvision ResNet 'tv_resnet20'.*tv_resnet50"):
        build_backbone("tv_resnet20", 10)
    with pytest.raises(ConfigError, match="normalization"):
        build_torchvision_resnet("resnet18", normalization="mnist")


def test_bad_weights_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="unknown weights 'IMAGENET1K_V3'.*IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_torchvision_resnet("resnet50", weights="IMAGENET1K_V3")
    with pytest.raises(ConfigError, match="for another network"):
        build_torchvision_resnet("resnet50", weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(ConfigError, match="1000 classes but num_classes=10"):
        build_torchvision_resnet("resnet18", num_classes=10, weights="DEFAULT")


# --- weights ---------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch hub's cache in an empty temporary folder, and every download failing as offline."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_offline_download_names_the_file_and_the_folder(offline_hub):
    with pytest.raises(CheckpointError) as info:
        build_torchvision_resnet("resnet50", weights="IMAGENET1K_V2")
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message and str(offline_hub) in message
    assert "name resolution" in message and not any(offline_hub.glob("*.pth"))


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1",
                                     torchvision.models.ResNet18_Weights.IMAGENET1K_V1])
def test_weights_in_the_hub_cache_load_without_network(offline_hub, weights):
    reference = torchvision_model("resnet18")
    path = weights_cache_path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert path.parent == offline_hub and path.name == "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_torchvision_resnet("resnet18", weights=weights).eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x.float() / 255 - MEAN) / STD), rtol=1e-4, atol=1e-4)


def test_a_corrupt_file_in_the_hub_cache_is_named(offline_hub):
    path = weights_cache_path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(CheckpointError, match=f"{path}.*truncated or corrupt"):
        build_torchvision_resnet("resnet18", weights="DEFAULT")


def test_local_torchvision_state_dict_loads(tmp_path):
    reference = torchvision_model("resnet18")
    path = tmp_path / "resnet18-finetuned.pth"
    torch.save(reference.state_dict(), path)
    from_builder = build_torchvision_resnet("resnet18", weights=path).eval()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}  # DDP-style
    from_wrapped = load_weights(build_torchvision_resnet("resnet18"), wrapped).eval()
    x = images(2)
    with torch.no_grad():
        expected = reference((x.float() / 255 - MEAN) / STD)
        torch.testing.assert_close(from_builder(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_wrapped(x), expected, rtol=1e-4, atol=1e-4)
    assert infer_arch(reference.state_dict()) == {"family": "torchvision", "name": "resnet18", "num_classes": 1000}
    with pytest.raises(CheckpointError, match=r"not a dyndepth checkpoint.*build_torchvision_resnet\('resnet18', num_classes=1000\)"):
        load_model(path)


@pytest.mark.parametrize("source, model, expected", [
    (("resnet34", 1000), ("resnet18", 1000), "checkpoint is a torchvision resnet34 but the model a resnet18. "
                                             "A matching model is build_torchvision_resnet('resnet34', num_classes=1000)"),
    (("resnet18", 1000), ("resnet18", 10), "classifier has 1000 classes but the model 10"),
])
def test_mismatched_torchvision_checkpoint_is_named(tmp_path, source, model, expected):
    path = tmp_path / "w.pth"
    torch.save(getattr(torchvision.models, source[0])(weights=None, num_classes=source[1]).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_weights(build_torchvision_resnet(*model), path)
    assert expected in str(info.value) and len(str(info.value)) < 400


def test_families_do_not_load_into_each_other():
    with pytest.raises(CheckpointError, match="holds a torchvision resnet18 but the model is a CIFAR ResNet-20"):
        load_weights(build_backbone("resnet20", 10), torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(CheckpointError, match="holds a CIFAR ResNet-20 but the model is a torchvision resnet18"):
        load_weights(build_torchvision_resnet("resnet18", 10), build_backbone("resnet20", 10).state_dict())


def test_our_checkpoint_round_trips(tmp_path):
    source = skippable("resnet18", num_classes=7)
    path = save_checkpoint(tmp_path / "backbone.pt", source, epoch=2)
    model = load_model(path)
    assert isinstance(model, TorchvisionResNet) and model.arch == source.arch
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x))


def test_skipping_benchmark_runs_the_family_at_its_own_size():
    from experiments.bench_skipping import bench_skipping

    records = bench_skipping("tv_resnet18", 2, [0.5], ["random"], torch.device("cpu"), warmup=0, repeats=1, image_size=32)
    assert len(records) == 1 and records[0]["image_size"] == 32 and records[0]["flops_ratio"] > 1
