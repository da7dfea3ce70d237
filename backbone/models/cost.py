"""FLOPs and parameters per block, measured with ``torch.utils.flop_counter.FlopCounterMode``.

FLOPs are what FlopCounterMode counts: convolutions and matrix products, 2 per multiply-add
(so ResNet-56 is ~0.25 GFLOPs here, the "125M FLOPs" of papers that count multiply-adds).
Element-wise work (BatchNorm, ReLU, additions) is not counted, as is usual.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from backbone.models.masked import check_keep_mask
from backbone.models.resnet import SkippableResNet
from backbone.cpu_allocator import allocated_bytes


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (run under ``torch.no_grad``), as counted by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class BackboneCost:
    """Per-image cost of a skippable backbone.

    ``block_flops[i]``: block ``i`` executed; ``skip_flops[i]``: block ``i`` skipped (its shortcut,
    nonzero only for an option-B downsampling block).
    """

    stem_flops: int
    head_flops: int
    block_flops: tuple[int, ...]
    skip_flops: tuple[int, ...]
    stem_params: int
    head_params: int
    block_params: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_flops)

    @property
    def full_flops(self) -> int:
        return self.stem_flops + self.head_flops + sum(self.block_flops)

    @property
    def min_flops(self) -> int:
        return self.stem_flops + self.head_flops + sum(self.skip_flops)

    @property
    def total_params(self) -> int:
        return self.stem_params + self.head_params + sum(self.block_params)

    def mask_flops(self, keep_mask: torch.Tensor) -> torch.Tensor:
        """FLOPs per image (float64, shape (batch,)) of running the backbone with ``keep_mask``."""
        if keep_mask.dim() == 1:
            keep_mask = keep_mask.unsqueeze(0)
        keep = check_keep_mask(keep_mask, keep_mask.shape[0], self.num_blocks).double()
        kept = torch.tensor(self.block_flops, dtype=torch.float64)
        skipped = torch.tensor(self.skip_flops, dtype=torch.float64)
        return self.stem_flops + self.head_flops + keep @ kept + (1 - keep) @ skipped

    def flops_ratio(self, keep_mask: torch.Tensor, extra_flops: float = 0.0) -> torch.Tensor:
        """Per-image FLOPs of the masked backbone (plus ``extra_flops``, e.g. a policy) over the full one."""
        return (self.mask_flops(keep_mask) + extra_flops) / self.full_flops

    def as_dict(self) -> dict:
        return {
            "full_flops": self.full_flops,
            "min_flops": self.min_flops,
            "stem_flops": self.stem_flops,
            "head_flops": self.head_flops,
            "block_flops": list(self.block_flops),
            "skip_flops": list(self.skip_flops),
            "total_params": self.total_params,
            "block_params": list(self.block_params),
        }


def measure_backbone_cost(model: SkippableResNet, image_size: int | None = None) -> BackboneCost:
    """Measure every block of ``model`` (any ``SkippableResNet``) on one image of ``image_size``
    pixels square by running it under FlopCounterMode. ``image_size`` defaults to the model's
    ``default_image_size`` (224 for torchvision ResNets), else 32 (CIFAR)."""
    if image_size is None:
        image_size = getattr(model, "default_image_size", 32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    block_flops, skip_flops = [], []
    with torch.no_grad():
        stem_flops = count_flops(lambda: model.stem(x))
        h = model.stem(x)
        for block in model.blocks:
            block_flops.append(count_flops(lambda: block(h)))
            skip_flops.append(count_flops(lambda: block.skip(h)))
            h = block(h)
        head_flops = count_flops(lambda: model.head(h))
    model.train(was_training)
    block_params = tuple(count_params(b) for b in model.blocks)
    # The head is the classifier ``fc`` in every model kind; the stem is all the rest (conv1 and
    # bn1 here), so no parameter is left uncounted whatever the stem's layers are called.
    head_params = count_params(model.fc)
    return BackboneCost(
        stem_flops=stem_flops,
        head_flops=head_flops,
        block_flops=tuple(block_flops),
        skip_flops=tuple(skip_flops),
        stem_params=count_params(model) - head_params - sum(block_params),
        head_params=head_params,
        block_params=block_params,
    )


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2, repeats: int = 5,
                 samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median wall-clock seconds per call of each function, measured interleaved (so drift on a
    noisy machine hits all alike), after ``warmup`` calls, synchronising CUDA around each call.
    ``samples``: filled with every round's time per function (round r of each is adjacent in
    time, so ratios of the same round cancel slow drift of the machine's speed)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples = {} if samples is None else samples
    samples.update({name: [] for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - tic)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]`` (samples of :func:`median_times`)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


@dataclass
class BlockTimes:
    """Wall-clock pieces of a full forward on one batch, in ms: ``block`` each block, ``skip`` each
    block's shortcut alone (what a row that skips a downsampling block still runs; 0 for an
    identity shortcut), ``fixed`` stem and head."""

    block: torch.Tensor
    skip: torch.Tensor
    fixed: float

    def share(self, mask: torch.Tensor) -> float:
        """The share of the full forward's time that a runner skipping at no cost would take on
        ``mask`` (rows, blocks): the kept blocks, the skipped downsampling blocks' shortcuts (as
        the FLOPs count them: a ResNet-50's 1x1 downsampling convolution is real work), stem and head."""
        kept = mask.float().mean(0)
        masked = float((kept * self.block).sum() + ((1 - kept) * self.skip).sum())
        return (self.fixed + masked) / (self.fixed + float(self.block.sum()))


def time_per_block(model, x: torch.Tensor, device, repeats: int) -> BlockTimes:
    """Each block, and each downsampling block's shortcut, timed on its own input from a full
    forward on ``x`` (median of ``repeats``)."""
    inputs = [model.stem(x)]
    for block in model.blocks:
        inputs.append(block(inputs[-1]))
    fns = {"stem": lambda: model.stem(x), "head": lambda: model.head(inputs[-1])}
    fns.update({i: (lambda b=b, h=h: b(h)) for i, (b, h) in enumerate(zip(model.blocks, inputs))})
    fns.update({("skip", i): (lambda b=b, h=h: b.skip(h)) for i, (b, h) in enumerate(zip(model.blocks, inputs)) if b.downsamples})
    times = median_times(fns, device, warmup=1, repeats=max(3, repeats))
    n = model.num_blocks
    return BlockTimes(torch.tensor([times[i] * 1e3 for i in range(n)]),
                      torch.tensor([times.get(("skip", i), 0.0) * 1e3 for i in range(n)]),
                      (times["stem"] + times["head"]) * 1e3)


class _PeakAllocated(TorchDispatchMode):
    """Reads :func:`allocated_bytes` after every operator and keeps the largest value (``start``:
    what was allocated when it was made)."""

    def __init__(self):
        super().__init__()
        self.start = self.peak = allocated_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, allocated_bytes())
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """The most memory ``fn()`` holds at once above what was allocated before it, in MiB: on CUDA
    torch's ``max_memory_allocated``; on Linux CPUs (glibc) the bytes malloc has handed out, read
    after every operator the call runs (an operator's temporaries freed before it returns are not
    seen; everything alive between operators is). Not the resident set size: that depends on what
    the allocator kept from earlier calls (one full forward of a ResNet-50 read 1,024 MiB of peak
    RSS first and 1,248 MiB later in the same process, docs/results.md). None elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if allocated_bytes() is None:
        return None
    with _PeakAllocated():  # the dispatch mode's first use allocates ~24 MB for good: not the call's
        torch.empty(0)
    sampler = _PeakAllocated()
    with sampler:
        fn()
    return (sampler.peak - sampler.start) / 2**20
