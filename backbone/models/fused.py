"""Convolution + BatchNorm as one convolution at inference.

In eval mode BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals a convolution
with the scaled weights ``w·γ/σ`` and the bias ``β − μ·γ/σ``. :func:`conv_bn` runs that one
convolution whenever nothing can need gradients (BatchNorm in eval mode, autograd off): every
BatchNorm pass over an activation disappears, and with it an operator call whose fixed cost
shows at batch 1 (~15 µs each on these CPUs, two per residual block; docs/results.md). The
folded weights are cached on the convolution and rebuilt when any of the tensors they come from
changes (optimiser steps, ``load_state_dict`` and running-statistics updates bump a tensor's
version counter; ``.to()`` gives it new memory). Outputs agree with the unfolded pair up to float
rounding (relative ~1e-6).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``, folded into one convolution when BatchNorm is in eval mode and autograd is off."""
    if bn.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or bn.running_var is None:
        return bn(conv(x))
    weight, bias = _folded(conv, bn)
    return conv._conv_forward(x, weight, bias)


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
        fmt = torch.channels_last if _is_channels_last(conv.weight) else torch.contiguous_format
        weight = (conv.weight.double() * scale.view(shape)).to(conv.weight.dtype).contiguous(memory_format=fmt)
        bias = shift.to(conv.weight.dtype)
    # Stored outside the module's parameters and buffers: not in state_dict, not moved by .to().
    conv.__dict__["_dyndepth_folded"] = (key, weight, bias)
    return weight, bias


def _is_channels_last(w: torch.Tensor) -> bool:
    return w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


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
