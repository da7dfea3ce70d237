"""Inference over a whole dataset (in memory or streamed): logits, top-1 accuracy and loss,
optionally with the blocks chosen per batch. Used by the training loop's validation and by every
stage that scores a model."""

from __future__ import annotations

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
