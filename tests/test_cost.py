import pytest
import torch

from backbone import build_resnet
from backbone.models.cost import count_flops, measure_backbone_cost


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_mask_flops_are_stem_head_and_kept_blocks(shortcut):
    model = build_resnet(20, num_classes=10, shortcut=shortcut, width=8)
    cost = measure_backbone_cost(model)
    assert cost.num_blocks == 9 and all(f > 0 for f in cost.block_flops)
    # Whole-network count equals the sum of the parts.
    assert count_flops(lambda: model(torch.zeros(1, 3, 32, 32))) == cost.full_flops
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0, 1], [0] * 9], dtype=torch.bool)
    flops = cost.mask_flops(mask)
    expected0 = cost.stem_flops + cost.head_flops + sum(
        f if keep else s for f, s, keep in zip(cost.block_flops, cost.skip_flops, mask[0].tolist())
    )
    assert flops[0].item() == expected0
    assert flops[1].item() == cost.min_flops
    # A masked forward counted by FlopCounterMode agrees with the table (real skipping).
    assert count_flops(lambda: model(torch.zeros(1, 3, 32, 32), mask[:1])) == expected0


def test_skip_cost_only_for_option_b_downsampling():
    a = measure_backbone_cost(build_resnet(14, shortcut="A", width=8))
    b = measure_backbone_cost(build_resnet(14, shortcut="B", width=8))
    assert all(s == 0 for s in a.skip_flops)
    assert [s > 0 for s in b.skip_flops] == [False, False, True, False, True, False]


def test_resnet56_size_matches_the_paper():
    cost = measure_backbone_cost(build_resnet(56))
    # He et al. 2016: ResNet-56 has 0.85 M parameters; ~125 M multiply-adds = ~250 M FLOPs.
    assert 0.84e6 < cost.total_params < 0.87e6
    assert 240e6 < cost.full_flops < 260e6
    assert cost.flops_ratio(torch.ones(1, 27)).item() == pytest.approx(1.0)


def test_stem_params_are_all_but_blocks_and_classifier_for_both_families():
    from backbone.models.cost import count_params
    from backbone.models.torchvision_resnet import build_torchvision_resnet

    cifar = build_resnet(14, shortcut="B", width=8)
    assert measure_backbone_cost(cifar).stem_params == count_params(cifar.conv1) + count_params(cifar.bn1)
    tv = build_torchvision_resnet("resnet18", num_classes=10)
    cost = measure_backbone_cost(tv, image_size=64)
    assert cost.stem_params == 64 * 3 * 7 * 7 + 2 * 64 and cost.total_params == count_params(tv)
    assert cost.head_params == 512 * 10 + 10


def test_time_share_counts_the_shortcuts_that_skipped_downsampling_blocks_still_run():
    from backbone.models.cost import BlockTimes, time_per_block

    model = build_resnet(8, num_classes=10, shortcut="B", width=8).eval()
    with torch.no_grad():
        times = time_per_block(model, torch.zeros(4, 3, 32, 32), torch.device("cpu"), repeats=3)
    downsamples = torch.tensor([b.downsamples for b in model.blocks])
    assert ((times.skip > 0) == downsamples).all() and (times.block > 0).all() and times.fixed > 0

    made_up = BlockTimes(torch.tensor([2.0, 4.0, 6.0]), torch.tensor([0.0, 1.0, 0.5]), fixed=1.0)
    assert made_up.share(torch.ones(2, 3, dtype=torch.bool)) == 1.0
    # Nothing kept: stem, head and the two downsampling shortcuts, of 13 ms in all.
    assert made_up.share(torch.zeros(2, 3, dtype=torch.bool)) == pytest.approx((1.0 + 1.5) / 13.0)
    # Half the rows keep block 1: half its time, half its shortcut.
    half = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    assert made_up.share(half) == pytest.approx((1.0 + 2.0 + 2.0 + 0.5 + 6.0) / 13.0)
