import pytest
import torch

from backbone import build_resnet
from backbone.models.resnet import parse_depth


def _random_bn(model):
    # Zero-initialised bn2 makes every block the identity; randomise so skipping changes outputs.
    for block in model.blocks:
        torch.nn.init.uniform_(block.bn2.weight, 0.5, 1.5)
        torch.nn.init.normal_(block.bn2.bias, std=0.1)
    return model


@pytest.mark.parametrize("depth,blocks", [(8, 3), (14, 6), (20, 9), (32, 15), (56, 27), (110, 54)])
def test_depths_and_flat_block_sequence(depth, blocks):
    model = build_resnet(f"resnet{depth}", num_classes=7, width=4)
    assert model.num_blocks == blocks and len(model.blocks) == blocks
    assert model.blocks[blocks // 3] is model.layer2[0] and model.blocks[-1] is model.layer3[-1]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_arch_names_and_bad_depth():
    assert parse_depth("ResNet-56") == parse_depth("resnet56") == parse_depth(56) == 56
    with pytest.raises(ValueError, match="6n\\+2"):
        build_resnet(21)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_resnet("vgg16")
    with pytest.raises(ValueError, match="shortcut"):
        build_resnet(20, shortcut="C")


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_shortcut_parameters(shortcut):
    model = build_resnet(14, width=4, shortcut=shortcut)
    downsampling = [b for b in model.blocks if b.downsamples]
    assert len(downsampling) == 2
    params = sum(p.numel() for b in downsampling for p in b.shortcut.parameters())
    assert (params == 0) == (shortcut == "A")


def test_uint8_input_equals_scaled_float():
    model = build_resnet(8, width=4).eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model(x), model(x.float() / 255))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_all_ones_mask_equals_plain_forward(shortcut):
    model = _random_bn(build_resnet(20, width=8, shortcut=shortcut)).eval()
    x = torch.rand(5, 3, 32, 32)
    ones = torch.ones(5, model.num_blocks, dtype=torch.bool)
    assert torch.equal(model(x, ones), model(x))
    assert torch.equal(model(x, ones.float()), model(x))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_mixed_mask_rows_equal_rows_run_alone(shortcut):
    model = _random_bn(build_resnet(20, width=8, shortcut=shortcut)).eval()
    x = torch.rand(8, 3, 32, 32)
    mask = torch.rand(8, model.num_blocks) < 0.5
    mask[0] = True
    mask[1] = False
    out = model(x, mask)
    alone = torch.cat([model(x[i : i + 1], mask[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)
    # Different masks really give different outputs (the mask is not ignored).
    assert not torch.allclose(out[0], model(x[:1], torch.zeros(1, model.num_blocks, dtype=torch.bool))[0])


def _ranges_per_block(keep):
    from backbone.models.masked import kept_ranges

    return [len(kept_ranges(keep[:, j])) for j in range(keep.shape[1])]


def test_sorting_rows_by_mask_puts_each_blocks_kept_rows_in_few_ranges():
    from backbone.models.masked import contiguous_order

    gen = torch.Generator().manual_seed(0)
    patterns = (torch.rand(4, 27, generator=gen) < 0.5)[torch.randint(0, 4, (256,), generator=gen)]
    order = contiguous_order(patterns)
    assert sorted(order.tolist()) == list(range(256))
    assert max(_ranges_per_block(patterns)) > 40  # unsorted: rows of a pattern lie all over
    assert max(_ranges_per_block(patterns[order])) <= 2  # 4 groups: any union is <= 2 ranges
    random = torch.rand(256, 27, generator=gen) < 0.5
    # Reflected Gray order: the first block 1 range, the second 1 too, the j-th <= 2^(j-2).
    assert _ranges_per_block(random[contiguous_order(random)])[:4] <= [1, 1, 2, 4]
    assert contiguous_order(patterns[order]) is None  # already sorted


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("kind", ["random", "patterns"])
def test_inference_on_contiguous_ranges_equals_the_gather_path(shortcut, kind, monkeypatch):
    """Without autograd the rows are sorted by mask and each block runs on slices of the batch:
    no scatter at all, and gathers only to re-sort the rows (random masks: every few blocks;
    a few masks: never, their groups being long enough ranges). Every row's logits are those of the row run alone, in the caller's order."""
    import backbone.models.masked as masked

    torch.manual_seed(1)
    model = _random_bn(build_resnet(20, width=8, shortcut=shortcut)).eval()
    x = torch.rand(64, 3, 32, 32)
    mask = torch.rand(64, model.num_blocks) < 0.5
    if kind == "patterns":
        mask = mask[torch.randint(0, 3, (64,))]
    expected = model(x, mask).detach()  # autograd on: the gather path for every split block
    alone = torch.cat([model(x[i : i + 1], mask[i : i + 1]) for i in range(64)]).detach()
    torch.testing.assert_close(expected, alone, rtol=1e-4, atol=1e-5)
    calls = {"take_rows": 0, "put_rows": 0}
    for name in calls:
        original = getattr(masked, name)
        monkeypatch.setattr(masked, name, lambda *a, name=name, original=original: calls.__setitem__(name, calls[name] + 1) or original(*a))
    split_blocks = int((mask.any(0) & ~mask.all(0)).sum())
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), expected, rtol=1e-4, atol=1e-5)
        assert calls["put_rows"] == 0
        if kind == "patterns":  # 3 distinct masks, sorted with the images: no gather at all
            assert calls["take_rows"] == 0
        else:  # a re-sort every few blocks and one to restore the order, fewer than the blocks
            assert 2 <= calls["take_rows"] < split_blocks, (calls, split_blocks)
        # run_blocks on an unsorted activation (a policy that looked at the stem's output first)
        # sorts it itself and returns the rows in the caller's order
        torch.testing.assert_close(model.head(model.run_blocks(model.stem(x), mask)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_skipped_block_takes_shortcut(shortcut):
    model = _random_bn(build_resnet(14, width=4, shortcut=shortcut)).eval()
    x = torch.rand(2, 3, 32, 32)
    down = next(i for i, b in enumerate(model.blocks) if b.downsamples)
    mask = torch.ones(2, model.num_blocks, dtype=torch.bool)
    mask[:, down] = False
    with torch.no_grad():
        h = model.stem(x)
        for i, block in enumerate(model.blocks):
            h = block.shortcut(h) if i == down else block(h)
        expected = model.head(h)
    torch.testing.assert_close(model(x, mask), expected)


def test_skipped_block_is_not_executed():
    model = build_resnet(14, width=4).eval()
    calls = []
    for i, block in enumerate(model.blocks):
        block.conv1.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, inp[0].shape[0])))
    mask = torch.ones(4, model.num_blocks, dtype=torch.bool)
    mask[:, 2] = False  # no row runs block 2
    mask[1:, 4] = False  # only row 0 runs block 4
    model(torch.rand(4, 3, 32, 32), mask)
    batch_per_block = dict(calls)
    assert 2 not in batch_per_block
    assert batch_per_block[4] == 1 and batch_per_block[0] == 4


def test_gradients_flow_through_kept_blocks_only():
    model = _random_bn(build_resnet(14, width=4))
    x = torch.rand(4, 3, 32, 32)
    mask = torch.ones(4, model.num_blocks, dtype=torch.bool)
    mask[:, 3] = False
    mask[:2, 5] = False
    model(x, mask).sum().backward()
    assert model.blocks[3].conv1.weight.grad is None
    for i in (0, 1, 2, 4, 5):
        assert model.blocks[i].conv1.weight.grad.abs().sum() > 0
    assert model.conv1.weight.grad.abs().sum() > 0 and model.fc.weight.grad.abs().sum() > 0


def test_float_mask_with_grad_acts_as_hard_gate():
    model = _random_bn(build_resnet(8, width=4)).eval()
    x = torch.rand(3, 3, 32, 32)
    gate = torch.tensor([[1.0, 0.0, 1.0]] * 3, requires_grad=True)
    out = model(x, gate)
    torch.testing.assert_close(out, model(x, gate.detach().bool()))
    out.sum().backward()
    assert gate.grad[:, 0].abs().sum() > 0 and gate.grad[:, 2].abs().sum() > 0
    assert torch.all(gate.grad[:, 1] == 0)


def test_bad_masks_are_rejected():
    model = build_resnet(8, width=4)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        model(x, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError):
        model(x, [[1, 1, 1], [1, 1, 1]])


def test_shared_mask_runs_as_a_plain_shorter_network(monkeypatch):
    """A batch whose rows share one mask (batch 1, or a policy that settled on one mask) needs
    no gather/scatter: the kept blocks run on the whole batch, the others are skipped."""
    import backbone.models.resnet as resnet

    model = _random_bn(build_resnet(14, width=4)).eval()
    x = torch.rand(5, 3, 32, 32)
    mask = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool).expand(5, 6)
    expected = model.stem(x)
    for block, keep in zip(model.blocks, mask[0]):
        expected = block(expected) if keep else block.skip(expected)
    expected = model.head(expected)

    def no_gather(*args, **kwargs):
        raise AssertionError("a shared mask must not go through the gather/scatter path")

    monkeypatch.setattr(resnet, "run_block_masked", no_gather)
    torch.testing.assert_close(model(x, mask), expected)
    mixed = mask.clone()
    mixed[0, 1] = True
    with pytest.raises(AssertionError, match="gather"):
        model(x, mixed)  # rows disagree on block 1: that block (only) needs the gather


@pytest.mark.parametrize("family", ["cifar A", "cifar B", "torchvision", "path heads"])
def test_a_fixed_subset_equals_the_masked_forward_without_its_host_work(family, monkeypatch):
    """FixedSubset (a cascade's static stage) is the masked forward with one mask for every row,
    in eval and training mode, gradients included, but never validates a mask or decides per
    block at call time."""
    import backbone.models.masked as masked
    from backbone.models.masked import FixedSubset
    from backbone.models.torchvision_resnet import build_torchvision_resnet

    torch.manual_seed(0)
    if family == "torchvision":
        model = build_torchvision_resnet("resnet18", num_classes=5)
        mask, size = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1], dtype=torch.bool), 64
    else:
        model = _random_bn(build_resnet(14, num_classes=5, width=4, shortcut="B" if family == "cifar B" else "A"))
        mask, size = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), 32  # blocks 3 (downsampling) and 4 skipped
        if family == "path heads":
            model.attach_path_heads(torch.stack([mask, torch.ones(6, dtype=torch.bool)]))
            model.path_heads.bias.data[0] += torch.arange(5.0)  # the mask's own head differs from the shared one
    with pytest.raises(ValueError, match="keep_mask must have shape"):
        FixedSubset(model, mask[:-1])
    subset = FixedSubset(model.eval(), mask.to(torch.uint8))
    for batch in (1, 3):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        with torch.no_grad():
            torch.testing.assert_close(subset(x.clone()), model(x, mask.expand(batch, -1)))
    model.train()
    x = torch.rand(4, 3, size, size)
    expected = model(x, mask.expand(4, -1))
    expected.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(masked, "check_keep_mask", lambda *a: pytest.fail("a fixed subset checks its mask once"))
    got = subset(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected)
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name])
    assert all(p.grad is None for p in model.blocks[1].parameters())  # a skipped block is not run


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_masked_blocks_keep_the_memory_format(layout):
    from backbone.models.masked import memory_format_of, run_block_masked

    model = _random_bn(build_resnet(14, width=4)).to(memory_format=layout).eval()
    x = model.stem(torch.rand(4, 3, 32, 32))
    assert memory_format_of(x) == layout
    rows = torch.tensor([0, 2]), torch.tensor([1, 3])
    for block in (model.blocks[0], model.blocks[2]):  # identity and downsampling shortcut
        out = run_block_masked(block, x, *rows)
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out[rows[0]], block(x[rows[0]]))
        x = block(x)


def test_channels_last_and_nchw_models_agree():
    torch.manual_seed(0)
    model = _random_bn(build_resnet(14, width=4)).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mask = torch.rand(6, model.num_blocks) < 0.5
    fast = model(x, mask)
    nchw = model.to(memory_format=torch.contiguous_format)(x, mask)
    torch.testing.assert_close(fast, nchw, rtol=1e-4, atol=1e-4)


def test_inference_writes_in_place_but_never_into_the_callers_tensor():
    from backbone.models.masked import run_block_masked

    model = _random_bn(build_resnet(14, width=4)).eval()
    x = torch.rand(6, 3, 32, 32)
    mask = torch.rand(6, model.num_blocks) < 0.5
    mask[0], mask[1] = True, False  # every block has kept and skipped rows
    before = x.clone()
    with torch.no_grad():
        fast = model(x, mask)
    torch.testing.assert_close(fast, model(x, mask))  # same with autograd (copying) path
    assert torch.equal(x, before)
    h = model.stem(x).detach()
    copy = h.clone()
    rows = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    with torch.no_grad():
        run_block_masked(model.blocks[1], h, *rows)  # default: not in place
    assert torch.equal(h, copy)


def test_compiled_blocks_give_the_same_outputs_for_any_row_count():
    """Compiled blocks match eager ones, and once each block kind has met a few row counts,
    new batch sizes and masks need no new graphs."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _random_bn(build_resnet(14, width=4)).eval()
    compiled = copy.deepcopy(model).compile_blocks()
    counters.clear()
    graphs = []
    with torch.no_grad():
        for sizes in ((1, 3, 7, 16), (5, 12, 23, 40)):
            for batch in sizes:
                x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
                mask = torch.rand(batch, model.num_blocks) < 0.5
                torch.testing.assert_close(compiled(x, mask), model(x, mask), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"])
    assert 0 < graphs[0] == graphs[1], graphs
    assert compiled.compile_blocks(enabled=False)._call_block is model._call_block  # back to eager
