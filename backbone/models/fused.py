"""Convolution + BatchNorm (+ ReLU, + the residual sum) as one convolution at inference.

In eval mode BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals a convolution
with the scaled weights ``w·γ/σ`` and the bias ``β − μ·γ/σ``. :func:`conv_bn` runs that one
convolution whenever nothing can need gradients (BatchNorm in eval mode, autograd off): every
BatchNorm pass over an activation disappears, and with it an operator call whose fixed cost
shows at batch 1 (~15 µs each on these CPUs, two per residual block; docs/results.md). The
folded weights are cached on the convolution and rebuilt when any of the tensors they come from
changes (optimiser steps, ``load_state_dict`` and running-statistics updates bump a tensor's
version counter; ``.to()`` gives it new memory). Outputs agree with the unfolded pair up to float
rounding (relative ~1e-6).

On the CPU in float32 the ops that follow a convolution in a residual block go into it too, as
oneDNN post-ops (``torch.ops.mkldnn._convolution_pointwise``, the kernels torch.compile's
freezing passes call): :func:`conv_bn` with ``relu=True`` is one call instead of two, and
:func:`conv_bn_add_relu` adds the shortcut and applies the ReLU while the convolution's output is
still in cache, in place into the shortcut where asked (the masked runner's rows). A block is then
two calls (three for a bottleneck) and no elementwise pass over its activation; the per-call costs
that this removes weigh most where a block runs on part of a batch (docs/results.md, "Fused
post-ops"). Elsewhere (CUDA, autocast, autograd, other dtypes) the same functions run the plain ops.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.models.masked import memory_format_of


try:
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    _MKLDNN_CONV = torch.ops.mkldnn._convolution_pointwise
    _MKLDNN_CONV_ADD_ = torch.ops.mkldnn._convolution_pointwise_.binary
    _MKLDNN_CONV_ADD = _MKLDNN_CONV.binary
    #: The fused oneDNN calls are used where they apply (``experiments.benchmark --no-post-ops``
    #: times the model without them).
    POST_OPS = torch.backends.mkldnn.is_available()
except (AttributeError, ImportError, RuntimeError):  # a build without oneDNN (or an older torch)
    POST_OPS = False

try:
    torch.is_autocast_enabled("cpu")
    _cpu_autocast = lambda: torch.is_autocast_enabled("cpu")  # noqa: E731
except TypeError:  # torch < 2.4 takes no device type
    _cpu_autocast = torch.is_autocast_cpu_enabled

if POST_OPS:
    # FLOPs are counted by FlopCounterMode (backbone.models.cost), which knows aten's convolutions
    # only: a fused call counts as its convolution (post-ops, like every elementwise op, count 0).
    @register_flop_formula([torch.ops.mkldnn._convolution_pointwise])
    def _conv_post_ops_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
        # (X, W, B, padding, stride, dilation, groups, attr, scalars, algorithm), or the binary
        # overload's 13 arguments (X, other, W, B, ..., unary_algorithm)
        w_shape = args[1] if len(args) == 12 else args[0]
        return conv_flop_count(x_shape, w_shape, out_shape)

    @register_flop_formula([torch.ops.mkldnn._convolution_pointwise_])
    def _conv_post_ops_into_flop(other_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape)


def _foldable(bn: nn.BatchNorm2d) -> bool:
    return not (bn.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or bn.running_var is None)


def _post_ops_apply(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    # oneDNN float32 on the CPU, outside autocast (whose casts the plain ops apply), and not where
    # PyTorch itself prefers its im2col path (a single small image: faster there than oneDNN).
    return (POST_OPS and x.dtype == torch.float32 and x.device.type == "cpu" and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and not _cpu_autocast()
            and (x.shape[0] > 1 or x.numel() > 20480))


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``bn(conv(x))`` (then a ReLU where ``relu``), folded into one convolution when BatchNorm is
    in eval mode and autograd is off (and the ReLU fused into it on the CPU)."""
    if not _foldable(bn):
        out = bn(conv(x))
        return F.relu(out, inplace=True) if relu else out
    weight, bias = _folded(conv, bn)
    if relu and _post_ops_apply(conv, x):
        return _MKLDNN_CONV(x, weight, bias, *_geometry(conv), "relu", [], "")
    out = conv._conv_forward(x, weight, bias)
    return F.relu(out, inplace=True) if relu else out


def conv_bn_add_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, shortcut: torch.Tensor,
                     inplace: bool = False) -> torch.Tensor:
    """A residual block's output ``relu(shortcut + bn(conv(x)))``: written into ``shortcut`` where
    ``inplace`` (it must then be nobody else's), else a new tensor (or the convolution's own output,
    summed in place: see :func:`add_relu_`)."""
    if (_foldable(bn) and _post_ops_apply(conv, x) and shortcut.dtype == x.dtype
            and shortcut.is_contiguous(memory_format=memory_format_of(x))):
        weight, bias = _folded(conv, bn)
        if inplace:
            return _MKLDNN_CONV_ADD_(shortcut, x, weight, bias, *_geometry(conv), "add", None, "relu", [], "")
        return _MKLDNN_CONV_ADD(x, shortcut, weight, bias, *_geometry(conv), "add", None, "relu", [], "")
    residual = conv_bn(conv, bn, x)
    if inplace:
        return shortcut.add_(residual).relu_()
    return add_relu_(residual, shortcut)


def _geometry(conv: nn.Conv2d) -> tuple:
    geometry = conv.__dict__.get("_dyndepth_geometry")
    if geometry is None:  # lists, as the oneDNN ops take them; built once per convolution
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        conv.__dict__["_dyndepth_geometry"] = geometry
    return geometry


def _sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    # Read straight from the modules' dicts and spelled out (no loop, no nn.Module.__getattr__):
    # this runs before every convolution at inference, 1.3 instead of 6.6 µs, which at batch 1 was
    # ~5% of a ResNet-56 forward. data_ptr: Module.to() and .half() swap a parameter's data in
    # place of the same object (and .half() changes every tensor's data, so one dtype suffices).
    p, q, b = conv._parameters, bn._parameters, bn._buffers
    w, cb, g, beta, mean, var = p["weight"], p.get("bias"), q.get("weight"), q.get("bias"), b.get("running_mean"), b.get("running_var")
    return (id(w), w._version, w.data_ptr(), w.dtype,
            cb is None or (id(cb), cb._version, cb.data_ptr()), g is None or (id(g), g._version, g.data_ptr()),
            beta is None or (id(beta), beta._version, beta.data_ptr()),
            mean is None or (id(mean), mean._version, mean.data_ptr()),
            var is None or (id(var), var._version, var.data_ptr()), bn.eps)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    key = _sources(conv, bn)
    cached = conv.__dict__.get("_dyndepth_folded")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        fmt = memory_format_of(conv.weight)
        weight = (conv.weight.double() * scale.view(shape)).to(conv.weight.dtype).contiguous(memory_format=fmt)
        bias = shift.to(conv.weight.dtype)
    # Stored outside the module's parameters and buffers: not in state_dict, not moved by .to().
    conv.__dict__["_dyndepth_folded"] = (key, weight, bias)
    return weight, bias


def add_relu_(residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """A residual block's output ``relu(shortcut + residual)``, written into ``residual``.

    ``residual`` must be the block's own fresh tensor (the last BatchNorm's or convolution's
    output, or its product with a gate); none of their backward passes reads it, so this is safe
    under autograd too. Summing in place saves allocating and writing a new activation and a
    second pass for the ReLU: at batch 256 the out-of-place sum and ReLU took ~8% of a ResNet-56
    forward (docs/results.md, "In-place residual sums"). Where the dtypes differ (autocast) or the shapes
    broadcast, the out-of-place sum keeps PyTorch's type promotion.
    """
    if residual.dtype == shortcut.dtype and residual.shape == shortcut.shape:
        return residual.add_(shortcut).relu_()
    return F.relu(shortcut + residual, inplace=True)
