"""CIFAR ResNets (He et al. 2016, section 4.2) whose residual blocks can be skipped per sample.

The 3n residual blocks of a depth-(6n+2) network form one flat, indexable sequence
(``model.blocks[i]``). ``model(x, keep_mask)`` runs block ``i`` only on the rows whose
``keep_mask[:, i]`` is set; the other rows take the block's shortcut (the identity, or for a
downsampling block its strided shortcut). Skipped rows therefore cost nothing, unlike
"compute then multiply by the mask".

Module names follow the published CIFAR-ResNet layout (``conv1``, ``bn1``, ``layer{1,2,3}.{i}``,
``fc``) so that public state dicts load with little renaming (see ``backbone.models.weights``).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.models.blocks import ResidualBlock
from backbone.models.fused import conv_bn
from backbone.models.path_heads import PathHeads
from backbone.models.masked import (
    SortedRows,
    call_block,
    check_keep_mask,
    contiguous_order,
    memory_format_of,
    run_block_masked,
    run_block_on_ranges,
)

#: Per-channel input statistics; the model normalises its own input (uint8 or float in [0, 1]).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Several public CIFAR checkpoints (e.g. the widely used option-A ResNets) were trained
    # with ImageNet statistics; import them with normalization="imagenet".
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

SHORTCUTS = ("A", "B")


class ShortcutA(nn.Module):
    """Parameter-free shortcut: strided subsampling and zero channel padding on both sides."""

    costs_no_flops = True  # the masked runner may apply it to every row (run_block_masked)

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_front = (planes - in_planes) // 2
        self.pad_back = planes - in_planes - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


#: oneDNN's AVX2 kernel for the weight gradient of a strided 1x1 convolution on channels-last
#: input writes out of bounds when the input has fewer channels than one AVX2 register holds
#: (8 floats): random hangs, aborts and segfaults in ``backward()`` on AVX2-only CPUs (e.g. AMD
#: EPYC), never on AVX-512 ones. Reproducer and measurements: docs/results.md, "oneDNN AVX2".
ONEDNN_AVX2_MIN_CHANNELS = 8


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (the option-B shortcut) that never reaches oneDNN's faulty kernel.

    Where the bug can strike (on the CPU, stride > 1, fewer than 8 input channels; whatever the
    layout, since PyTorch picks channels-last when either the input or the weight is) it
    subsamples first and convolves with unit stride: the same function (a 1x1 kernel reads only
    the pixels the stride keeps) through a correct kernel. Elsewhere it is a plain
    ``nn.Conv2d``: at larger channel counts the subsampled form is 1.2-3.5x slower.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride
        if x.device.type == "cpu" and self.in_channels < ONEDNN_AVX2_MIN_CHANNELS and max(stride) > 1:
            return F.conv2d(x[:, :, :: stride[0], :: stride[1]], self.weight, self.bias)
        return super().forward(x)


def _shortcut(in_planes: int, planes: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_planes, planes, stride)
    return nn.Sequential(PointwiseConv(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions with a shortcut: ``relu(shortcut(x) + gate * residual(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)
        self.out_planes = planes
        self.stride = stride
        self.downsamples = not isinstance(self.shortcut, nn.Identity)

    def before_last_conv(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(self.conv1, self.bn1, x, relu=True)

    def last_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        return self.conv2, self.bn2

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """What a row whose keep bit is clear gets: the shortcut alone."""
        return self.shortcut(x)


class SkippableResNet(nn.Module):
    """Base of the skippable backbones: ``stem`` → ``blocks`` (one flat, indexable sequence of
    residual blocks, each with ``skip`` and ``downsamples``) → ``head``.

    Subclasses set ``self._blocks`` (a tuple), ``self.arch`` (a dict with at least
    ``num_classes``) and define ``stem`` and ``head``; the masked forward, the block runner and
    ``compile_blocks`` are shared, so every model kind really skips in the same way.
    """

    _blocks: tuple[nn.Module, ...] = ()
    _call_block: Callable[..., torch.Tensor] = staticmethod(call_block)
    arch: dict
    fc: nn.Linear

    def __init__(self):
        super().__init__()
        self.path_heads: PathHeads | None = None

    def attach_path_heads(self, masks: torch.Tensor | int) -> SkippableResNet:
        """One classifier per path of ``masks`` (``backbone.models.path_heads``), kept in ``arch``."""
        self.path_heads = PathHeads(masks, self.fc, self.num_blocks).to(self.fc.weight.device)
        self.arch = {**self.arch, "path_heads": len(self.path_heads.masks)}
        return self

    def compile_blocks(self, enabled: bool = True, **compile_kwargs) -> SkippableResNet:
        """Run every block through ``torch.compile`` (``enabled=False``: eagerly again); returns self.

        Blocks, not the whole forward, are compiled because a masked forward sends a different
        number of rows through each block. With ``dynamic=True`` one graph per stage and block
        kind serves every row count, so varying masks need neither recompiles nor bucketing.
        Batch 1 and the two layouts a one-row tensor can have add specialised graphs, up to ~20
        in all, independent of depth; dynamo's default limit (8) would send the rest back to
        eager, hence the raised limit. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``).
        """
        if not enabled:
            self._call_block = call_block
            return self
        dynamo_config = torch._dynamo.config
        # The limit was called cache_size_limit before torch 2.7 (setup.py allows torch >= 2.4).
        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
        self._call_block = torch.compile(call_block, **{"dynamic": True, **compile_kwargs})
        return self

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        return self._blocks

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_classes(self) -> int:
        return self.arch["num_classes"]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:  # (batch, feature_dim): what the classifier reads
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))

    def classify(self, x: torch.Tensor, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``head``, or with path heads and the rows' ``keep_mask``, each row's path's classifier."""
        if self.path_heads is None or keep_mask is None:
            return self.head(x)
        return self.path_heads(self.pool(x), keep_mask, self.fc)

    def forward(self, x: torch.Tensor, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for images ``x`` (batch, 3, H, W), uint8 or float in [0, 1].

        ``keep_mask``: optional (batch, num_blocks) bool or 0/1 tensor; row ``r`` runs block ``i``
        only where ``keep_mask[r, i]`` is set. A floating mask that requires grad acts as a
        hard differentiable gate: kept rows multiply their residual by it (value 1), so its
        gradient flows; skipped rows have no residual and get no gradient.
        """
        order = self._inference_order(keep_mask, x.shape[0])
        if order is None:
            return self.classify(self.run_blocks(self.stem(x), keep_mask), keep_mask)
        # Sorting the images (3 channels, often uint8) costs far less than sorting an activation:
        # the blocks then find their kept rows in contiguous ranges (run_blocks); the logits go
        # back to the caller's order.
        order = order.to(x.device)
        keep_mask = keep_mask.index_select(0, order.to(keep_mask.device))
        logits = self.classify(self.run_blocks(self.stem(x.index_select(0, order)), keep_mask), keep_mask)
        return torch.empty_like(logits).index_copy_(0, order, logits)

    def _inference_order(self, keep_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        # Only at inference: the ranges path writes into its input (run_block_on_ranges).
        if keep_mask is None or batch < 2 or torch.is_grad_enabled() or self.training:
            return None
        return contiguous_order(check_keep_mask(keep_mask, batch, self.num_blocks))

    def run_blocks(self, x: torch.Tensor, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks on the stem's output ``x``, each on the rows of ``keep_mask`` that keep it
        (all rows when ``keep_mask`` is None): what a policy that looks at the stem's output
        calls after deciding, so the stem runs once."""
        call = self._call_block
        if keep_mask is None:
            for block in self._blocks:
                x = call(block, x)
            return x
        keep_cpu = check_keep_mask(keep_mask, x.shape[0], self.num_blocks)
        with_gate = keep_mask.is_floating_point() and keep_mask.requires_grad
        # Decided on the host for all blocks at once: a block that every row (or no row) keeps
        # runs on the whole batch as it is (or is skipped), with no index work at all. So a
        # batch that shares one mask (batch 1, or a policy that settled on one mask) runs as a
        # plain shorter network, and with a few distinct masks only the blocks they disagree
        # on pay for a gather and a scatter.
        kept_by_all, kept_by_none = keep_cpu.all(0).tolist(), (~keep_cpu.any(0)).tolist()
        # Without autograd the rows are kept sorted by mask (masked.SortedRows): a block whose
        # kept rows lie in a few contiguous ranges runs on views of them, with no gather or
        # scatter; forward() sorts the images, so the first re-sort here is rarely needed.
        # (Eval mode only: in training mode BatchNorm would normalise each range on its own.)
        rows = SortedRows(keep_cpu) if not (with_gate or torch.is_grad_enabled() or self.training) else None
        device = x.device
        for i, block in enumerate(self._blocks):
            if kept_by_none[i]:
                if block.downsamples:  # an identity shortcut needs no call at all
                    x = block.skip(x)
            elif kept_by_all[i]:
                x = call(block, x, keep_mask[:, i] if with_gate else None)
            else:
                if rows is not None:
                    x, runs = rows.ranges(x, i)
                    if runs is not None:
                        x = run_block_on_ranges(block, x, runs, call)
                        continue
                column = keep_cpu[:, i]
                keep_rows = column.nonzero().squeeze(1).to(device, non_blocking=True)
                skip_rows = (~column).nonzero().squeeze(1).to(device, non_blocking=True)
                gate = keep_mask[keep_rows, i] if with_gate else None
                # x is this forward's own intermediate: without autograd it may be overwritten.
                inplace = not (torch.is_grad_enabled() and x.requires_grad)
                x = run_block_masked(block, x, keep_rows, skip_rows, gate, inplace, call)
        return rows.restore(x) if rows is not None else x


class CifarResNet(SkippableResNet):
    """ResNet for 32x32 inputs: stem, three stages of ``n`` basic blocks, global pool, linear."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        shortcut: str = "A",
        width: int = 16,
        normalization: str | tuple = "cifar10",
    ):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be positive, got {num_classes}, {width}")
        mean, std = _normalization(normalization)
        n = (depth - 2) // 6
        self.arch = {
            "depth": depth,
            "num_classes": num_classes,
            "shortcut": shortcut,
            "width": width,
            "normalization": [list(mean), list(std)],
        }
        # Not persistent: public state dicts do not carry them; our checkpoints keep them in "arch".
        # (x - mean) / std as one scale-and-shift; uint8 input also folds in the division by 255.
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("input_shift", -mean_t / std_t, persistent=False)
        self.register_buffer("input_scale", 1 / std_t, persistent=False)
        self.register_buffer("input_scale_uint8", 1 / (255 * std_t), persistent=False)

        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 1 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        # A plain tuple, not a ModuleList: the blocks are already registered under layer{1,2,3},
        # and a second registration would duplicate every key in the state dict.
        self._blocks = tuple(self.layer1) + tuple(self.layer2) + tuple(self.layer3)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each block: every block starts as the identity, which helps
        # deep nets train and makes skipping a block an initially harmless change.
        for block in self._blocks:
            nn.init.zeros_(block.bn2.weight)
        # channels_last: convolutions run 1.2-1.5x faster in it on CPUs (oneDNN; measured by
        # experiments.benchmark) and on GPUs; activations follow the weights' layout (see stem).
        # model.to(memory_format=torch.contiguous_format) switches back.
        self.to(memory_format=torch.channels_last)

    @property
    def depth(self) -> int:
        return self.arch["depth"]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the input (uint8 or float in [0, 1]) and apply the first convolution."""
        # Into the weights' layout first (cheapest while still uint8), then one fused op: at
        # batch 1 every elementwise op's fixed cost shows (the stem is what a mask cannot skip).
        x = x.contiguous(memory_format=memory_format_of(self.conv1.weight))
        scale = self.input_scale_uint8 if x.dtype == torch.uint8 else self.input_scale
        x = torch.addcmul(self.input_shift, x.float(), scale)
        return conv_bn(self.conv1, self.bn1, x, relu=True)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

class BackboneWrapper(nn.Module):
    """Base of modules that wrap a skippable backbone as ``self.backbone`` (gated model, policy +
    backbone pair) and expose what the training loop needs of it."""

    backbone: SkippableResNet

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes


def _normalization(spec: str | Sequence) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(spec, str):
        if spec not in NORMALIZATION:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATION)} or [mean, std], got {spec!r}")
        return NORMALIZATION[spec]
    mean, std = (tuple(float(v) for v in part) for part in spec)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalization [mean, std] needs 3 means and 3 positive stds, got {spec!r}")
    return mean, std


def parse_depth(name_or_depth: str | int) -> int:
    """``56``, ``"56"``, ``"resnet56"`` and ``"ResNet-56"`` all mean depth 56."""
    if isinstance(name_or_depth, int):
        return name_or_depth
    match = re.fullmatch(r"(?:resnet[-_]?)?(\d+)", str(name_or_depth).strip().lower())
    if not match:
        raise ValueError(f"unknown architecture {name_or_depth!r}: expected e.g. 'resnet56' or 56")
    return int(match.group(1))


def build_resnet(
    name_or_depth: str | int,
    num_classes: int = 10,
    shortcut: str = "A",
    width: int = 16,
    normalization: str | Sequence = "cifar10",
) -> CifarResNet:
    """Build a CIFAR ResNet: ``build_resnet("resnet56", 100)``; depth must be 6n+2.

    ``shortcut``: "A" (parameter-free, as in the paper's CIFAR experiments) or "B" (1x1 conv + BN).
    ``width``: channels of the first stage (16 in the paper); stages use width, 2w, 4w.
    ``normalization``: input statistics, a name from ``NORMALIZATION`` or ``[mean, std]``.
    """
    return CifarResNet(parse_depth(name_or_depth), num_classes, shortcut, width, normalization)
