"""The masked block runner: one residual block on the rows of a batch that keep it.

Every model kind (CIFAR ResNets, torchvision's BasicBlock and Bottleneck) and every caller (the
masked forward of ``SkippableResNet``, the env, the gates, the sequential policy) runs blocks
through :func:`run_block_masked`, so a skipped block costs nothing anywhere: a block runs only on
its kept rows (gathered, then scattered back), and a skipped downsampling block applies its
shortcut so shapes fit. At inference the masked forward keeps the rows sorted by mask
(:class:`SortedRows`, :func:`contiguous_order`): every block finds its kept rows in a few
contiguous ranges and runs on views of the batch, adding its residual in place, and the rows
are re-sorted (one gather) only when a block's rows have scattered. Measurements of what this
costs: docs/results.md, "Real skipping" and "Rows sorted by mask".
"""

from __future__ import annotations

from typing import Callable

import numpy as np
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
            put_rows(out, rows, call(block, take_rows(x, rows), gate))
        return out
    free_shortcut = getattr(getattr(block, "shortcut", None), "costs_no_flops", False)
    # A parameter-free shortcut (option A: a strided view and zero channels) on every row is
    # cheaper than gathering the skipped rows for it; the kept rows are then overwritten.
    out = block.skip(x).contiguous(memory_format=memory_format_of(x)) if free_shortcut else None
    for rows in parts:
        kept = call(block, take_rows(x, rows), gate)
        if out is None:
            out = torch.empty((x.shape[0],) + tuple(kept.shape[1:]), dtype=kept.dtype, device=kept.device,
                              memory_format=memory_format_of(x))
        put_rows(out, rows, kept)
    if not free_shortcut:
        put_rows(out, skip_rows, block.skip(take_rows(x, skip_rows)))
    return out


def run_block_on_ranges(block: nn.Module, x: torch.Tensor, runs: list[tuple[int, int]],
                        call: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """At inference (no autograd, eval mode), ``block`` on the rows ``x[start:stop]`` of ``runs``;
    the other rows take the shortcut. Writes into ``x`` (identity shortcut): only for an
    intermediate nobody else needs (``SortedRows`` gives the ranges)."""
    call = call or call_block
    # A slice of rows is a contiguous view in either layout: the block reads it where it lies and
    # (identity shortcut) adds its residual into it, so the gather and the scatter of the kept
    # rows (two copies of them each) disappear. Memory: the block's intermediates for the
    # kept rows only, never more than the full forward holds for every row.
    if not block.downsamples:
        for start, stop in runs:
            rows = x[start:stop]
            if call is call_block and hasattr(block, "add_residual_"):
                block.add_residual_(rows)  # written straight into x: no copy at all
            else:  # a compiled block returns a fresh tensor
                rows.copy_(call(block, rows, None))
        return x
    if call is call_block and hasattr(block, "add_residual_"):
        # Every row needs the shortcut (kept rows add their residual to it), so it runs once on the
        # whole batch, one call, and each kept range adds its residual into it in place: no copy
        # of kept outputs, and a convolution shortcut is not split into a call per range.
        out = block.skip(x).contiguous(memory_format=memory_format_of(x))
        for start, stop in runs:
            block.add_residual_(x[start:stop], into=out[start:stop])
        return out
    free_shortcut = getattr(getattr(block, "shortcut", None), "costs_no_flops", False)
    out = block.skip(x).contiguous(memory_format=memory_format_of(x)) if free_shortcut else None
    done = 0
    for start, stop in runs:
        kept = call(block, x[start:stop], None)
        if out is None:
            out = torch.empty((x.shape[0],) + tuple(kept.shape[1:]), dtype=kept.dtype, device=kept.device,
                              memory_format=memory_format_of(x))
        if not free_shortcut and start > done:
            out[done:start].copy_(block.skip(x[done:start]))
        out[start:stop].copy_(kept)
        done = stop
    if not free_shortcut and done < x.shape[0]:
        out[done:].copy_(block.skip(x[done:]))
    return out


#: A block whose kept rows form at most this many contiguous ranges runs on views of them; one
#: with more has the rows re-sorted first (SortedRows). 0: the gather-and-scatter path instead
#: (``experiments.benchmark --max-ranges 0`` times it against this one).
MAX_RANGES = 4
#: ... and only when every range holds at least this many rows: a block called on a range of 1-2
#: rows runs its convolutions at batch 1-2, up to 1.5x slower per image (ResNet-50, 224 px).
MIN_RANGE_ROWS = 8


def contiguous_order(keep: torch.Tensor) -> torch.Tensor | None:
    """A row order (a permutation) in which the rows that keep each block of ``keep`` (a (rows,
    blocks) bool CPU mask) lie in few contiguous ranges; None where the rows are already in it.

    Rows are sorted by their masks in reflected-Gray-code order of the blocks whose rows split,
    the first block most significant: rows sharing a mask become neighbours, the first block's
    kept rows one range, the j-th block's at most 2^(j-2) ranges (half of what a plain
    lexicographic sort gives), and a few distinct or nested masks few ranges for every block.
    The first blocks get the fewest ranges, and a network's first blocks have the largest
    activations, whose gathers cost most.
    """
    keep = keep.numpy()
    split = keep.any(0) & ~keep.all(0)
    if keep.shape[0] < 2 or not split.any():
        return None
    gray_rank = np.bitwise_xor.accumulate(keep[:, split], axis=1)  # a Gray code's binary rank: prefix XOR
    # Each row's rank as one byte string, most significant bit first: a stable sort of the
    # strings is the lexicographic order of the bits, in one pass (np.lexsort would take one
    # pass per block: 3x slower at 54 blocks, and this runs once per re-sort).
    packed = np.ascontiguousarray(np.packbits(gray_rank, axis=1))
    order = np.argsort(packed.view(np.dtype((np.void, packed.shape[1]))).ravel(), kind="stable")
    if (order[1:] > order[:-1]).all():
        return None
    return torch.from_numpy(order)


class SortedRows:
    """The rows of one masked forward at inference, kept in an order of their own.

    A block whose kept rows form at most ``MAX_RANGES`` ranges of ``MIN_RANGE_ROWS`` rows or more
    (or one range) runs on slices; one whose rows lie scattered first has the whole batch re-sorted (one gather of every row, in
    :func:`contiguous_order` of this block and the ones after it), after which it and the next
    few blocks find their rows in one or two ranges. A row gather is 2.3-4x cheaper per byte than
    the scatter that the gather path pays per block (docs/results.md), so one gather of all rows
    every few blocks costs less than a gather and a scatter of the kept rows at every block.
    """

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # (rows, blocks) bool, CPU, in the current order
        self.order: torch.Tensor | None = None  # current position -> the caller's row

    def ranges(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """``x`` (re-sorted if that pays) and the ranges of ``block``'s kept rows in it, or None
        where the block should gather (MAX_RANGES 0)."""
        if MAX_RANGES == 0:
            return x, None
        runs = kept_ranges(self.keep[:, block])
        if len(runs) == 1 or (len(runs) <= MAX_RANGES and min(b - a for a, b in runs) >= MIN_RANGE_ROWS):
            return x, runs
        perm = contiguous_order(self.keep[:, block:])
        if perm is None:  # already in that order (cannot leave this block's rows split; a guard)
            return x, runs
        self.keep = self.keep[perm]
        self.order = perm if self.order is None else self.order[perm]
        return take_rows(x, perm.to(x.device)), kept_ranges(self.keep[:, block])

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its rows back in the caller's order (a gather, not a scatter)."""
        if self.order is None:
            return x
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(len(self.order))
        return take_rows(x, inverse.to(x.device))


def kept_ranges(column: torch.Tensor) -> list[tuple[int, int]]:
    """The ``(start, stop)`` ranges of the set entries of a 1-D bool CPU tensor."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], column.numpy().astype(np.int8), [0]))))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


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


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    view = _rows_view(x)
    if view.dim() != 2:  # neither layout is contiguous: a plain gather
        return x.index_select(0, rows)
    return _from_rows(view.index_select(0, rows), x)


def put_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
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


class FixedSubset(nn.Module):
    """A skippable backbone run with one keep mask for every image: the plain shorter network it
    is (the stem, the kept blocks in order, a skipped downsampling block's shortcut, the head).

    ``model(x, mask.expand(len(x), -1))`` computes the same, but validates the mask and decides
    per block on the host at every call; at batch 1 that host work is ~5% of a ResNet-32 subset's
    time (docs/results.md, session 12). Here the plan is fixed once, so a cascade's static stages
    (``agents.cascade.CascadeModel``) pay only for their blocks. Training mode and autograd run
    the same way; a model with path heads classifies through its path's head.
    """

    def __init__(self, model: nn.Module, mask: torch.Tensor):
        super().__init__()
        mask = check_keep_mask(mask.reshape(1, -1), 1, model.num_blocks)[0]
        self.model = model
        self.mask = mask  # bool, CPU
        self.kept = mask.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.stem(x)
        for block, kept in zip(model.blocks, self.kept):
            if kept:
                x = model._call_block(block, x)
            elif block.downsamples:
                x = block.skip(x)
        if model.path_heads is None:
            return model.head(x)
        return model.classify(x, self.mask.to(x.device).expand(x.shape[0], -1))
