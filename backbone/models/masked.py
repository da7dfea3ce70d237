"""The masked block runner: one residual block on the rows of a batch that keep it.

Every model kind (CIFAR ResNets, torchvision's BasicBlock and Bottleneck) and every caller (the
masked forward of ``SkippableResNet``, the env, the gates, the sequential policy) runs blocks
through :func:`run_block_masked`, so a skipped block costs nothing anywhere: a block runs only on
its kept rows (gathered, then scattered back), and a skipped downsampling block applies its
shortcut so shapes fit. Measurements of what this costs: docs/results.md, "Real skipping".
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def run_block_masked(
    block: nn.Module,
    x: torch.Tensor,
    keep_rows: torch.Tensor,
    skip_rows: torch.Tensor,
    gate: torch.Tensor | None = None,
    inplace: bool = False,
    call: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``block`` only on rows ``keep_rows``; rows ``skip_rows`` take the shortcut.

    ``keep_rows``/``skip_rows`` are 1-D index tensors on ``x.device`` that partition the batch.
    ``gate`` (optional) holds the differentiable gate values of the kept rows. The result keeps
    ``x``'s memory format. ``inplace``: an identity-shortcut block may write its kept rows into
    ``x`` itself (saves a full copy; only for an intermediate nobody else needs, without autograd).
    ``call(block, x, gate)`` runs the block (default: eagerly; see ``SkippableResNet.compile_blocks``).
    Each block runs on exactly its kept rows: a convolution's time is linear in the row count, so
    padding the count up to a multiple of 8 or 16 (fewer distinct shapes) only adds work
    (measured: efficiency 0.80 instead of 0.89, docs/results.md).
    """
    call = call or call_block
    if skip_rows.numel() == 0:
        return call(block, x, gate)
    if keep_rows.numel() == 0:
        return block.skip(x)
    # Without autograd and with more than half the batch kept, the block runs on the two halves
    # of its rows in turn: its gathered input and intermediates then never exceed half a batch,
    # so a masked forward needs no more memory than the full one, which holds them for every row
    # (rows are independent at inference: eval-mode BatchNorm normalises each row on its own).
    halves = gate is None and not torch.is_grad_enabled() and 2 * keep_rows.numel() > x.shape[0]
    parts = keep_rows.tensor_split(2) if halves else (keep_rows,)
    if not block.downsamples:
        # Identity shortcut: skipped rows keep their activation, kept rows are overwritten, in a
        # copy unless allowed in place (with autograd the previous layer saved x for its backward).
        out = x if inplace else x.clone()
        for rows in parts:  # a part reads only its own rows of x, which no other part writes
            _put_rows(out, rows, call(block, _take_rows(x, rows), gate))
        return out
    free_shortcut = getattr(getattr(block, "shortcut", None), "costs_no_flops", False)
    # A parameter-free shortcut (option A: a strided view and zero channels) on every row is
    # cheaper than gathering the skipped rows for it; the kept rows are then overwritten.
    out = block.skip(x).contiguous(memory_format=memory_format_of(x)) if free_shortcut else None
    for rows in parts:
        kept = call(block, _take_rows(x, rows), gate)
        if out is None:
            out = torch.empty((x.shape[0],) + tuple(kept.shape[1:]), dtype=kept.dtype, device=kept.device,
                              memory_format=memory_format_of(x))
        _put_rows(out, rows, kept)
    if not free_shortcut:
        _put_rows(out, skip_rows, block.skip(_take_rows(x, skip_rows)))
    return out


# Row gathers and scatters that keep the layout, on a 2-D (rows, features) view of the tensor: on
# a channels_last tensor its NHWC view is contiguous, so a row is one contiguous run either way.
# index_select on a 2-D view copies whole rows (about 2x faster on CPUs than on the 4-D view,
# docs/results.md), and no layout conversion (two transposes per block) is ever needed.
def _rows_view(x: torch.Tensor) -> torch.Tensor:
    if memory_format_of(x) == torch.channels_last:
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1) if x.is_contiguous() else x


def _from_rows(rows_2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    count = rows_2d.shape[0]
    if memory_format_of(like) == torch.channels_last:
        n, c, h, w = like.shape
        return rows_2d.view(count, h, w, c).permute(0, 3, 1, 2)
    return rows_2d.view((count,) + tuple(like.shape[1:]))


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    view = _rows_view(x)
    if view.dim() != 2:  # neither layout is contiguous: a plain gather
        return x.index_select(0, rows)
    return _from_rows(view.index_select(0, rows), x)


def _put_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    view = _rows_view(out)
    if view.dim() != 2:
        out.index_copy_(0, rows, values)
    else:
        view.index_copy_(0, rows, _rows_view(values.contiguous(memory_format=memory_format_of(out))))
    return out


def call_block(block: nn.Module, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``block(x, gate)``: the unit that ``SkippableResNet.compile_blocks`` compiles."""
    return block(x, gate)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` if ``x`` (or a 4-D weight) is laid out that way, else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_keep_mask(keep_mask: torch.Tensor, batch: int, num_blocks: int) -> torch.Tensor:
    """Validate a keep mask and return it as a bool tensor on the CPU.

    The one host copy per forward is deliberate: the row indices of every block are derived from
    it on the host, so the per-block loop needs no further device synchronisation.
    """
    if not isinstance(keep_mask, torch.Tensor):
        raise TypeError(f"keep_mask must be a torch.Tensor, got {type(keep_mask).__name__}")
    if keep_mask.shape != (batch, num_blocks):
        raise ValueError(
            f"keep_mask must have shape (batch, num_blocks) = ({batch}, {num_blocks}), "
            f"got {tuple(keep_mask.shape)}"
        )
    mask = keep_mask.detach().cpu()
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("keep_mask must contain only 0/1 (or bool) values")
        mask = mask != 0
    return mask
