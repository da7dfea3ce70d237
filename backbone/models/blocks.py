"""What every skippable residual block is: ``relu(skip(x) + gate * residual(x))``.

Both families (the CIFAR ``BasicBlock`` and torchvision's BasicBlock / Bottleneck) define their
layers, ``before_last_conv`` (the residual branch up to its last convolution's input),
``last_conv_bn`` and ``skip``; the forward, the residual and the masked runner's in-place sum are
written once here, so the fused last convolution (backbone.models.fused) serves every block kind.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from backbone.models.fused import add_relu_, conv_bn, conv_bn_add_relu


class ResidualBlock(nn.Module):
    # A plain attribute set by subclasses, not a property over the shortcut: a submodule lookup goes
    # through nn.Module.__getattr__ (~1 µs), and the masked forward asks every block each call.
    downsamples: bool

    def before_last_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch up to the input of its last convolution."""
        raise NotImplementedError

    def last_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        raise NotImplementedError

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """What a row whose keep bit is clear gets: the shortcut alone."""
        raise NotImplementedError

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(*self.last_conv_bn(), self.before_last_conv(x))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:  # the last convolution, its BN, the sum and the ReLU: one call where fused
            return conv_bn_add_relu(*self.last_conv_bn(), self.before_last_conv(x), self.skip(x))
        # gate is 1 for every row that gets here; multiplying keeps the value and lets a
        # differentiable gate receive d(loss)/d(gate) = <grad, residual>.
        residual = self.residual(x)
        residual = residual * gate.view(-1, 1, 1, 1).to(residual.dtype)
        return add_relu_(residual, self.skip(x))

    def add_residual_(self, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output for rows ``x`` written in place into their shortcut ``into`` (default:
        ``x`` itself, an identity shortcut): ``into`` becomes ``relu(into + residual(x))``. Only for
        tensors that nobody else needs (the masked runner's rows)."""
        into = x if into is None else into
        return conv_bn_add_relu(*self.last_conv_bn(), self.before_last_conv(x), into, inplace=True)
