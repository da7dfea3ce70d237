"""Conv + BatchNorm folded into one convolution at inference (backbone.models.fused)."""

import pytest
import torch
import torch.nn as nn

from backbone import build_resnet
from backbone.models.fused import conv_bn


def _pair(seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(5, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.2, 3.0)
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.3)
    return conv, bn


def test_folded_equals_unfolded_and_follows_every_change():
    conv, bn = _pair()
    conv.eval(), bn.eval()
    x = torch.randn(4, 5, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
        first = conv.__dict__["_dyndepth_folded"][1]
        conv_bn(conv, bn, x)
        assert conv.__dict__["_dyndepth_folded"][1] is first  # cached while nothing changed
        for change in (lambda: conv.weight.mul_(2), lambda: bn.running_var.add_(1), lambda: bn.bias.sub_(0.5),
                       lambda: bn.load_state_dict({k: v * 1.5 for k, v in bn.state_dict().items()})):
            change()
            torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    conv.to(memory_format=torch.channels_last)  # new memory for the same parameter objects
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_training_and_autograd_use_batchnorm_itself():
    conv, bn = _pair(1)
    x = torch.randn(4, 5, 9, 9)
    before = bn.running_mean.clone()
    conv_bn(conv, bn, x).sum().backward()  # train mode: batch statistics, running ones updated
    assert not torch.equal(bn.running_mean, before) and conv.weight.grad is not None
    bn.eval()
    conv.weight.grad = None
    out = conv_bn(conv, bn, x)  # eval with autograd on (e.g. frozen-BN fine-tuning): gradients flow
    out.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    assert "_dyndepth_folded" not in conv.__dict__


def test_a_model_in_eval_mode_predicts_the_same_folded():
    model = build_resnet(14, num_classes=6, width=4).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    unfolded = model(x)  # autograd on: BatchNorm as it is
    with torch.no_grad():
        torch.testing.assert_close(model(x), unfolded.detach(), rtol=1e-4, atol=1e-4)


def test_in_place_block_sum_equals_the_out_of_place_one_with_gradients():
    """add_relu_ writes relu(shortcut + residual) into the residual: same values, same gradients
    through a training-mode block (BatchNorm's backward does not read its output), and PyTorch's
    type promotion kept where the dtypes differ."""
    from backbone.models.fused import add_relu_

    torch.manual_seed(0)
    residual, shortcut = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = torch.relu(shortcut + residual)
    out = add_relu_(residual, shortcut)
    assert torch.equal(out, expected) and out.data_ptr() == residual.data_ptr()
    mixed = add_relu_(torch.randn(2, 3).bfloat16(), torch.randn(2, 3))
    assert mixed.dtype == torch.float32

    def block_grads(in_place: bool):
        torch.manual_seed(1)
        model = build_resnet("resnet8", num_classes=3).train()
        block = model.blocks[1]
        x = torch.randn(4, model.blocks[0].out_planes, 8, 8, requires_grad=True)
        h = block.residual(x)
        y = add_relu_(h, block.shortcut(x)) if in_place else torch.relu(block.shortcut(x) + h)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), x.grad, [p.grad for p in block.parameters()]

    (y1, gx1, gp1), (y2, gx2, gp2) = block_grads(True), block_grads(False)
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    for a, b in zip(gp1, gp2):  # BatchNorm's parameter gradients are sums: rounding may differ
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _oneDNN_calls(fn) -> dict[str, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_post_ops_fused_into_the_convolution_equal_the_plain_ops(layout):
    """conv_bn(relu=True) and conv_bn_add_relu (out of place, and in place into a slice of a larger
    tensor, as the masked runner calls it) give the plain ops' values in one oneDNN call each."""
    from backbone.models import fused

    conv, bn = _pair(2)
    conv.eval(), bn.eval()
    conv.to(memory_format=layout)
    x = torch.randn(6, 5, 9, 9).contiguous(memory_format=layout)
    big = torch.randn(10, 7, 9, 9).contiguous(memory_format=layout)
    with torch.no_grad():
        plain = bn(conv(x))
        expected_sum = torch.relu(plain + big[2:8])
        torch.testing.assert_close(fused.conv_bn(conv, bn, x, relu=True), torch.relu(plain), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.conv_bn_add_relu(conv, bn, x, big[2:8]), expected_sum, rtol=1e-5, atol=1e-5)
        before = big.clone()
        out = fused.conv_bn_add_relu(conv, bn, x, big[2:8], inplace=True)
        assert out.data_ptr() == big[2:8].data_ptr()
        torch.testing.assert_close(big[2:8], expected_sum, rtol=1e-5, atol=1e-5)
        assert torch.equal(big[:2], before[:2]) and torch.equal(big[8:], before[8:])  # other rows untouched
        if fused.POST_OPS:  # a build with oneDNN: one call each, no separate ReLU or sum
            calls = _oneDNN_calls(lambda: (fused.conv_bn(conv, bn, x, relu=True), fused.conv_bn_add_relu(conv, bn, x, big[2:8])))
            assert calls.get("mkldnn::_convolution_pointwise") == 2
            assert not any(k in calls for k in ("aten::relu_", "aten::clamp_min_", "aten::add_", "aten::add"))


def test_post_ops_off_where_they_do_not_apply():
    """Autocast, autograd and other dtypes run the plain ops (same values), so training, gates and
    mixed precision are untouched by the fused path."""
    from backbone.models import fused

    conv, bn = _pair(3)
    conv.eval(), bn.eval()
    x, shortcut = torch.randn(4, 5, 9, 9), torch.randn(4, 7, 9, 9)
    with torch.no_grad():
        expected = torch.relu(bn(conv(x)) + shortcut)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls = _oneDNN_calls(lambda: fused.conv_bn_add_relu(conv, bn, x, shortcut))
        assert "mkldnn::_convolution_pointwise" not in calls
        out = fused.conv_bn_add_relu(conv.double(), bn.double(), x.double(), shortcut.double())
        torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)
        conv.float(), bn.float()
    y = fused.conv_bn_add_relu(conv, bn, x.requires_grad_(), shortcut)
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_fused_calls_count_the_flops_of_their_convolutions():
    """FlopCounterMode sees a fused call as one operator: it must count as the convolution it is,
    so a model's FLOPs do not depend on whether the post-ops were fused."""
    from backbone.models import fused
    from backbone.models.cost import count_flops, measure_backbone_cost

    model = build_resnet(14, num_classes=6, width=4).eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with_post_ops = count_flops(lambda: model(x))
    cost = measure_backbone_cost(model)
    saved = fused.POST_OPS
    fused.POST_OPS = False
    try:
        assert count_flops(lambda: model(x)) == with_post_ops
        assert measure_backbone_cost(model).as_dict() == cost.as_dict()
    finally:
        fused.POST_OPS = saved
    assert with_post_ops == 3 * cost.full_flops
