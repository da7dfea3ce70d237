"""Honest baselines for a dynamic-depth model: what the same compute buys without a policy.

- a static ResNet whose depth gives the FLOPs closest to the gated model's average
  (trained with the same recipe elsewhere, with ``backbone.training.loop.train``);
- random dropping: every image keeps each block with the gated model's keep rate;
- the best fixed subset of blocks of that size, found greedily on held-out images.
"""

from __future__ import annotations

import torch

from backbone.models.cost import measure_backbone_cost
from backbone.data.datasets import ImageDataset
from backbone.models.resnet import CifarResNet, build_resnet
from backbone.training.loop import predict

STATIC_DEPTHS = tuple(6 * n + 2 for n in range(1, 19))  # 8, 14, ..., 110


def static_depth_for_flops(target_flops: float, like: CifarResNet, depths=STATIC_DEPTHS) -> tuple[int, int]:
    """The depth (and its FLOPs) of a plain ResNet like ``like`` (width, shortcut, classes) whose
    FLOPs are closest to ``target_flops``."""
    a = like.arch
    best = None
    for depth in depths:
        flops = measure_backbone_cost(build_resnet(depth, a["num_classes"], a["shortcut"], a["width"])).full_flops
        if best is None or abs(flops - target_flops) < abs(best[1] - target_flops):
            best = (depth, flops)
    return best


def random_keep_masks(num_images: int, num_blocks: int, keep_rate: float, seed: int = 0) -> torch.Tensor:
    """Random dropping: a (num_images, num_blocks) mask keeping each block with ``keep_rate``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_images, num_blocks, generator=gen) < keep_rate


def masked_accuracy(model: CifarResNet, dataset: ImageDataset, masks: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` when image ``i`` of ``dataset`` runs with ``masks[i]``."""
    start = 0

    def next_masks(images: torch.Tensor) -> torch.Tensor:
        nonlocal start
        batch = masks[start : start + images.shape[0]].to(images.device)
        start += images.shape[0]
        return batch

    logits = predict(model, dataset, batch_size, keep_mask_fn=next_masks)
    return (logits.argmax(1) == dataset.labels).float().mean().item()


def fixed_mask_accuracy(model: CifarResNet, dataset: ImageDataset, mask: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy with the same block subset ``mask`` (num_blocks,) for every image."""
    return masked_accuracy(model, dataset, mask.expand(len(dataset), -1), batch_size)


def greedy_fixed_subset(model: CifarResNet, dataset: ImageDataset, num_keep: int, batch_size: int = 512) -> tuple[torch.Tensor, list[dict]]:
    """Drop blocks one at a time, each time the one whose removal costs the least accuracy on
    ``dataset``, until ``num_keep`` remain. Returns the bool mask (num_blocks,) and the path."""
    mask = torch.ones(model.num_blocks, dtype=torch.bool)
    path = [{"blocks": int(mask.sum()), "accuracy": fixed_mask_accuracy(model, dataset, mask, batch_size), "dropped": None}]
    while int(mask.sum()) > num_keep:
        trials = []
        for i in mask.nonzero().flatten().tolist():
            trial = mask.clone()
            trial[i] = False
            trials.append((fixed_mask_accuracy(model, dataset, trial, batch_size), i))
        accuracy, dropped = max(trials)
        mask[dropped] = False
        path.append({"blocks": int(mask.sum()), "accuracy": accuracy, "dropped": dropped})
    return mask, path
