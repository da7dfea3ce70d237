"""Inference over a whole dataset (in memory or streamed): logits, top-1 accuracy and loss,
optionally with the blocks chosen per batch. Used by the training loop's validation and by every
stage that scores a model."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from backbone.data.datasets import ImageDataset
from backbone.data.streaming import ImageFiles, make_loader
from backbone.models.resnet import CifarResNet
from backbone.training.recipe import autocast


@torch.no_grad()
def predict(
    model: CifarResNet,
    dataset: ImageDataset | ImageFiles,
    batch_size: int = 512,
    keep_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: bool = True,
) -> torch.Tensor:
    """Logits (float32, CPU) of ``model`` on every image of ``dataset`` (in memory, or streamed
    from disk with the evaluation transforms), in order.

    ``keep_mask_fn(images) -> keep_mask`` chooses the blocks per batch (None: all blocks).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    loader = make_loader(dataset, batch_size, device=device, shuffle=False)
    for images, _ in loader.epoch_batches(0):
        keep_mask = keep_mask_fn(images) if keep_mask_fn is not None else None
        with autocast(device, amp):
            outputs.append(model(images, keep_mask).float().cpu())
    model.train(was_training)
    if not outputs:
        return torch.empty(0, model.num_classes)
    return torch.cat(outputs)


def evaluate(
    model: CifarResNet,
    dataset: ImageDataset | ImageFiles,
    batch_size: int = 512,
    keep_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset``."""
    return scores(predict(model, dataset, batch_size, keep_mask_fn), dataset.labels)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``logits`` against ``labels``."""
    return {
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "num_images": len(labels),
    }


@torch.no_grad()
def recalibrate_batchnorm(model: CifarResNet, images: torch.Tensor, keep_mask: torch.Tensor | None = None,
                          batch_size: int = 256) -> CifarResNet:
    """A copy of ``model`` (eval mode) whose BatchNorm statistics are re-estimated on ``images``
    (uint8, on the model's device) run with ``keep_mask`` (one row: every image takes that path;
    None: all blocks); no weight changes. Each statistic is the plain average of the per-batch
    ones over the batches of ``batch_size`` (PyTorch's cumulative average, ``momentum=None``).

    A network trained with every block sees other activation statistics once blocks are skipped;
    re-estimating them for one path costs one pass over a few thousand images and shows how much
    of that path's accuracy loss is statistics rather than weights (``experiments.recalibrate``).
    The copy is only valid for that path: BatchNorms of skipped blocks keep reset statistics.
    """
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch, not an exponential one
    net.train()
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        net(x, None if keep_mask is None else keep_mask.reshape(1, -1).expand(len(x), -1))
    return net.eval()
