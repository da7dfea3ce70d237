"""Is a policy input-adaptive? Measured, not assumed, wherever a policy is evaluated.

From the per-image keep masks (and, where the policy has them, its per-image keep
probabilities) of one evaluation: how many distinct masks it uses and how many of them cover
90% of the images, the spread of blocks per image, and blocks and accuracy per difficulty group.
Difficulty groups are the synthetic dataset's known levels, or on real data the quartiles of a
proxy computed from the full backbone alone: its true-class margin on the image (true logit −
best other logit), quartile 1 = the easiest quarter (largest margins), 4 = the hardest.
"""

from __future__ import annotations

import torch

from backbone.data.datasets import ImageDataset
from backbone.training.loop import predict


def true_class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: the true class's logit minus the best other class's (negative = misclassified)."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return true - others.max(1).values


def difficulty_groups(backbone, dataset: ImageDataset) -> tuple[torch.Tensor, list[str], str]:
    """(group index per image, group names, how the groups were made).

    The dataset's own difficulty levels when it has them; otherwise the quartiles of the full
    backbone's true-class margin (``backbone`` runs every block, nothing else is consulted).
    """
    if dataset.difficulty is not None:
        levels = dataset.difficulty.cpu().long()
        names = [f"level {int(v)}" for v in levels.unique().tolist()]
        return levels - levels.min(), names, "the dataset's difficulty levels (0 = easiest)"
    margin = true_class_margin(predict(backbone, dataset), dataset.labels.cpu())
    # Rank-based quartiles: exactly a quarter of the images each, ties broken by position.
    order = margin.argsort(descending=True, stable=True)
    groups = torch.empty(len(margin), dtype=torch.long)
    groups[order] = torch.arange(len(margin)) * 4 // max(len(margin), 1)
    names = ["Q1 easiest", "Q2", "Q3", "Q4 hardest"]
    return groups, names, "quartiles of the full backbone's true-class margin (Q1 = largest margin = easiest)"


def adaptivity(keep_mask: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor | None = None,
               group_names: list[str] | None = None, keep_prob: torch.Tensor | None = None) -> dict:
    """Adaptivity of one evaluation.

    ``keep_mask`` (N, L) bool: the blocks each image ran. ``correct`` (N,) bool. ``groups`` (N,)
    int64 difficulty group per image, with ``group_names``. ``keep_prob`` (N, L): the policy's
    per-image probability of keeping each block (before thresholding), if it has one.
    """
    keep_mask, correct = keep_mask.bool().cpu(), correct.bool().cpu()
    n, num_blocks = keep_mask.shape
    blocks = keep_mask.sum(1).double()
    patterns, inverse, counts = torch.unique(keep_mask, dim=0, return_inverse=True, return_counts=True)
    shares = counts.sort(descending=True).values.double() / max(n, 1)
    covering = int((shares.cumsum(0) < 0.9 - 1e-12).sum().item()) + 1 if n else 0
    result = {
        "distinct_masks": int(len(patterns)),
        "masks_covering_90pct": min(covering, int(len(patterns))),
        "top_mask_share": shares[0].item() if n else 0.0,
        "blocks_used_mean": blocks.mean().item() if n else 0.0,
        "blocks_used_std": blocks.std(unbiased=False).item() if n else 0.0,
        "blocks_histogram": torch.bincount(blocks.long(), minlength=num_blocks + 1).tolist(),
    }
    if groups is not None:
        groups = groups.cpu()
        names = group_names or [str(int(g)) for g in groups.unique().tolist()]
        per_group = {}
        for g in groups.unique().tolist():
            rows = groups == g
            per_group[names[g] if g < len(names) else str(g)] = {
                "count": int(rows.sum()), "accuracy": correct[rows].double().mean().item(),
                "blocks_used": blocks[rows].mean().item(), "blocks_used_std": blocks[rows].std(unbiased=False).item(),
            }
        result["by_difficulty"] = per_group
        means = [v["blocks_used"] for v in per_group.values()]
        result["hard_minus_easy_blocks"] = means[-1] - means[0]
    if keep_prob is not None:
        p = keep_prob.double().cpu()
        result["keep_prob"] = {
            "mean_per_block": p.mean(0).tolist(),
            # How much a block's probability differs between images: 0 for a static policy.
            "std_across_images_per_block": p.std(0, unbiased=False).tolist(),
            "undecided_share": ((p > 0.1) & (p < 0.9)).double().mean().item(),
            "histogram": torch.histc(p.float(), bins=10, min=0, max=1).long().tolist(),
        }
    return result


#: The adaptivity scalars logged to TensorBoard wherever a policy is evaluated.
SCALARS = ("distinct_masks", "masks_covering_90pct", "top_mask_share", "blocks_used_std", "hard_minus_easy_blocks")


def log_adaptivity(record, prefix: str, result: dict, step: int | None = None) -> None:
    """Write one evaluation's adaptivity (``result["adaptivity"]``, see :func:`adaptivity`) as
    TensorBoard scalars and histograms under ``prefix/``: the scalars of :data:`SCALARS`, blocks
    and accuracy per difficulty group, the per-image blocks used and keep probabilities.
    ``record(tag, value, step)``: ``SummaryWriter.add_scalar``-like; tensors are histograms."""
    a = result["adaptivity"]
    for key in SCALARS:
        if a.get(key) is not None:
            record(f"{prefix}/{key}", float(a[key]), step)
    for name, group in a.get("by_difficulty", {}).items():
        record(f"{prefix}/blocks_used/{name}", float(group["blocks_used"]), step)
        record(f"{prefix}/accuracy/{name}", float(group["accuracy"]), step)
    histogram = torch.tensor(a["blocks_histogram"], dtype=torch.float64)
    record(f"{prefix}/blocks_used_per_image", torch.repeat_interleave(torch.arange(len(histogram)).double(),
                                                                      histogram.long()), step)
    if "keep_prob" in a:
        record(f"{prefix}/keep_prob_std_across_images", torch.tensor(a["keep_prob"]["std_across_images_per_block"]), step)
