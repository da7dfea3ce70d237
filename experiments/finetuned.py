"""Fine-tuned copies of a run's backbone: the one recipe and budget behind every fine-tuned
static network of ``experiments.compare`` (fixed subsets, random dropping, the full backbone) and
the last stage of ``experiments.cascade``. Each is kept in ``runs/<name>/baselines/<name>.pt``
with its training seconds, and loaded from there on ``--resume``.
"""

from __future__ import annotations

import copy

import torch

from backbone.data.datasets import Splits
from backbone.models.weights import load_checkpoint, load_model, save_checkpoint
from backbone.training.loop import train
from backbone.training.refit import refit_heads, refit_images
from experiments.config import ExperimentConfig


def finetuned_on_masks(cfg: ExperimentConfig, backbone, name: str, sampler, splits: Splits, resume: bool,
                       loss_fn_for=None):
    """``backbone`` fine-tuned with the joint fine-tuning's recipe and budget (``cfg.finetune``),
    each batch run with ``sampler``'s masks (None: every block); ``loss_fn_for(model)``, if given,
    makes the training loss of the copy being trained (``backbone.training.loop.train``'s
    ``loss_fn``). Kept in ``baselines/<name>.pt``. Returns (model, training seconds)."""
    out = cfg.run_dir / "baselines" / f"{name}.pt"
    if resume and out.exists():
        return load_model(out).to(next(backbone.parameters()).device), load_checkpoint(out)["train_time_s"]
    model = copy.deepcopy(backbone)
    history = train(model, splits.train, None, cfg.finetune, checkpoint_dir=out.parent / f"checkpoints_{name}",
                    resume=resume, mask_sampler=sampler, loss_fn=None if loss_fn_for is None else loss_fn_for(model),
                    seed=cfg.seed, desc=name)
    train_time = sum(r["epoch_time_s"] for r in history["history"])
    if cfg.finetune.refit_heads:  # the pair's refit (agents.joint), on the same images, with this method's masks
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed + 3)
        masks_for = None if sampler is None else (lambda images: sampler(images, None, gen))
        train_time += refit_heads(model, refit_images(splits.train, cfg.finetune.refit_heads, cfg.seed), masks_for)
    save_checkpoint(out, model, train_time_s=train_time)
    return model, train_time


def finetuned_on_mask(cfg: ExperimentConfig, backbone, name: str, mask: torch.Tensor, splits: Splits, resume: bool,
                      loss_fn_for=None):
    """:func:`finetuned_on_masks` with one keep mask for every image: a fixed subset."""
    fixed = mask.to(next(backbone.parameters()).device)
    return finetuned_on_masks(cfg, backbone, name, lambda images, *_: fixed.expand(images.shape[0], -1), splits, resume,
                              loss_fn_for)
