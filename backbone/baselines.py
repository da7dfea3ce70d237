"""Honest baselines for a dynamic-depth model: what the same compute buys without a policy.

- **Static ResNets** over depth *and* width (:func:`static_family_for_flops`): the plain network
  whose FLOPs lie closest to a target, so one lies within a few percent of any budget. For a
  torchvision backbone the family is torchvision's depths (:func:`static_torchvision_for_flops`:
  ResNet-18/34/50 only, so the closest may lie far from a budget).
- **Random dropping** (:func:`random_keep_masks`): every image keeps each block with a keep rate.
- **Fixed subsets** at every size k: every one of the 2^L masks scored exactly on held-out images
  where 2^L ≤ ``EXHAUSTIVE_LIMIT`` (:func:`all_mask_correctness`, one pass that shares the
  activations of common prefixes), else a beam search (:func:`beam_search_subsets`). The best
  mask of each size is the *ladder* (:func:`subset_ladder`), also the candidate set of the
  per-image oracle (``agents.oracle``).

Every function takes a split in memory (``ImageDataset``) or streamed from disk (``ImageFiles``).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from backbone.data.datasets import ImageDataset
from backbone.data.streaming import ImageFiles, image_size_of, make_loader
from backbone.models.cost import BackboneCost, measure_backbone_cost
from backbone.models.resnet import CifarResNet, SkippableResNet
from backbone.models.weights import model_from_arch
from backbone.training.loop import predict

#: Largest mask space scored exhaustively (2^12); beyond it, beam search on held-out images.
EXHAUSTIVE_LIMIT = 4096
STATIC_DEPTHS = tuple(6 * n + 2 for n in range(1, 10))  # 8, 14, ..., 56
#: The static family of a torchvision backbone: torchvision's plain networks up to ResNet-50.
STATIC_TORCHVISION = ("resnet18", "resnet34", "resnet50")
Images = ImageDataset | ImageFiles  # a split in memory or streamed


def static_flops(depth: int, width: int, like: CifarResNet, image_size: int = 32) -> int:
    model = model_from_arch({**like.arch, "depth": depth, "width": width})
    return measure_backbone_cost(model, image_size).full_flops


def static_family_for_flops(target_flops: float, like: CifarResNet, depths=STATIC_DEPTHS,
                            image_size: int = 32, tolerance: float = 0.03) -> tuple[int, int, int]:
    """(depth, width, FLOPs) of the plain CIFAR ResNet like ``like`` (classes, shortcut,
    normalisation) for a FLOPs target, over ``depths`` and widths from half to twice ``like``'s.

    Convolution FLOPs grow with width², so for each depth the widths around
    ``width·sqrt(target / flops)`` are measured. Of the networks within ``tolerance`` of the
    target, the one whose width is closest to ``like``'s wins (a shallower network of the same
    family before a thin one; then the closer FLOPs); if none is that close, the closest FLOPs.
    """
    base_width = like.arch["width"]
    candidates = []
    for depth in depths:
        guess = base_width * math.sqrt(target_flops / static_flops(depth, base_width, like, image_size))
        for width in {math.floor(guess) + d for d in (-1, 0, 1, 2)}:
            if max(2, base_width / 2) <= width <= 2 * base_width:
                candidates.append((depth, width, static_flops(depth, width, like, image_size)))
    if not candidates:
        raise ValueError(f"no CIFAR ResNet of depth {min(depths)}-{max(depths)} and width {base_width / 2:g}-"
                         f"{2 * base_width} comes near {target_flops:.3g} FLOPs")
    close = [c for c in candidates if abs(c[2] - target_flops) <= tolerance * target_flops]
    if close:
        return min(close, key=lambda c: (abs(c[1] - base_width), abs(c[2] - target_flops)))
    return min(candidates, key=lambda c: abs(c[2] - target_flops))


def static_torchvision_for_flops(target_flops: float, like: SkippableResNet, image_size: int = 224,
                                 names=STATIC_TORCHVISION) -> tuple[str, int]:
    """(name, FLOPs) of the torchvision ResNet of ``names`` (with ``like``'s classes and
    normalisation) whose FLOPs at ``image_size`` lie closest to ``target_flops``. The family has
    only these points (ResNet-18 ≈ 0.44 and ResNet-34 ≈ 0.90 of a ResNet-50), so the closest
    may be far from the target."""
    flops = {name: measure_backbone_cost(model_from_arch({**like.arch, "name": name}), image_size).full_flops
             for name in names}
    name = min(flops, key=lambda n: abs(flops[n] - target_flops))
    return name, flops[name]


def random_keep_masks(num_images: int, num_blocks: int, keep_rate: float, seed: int = 0) -> torch.Tensor:
    """Random dropping: a (num_images, num_blocks) mask keeping each block with ``keep_rate``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_images, num_blocks, generator=gen) < keep_rate


def masked_accuracy(model: SkippableResNet, dataset: Images, masks: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` when image ``i`` of ``dataset`` runs with ``masks[i]``."""
    start = 0

    def next_masks(images: torch.Tensor) -> torch.Tensor:
        nonlocal start
        batch = masks[start : start + images.shape[0]].to(images.device)
        start += images.shape[0]
        return batch

    logits = predict(model, dataset, batch_size, keep_mask_fn=next_masks)
    return (logits.argmax(1) == dataset.labels.cpu()).float().mean().item()


def fixed_mask_accuracy(model: SkippableResNet, dataset: Images, mask: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy with the same block subset ``mask`` (num_blocks,) for every image."""
    return masked_accuracy(model, dataset, mask.expand(len(dataset), -1), batch_size)


def mask_table(num_blocks: int) -> torch.Tensor:
    """Every keep mask of ``num_blocks`` blocks, (2^L, L) bool; row m keeps block i iff bit i of m is set."""
    index = torch.arange(2 ** num_blocks).view(-1, 1)
    return (index >> torch.arange(num_blocks)) & 1 == 1


@torch.no_grad()
def all_mask_correctness(model: SkippableResNet, dataset: Images, batch_size: int = 256) -> torch.Tensor:
    """(2^L, N) bool: whether image ``n`` is classified correctly with mask ``m`` (rows of
    :func:`mask_table`). One depth-first pass per batch: the activation after block i is shared
    by all masks that agree on blocks 0..i, so scoring 2^L masks costs ~2^L block calls per batch
    instead of L·2^(L-1)."""
    num_blocks = model.num_blocks
    if 2 ** num_blocks > EXHAUSTIVE_LIMIT:
        raise ValueError(f"{num_blocks} blocks give 2^{num_blocks} masks, more than {EXHAUSTIVE_LIMIT}: use beam_search_subsets")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(2 ** num_blocks, len(dataset), dtype=torch.bool)
    start = 0
    for images, labels in make_loader(dataset, batch_size, shuffle=False, device=device).epoch_batches(0):
        rows = slice(start, start + len(labels))

        def visit(i: int, h: torch.Tensor, index: int) -> None:
            if i == num_blocks:
                out[index, rows] = (model.head(h).argmax(1) == labels).cpu()
                return
            block = model.blocks[i]
            visit(i + 1, block.skip(h) if block.downsamples else h, index)
            visit(i + 1, block(h), index | (1 << i))

        visit(0, model.stem(images), 0)
        start += len(labels)
    model.train(was_training)
    return out


def beam_search_subsets(model: SkippableResNet, dataset: Images, beam: int = 4, batch_size: int = 512) -> dict[int, torch.Tensor]:
    """For networks too deep to score every mask: backward elimination with a beam. From the full
    mask, each step drops one more block from each of the ``beam`` best masks of the previous
    size and keeps the ``beam`` most accurate results. Returns {size k: best mask (L,) bool}."""
    num_blocks = model.num_blocks
    frontier = [torch.ones(num_blocks, dtype=torch.bool)]
    best = {num_blocks: frontier[0]}
    # Up to beam·L(L+1)/2 masks, each scored on every image: minutes for a 21-block network on a CPU.
    total = sum(min(beam, math.comb(num_blocks, k + 1)) * (k + 1) for k in range(num_blocks))
    with tqdm(total=total, desc="subset search", unit="mask", leave=False) as progress:
        for k in range(num_blocks - 1, -1, -1):
            candidates = {}
            for mask in frontier:
                for i in mask.nonzero().flatten().tolist():
                    trial = mask.clone()
                    trial[i] = False
                    candidates.setdefault(tuple(trial.tolist()), trial)
            scored = []
            for key, m in candidates.items():
                scored.append((fixed_mask_accuracy(model, dataset, m, batch_size), key))
                progress.update()
            scored.sort(reverse=True)
            frontier = [candidates[key] for _, key in scored[:beam]]
            best[k] = frontier[0]
    return best


def subset_ladder(model: SkippableResNet, held_out: Images, cost: BackboneCost | None = None,
                  batch_size: int = 256, nested: bool = False) -> dict:
    """The best fixed subset of every size k = 0..L, chosen on ``held_out`` images: exhaustive
    where 2^L ≤ ``EXHAUSTIVE_LIMIT``, else beam search. Among masks of one size the more
    accurate wins, ties to the cheaper. ``nested``: instead, greedy backward elimination (a beam
    of 1), whose masks are nested: each size keeps a subset of the next size's blocks. Returns
    {"masks": (L+1, L) bool, "held_out_accuracy": [...], "flops": [...], "search": "exhaustive" |
    "beam" | "nested"}."""
    cost = cost or measure_backbone_cost(model, image_size_of(held_out))
    num_blocks = model.num_blocks
    if nested:
        best = beam_search_subsets(model, held_out, beam=1, batch_size=batch_size)
        masks = torch.stack([best[k] for k in range(num_blocks + 1)])
        return {"masks": masks, "held_out_accuracy": [fixed_mask_accuracy(model, held_out, m, batch_size) for m in masks],
                "flops": cost.mask_flops(masks).tolist(), "search": "nested"}
    if 2 ** num_blocks <= EXHAUSTIVE_LIMIT:
        table = mask_table(num_blocks)
        accuracy = all_mask_correctness(model, held_out, batch_size).double().mean(1)
        flops = cost.mask_flops(table)
        sizes = table.sum(1)
        chosen = []
        for k in range(num_blocks + 1):
            rows = (sizes == k).nonzero().flatten()
            # Most accurate first, then cheapest (accuracy steps are >= 1/N, the FLOPs term < 1/N).
            key = accuracy[rows] - flops[rows] / flops.max() / (2 * max(len(held_out), 1))
            chosen.append(int(rows[key.argmax()]))
        masks, held_out_accuracy, search = table[chosen], accuracy[chosen].tolist(), "exhaustive"
    else:
        best = beam_search_subsets(model, held_out, batch_size=batch_size)
        masks = torch.stack([best[k] for k in range(num_blocks + 1)])
        held_out_accuracy = [fixed_mask_accuracy(model, held_out, m, batch_size) for m in masks]
        search = "beam"
    return {"masks": masks, "held_out_accuracy": held_out_accuracy, "flops": cost.mask_flops(masks).tolist(),
            "search": search}


def oracle_curve(correct: torch.Tensor, flops: torch.Tensor, full_flops: float, points: int = 41) -> dict:
    """The per-image oracle among candidate masks: how accurate any policy choosing from them
    could be at each FLOPs budget.

    ``correct`` (C, N) bool: image n is right with candidate c; ``flops`` (C,) per-image FLOPs of
    each candidate. Every correct prediction is worth the same, so for any budget the best
    assignment gives each image its cheapest candidate and buys correctness for the images where
    it costs the least extra (the cheapest correct candidate minus the cheapest one), in that
    order. Returns the Pareto curve ``{"flops_ratio": [...], "accuracy": [...]}`` (``points``
    points from the cheapest assignment to the most accurate one) and its end point
    (``max_accuracy`` at ``flops_ratio_at_max``: every image that some candidate gets right, at
    its cheapest correct candidate).
    """
    correct, flops = correct.bool().cpu(), flops.double().cpu()
    n = correct.shape[1]
    cheapest = flops.min()
    masked = torch.where(correct, flops.view(-1, 1), torch.full_like(correct, float("inf"), dtype=torch.float64))
    extra = (masked.min(0).values - cheapest).sort().values  # inf: no candidate gets it right
    reachable = extra[torch.isfinite(extra)]
    total = cheapest * n + torch.cat([torch.zeros(1, dtype=torch.float64), reachable.cumsum(0)])
    accuracy = torch.arange(len(reachable) + 1, dtype=torch.float64) / max(n, 1)
    free = int((reachable == 0).sum())  # right at the cheapest candidate already: the curve starts there
    picks = torch.linspace(free, len(reachable), min(points, len(reachable) - free + 1)).round().long()
    return {
        "flops_ratio": (total[picks] / n / full_flops).tolist(),
        "accuracy": accuracy[picks].tolist(),
        "max_accuracy": accuracy[-1].item(),
        "flops_ratio_at_max": (total[-1] / n / full_flops).item(),
        "candidates": int(correct.shape[0]),
    }


def mask_string(mask: torch.Tensor) -> str:
    """"1" = block run, "0" = skipped, block 0 first."""
    return "".join("1" if b else "0" for b in mask.bool().tolist())
