"""Refit a fine-tuned network's linear classifier on clean training images (``finetune.refit_heads``).

A short fine-tuning (an epoch of SGD on augmented images, often with distillation) leaves the
last layer short of the best linear read-out of the features the path now computes. With the
body frozen, finding it is a convex problem: one pass over N clean training images to pool the
features of each path, then L-BFGS on the cross-entropy (a small L2 term keeps it bounded when
the features separate the classes). It matters most where one backbone serves several paths
with one classifier: a ladder pair then gets one head per rung (``backbone.models.path_heads``),
each refitted on all N images through its rung. On akamaster's ResNet-32 this lifted the
distilled pair by 0.8 points and fixed subsets fine-tuned alone by 0.2-0.4 (docs/results.md).
Every fine-tuned method of the comparison (the pair, fixed subsets, random dropping, the full
network, the gates on their own decisions) gets the same refit on the same images.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.data.datasets import ImageDataset
from backbone.data.streaming import in_memory
from backbone.training import distributed

L2 = 1e-4  # per weight, against the mean cross-entropy: small, only there to bound the solution
MAX_ITERATIONS = 200


MasksFor = Callable[[torch.Tensor], torch.Tensor]  # a batch of images -> their (B, L) keep masks


def refit_images(train_set, num_images: int, seed: int) -> ImageDataset:
    """The refit's images: a seeded stratified subset of the training split, in memory: the same
    for every method of a run (so their refits compare) and on every rank under torchrun."""
    return in_memory(train_set, num_images, seed + 3)


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, masks_for: MasksFor | None, batch_size: int = 500) -> torch.Tensor:
    """(N, feature_dim): ``images`` (uint8, on the model's device), each batch through
    ``masks_for(batch)`` (None: all blocks), pooled."""
    out = []
    for x in images.split(batch_size):
        out.append(model.pool(model.run_blocks(model.stem(x), None if masks_for is None else masks_for(x))))
    return torch.cat(out)


def refit_linear(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Minimise cross-entropy + L2·|W|² of the linear layer (``weight``, ``bias``) on ``features``,
    starting from its current values, which are overwritten."""
    w, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(features, w, b), labels) + L2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        weight.copy_(w)
        bias.copy_(b)


def refit_heads(model: nn.Module, dataset: ImageDataset, masks_for: MasksFor | None = None) -> float:
    """Refit ``model``'s classifiers on ``dataset`` (in memory, clean): with path heads, each head
    that ``masks_for`` uses for some image (None: every head) on every image through its path;
    else ``fc`` on the images through ``masks_for(images)`` (the method's own masks; None: all
    blocks). Eval mode throughout, so BatchNorm statistics do not move; returns the seconds spent."""
    tic = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images, labels = dataset.images.to(device), dataset.labels.to(device)
    heads = model.path_heads
    if heads is not None:
        # Only the paths that masks_for (the policy) sends some of the images to: a rung no image
        # takes keeps its head, and refitting it would only cost a pass over the images.
        used = range(len(heads.masks)) if masks_for is None else \
            sorted(set(heads.path_index(torch.cat([masks_for(x) for x in images.split(500)]))) - {-1})
        for k in used:
            mask = heads.masks[k]
            features = pooled_features(model, images, lambda x, mask=mask: mask.reshape(1, -1).expand(len(x), -1))
            refit_linear(heads.weight[k], heads.bias[k], features, labels)
    else:
        refit_linear(model.fc.weight, model.fc.bias, pooled_features(model, images, masks_for), labels)
    model.train(was_training)
    distributed.broadcast_module(model)  # under torchrun: rank 0's heads are every rank's
    return time.perf_counter() - tic
