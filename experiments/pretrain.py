"""Pretrain (or import) the backbone: ``python -m experiments.pretrain --config FILE [--set k=v …]``.

Writes into ``runs/<name>/``: ``config.yaml``, ``tb/pretrain/`` (TensorBoard),
``checkpoints/pretrain/{last,best}.pt``, ``backbone.pt`` (the model later stages use) and the
``pretrain`` section of ``metrics.json``.

Data-parallel: ``torchrun --nproc_per_node=N -m experiments.pretrain --config FILE ...`` (one
process per GPU, or N CPU processes); ``pretrain.batch_size`` stays the global batch and rank 0
writes everything (``backbone.training.distributed``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from backbone.models.cost import measure_backbone_cost
from backbone.data.datasets import Splits, load_splits
from backbone.data.streaming import image_size_of
from backbone.models.resnet import SkippableResNet, build_resnet
from backbone.models.torchvision_resnet import build_torchvision_resnet, weights_num_classes
from backbone.training import distributed
from backbone.training.loop import predict, resolve_device, scores, train
from backbone.models.weights import load_model, load_weights, save_checkpoint
from experiments.common import (
    cli,
    config_from_args,
    finished_stage,
    experiment_parser,
    prepare_run_dir,
    tensorboard_writer,
    update_metrics,
)
from experiments.config import ExperimentConfig

STAGE = "pretrain"


def backbone_path(run_dir: Path) -> Path:
    return run_dir / "backbone.pt"


def build_backbone(cfg: ExperimentConfig, num_classes: int) -> SkippableResNet:
    """The configured architecture, with imported weights when ``model.init_checkpoint`` is set.

    A torchvision ResNet (``tv_resnet*``) takes ``model.weights`` and ImageNet normalisation
    (``model.normalization`` only if set to something else than the CIFAR default); weights for
    another number of classes (ImageNet's 1000) get a fresh classifier for ``num_classes``.
    """
    m = cfg.model
    if not m.torchvision:
        model = build_resnet(m.arch, num_classes, shortcut=m.shortcut, width=m.width, normalization=m.normalization)
    else:
        normalization = "imagenet" if m.normalization == "cifar10" else m.normalization
        model = build_torchvision_resnet(m.arch, num_classes, weights=m.weights, normalization=normalization,
                                         new_head=True)
        classes = weights_num_classes(m.arch, m.weights) if m.weights is not None else num_classes
        if classes != num_classes and distributed.is_main_process():
            print(f"pretrain: {m.arch} weights {m.weights} predict {classes} classes: their classifier is replaced "
                  f"by a fresh fc = Linear({model.feature_dim}, {num_classes}) for the {num_classes} classes of the data")
    if m.init_checkpoint:
        load_weights(model, m.init_checkpoint)
    return model


def skip_tolerance(model: SkippableResNet, dataset, keep_rates=(0.75, 0.5), seed: int = 0) -> dict:
    """Accuracy when every block is kept at random with probability ``p`` (one mask per image).

    Shows how much a backbone tolerates skipped blocks before any policy is trained.
    """
    out = {}
    for p in keep_rates:
        gen = torch.Generator().manual_seed(seed)

        def random_mask(images: torch.Tensor) -> torch.Tensor:
            return torch.rand(images.shape[0], model.num_blocks, generator=gen) < p

        logits = predict(model, dataset, keep_mask_fn=random_mask)
        out[str(p)] = (logits.argmax(1) == dataset.labels).float().mean().item()
    return out


def accuracy_by_difficulty(logits: torch.Tensor, dataset) -> dict | None:
    if dataset.difficulty is None:
        return None
    correct = (logits.argmax(1) == dataset.labels).float()
    return {str(int(d)): correct[dataset.difficulty == d].mean().item() for d in dataset.difficulty.unique()}


def run_pretrain(
    cfg: ExperimentConfig,
    run_dir: Path,
    resume: bool = False,
    splits: Splits | None = None,
    model: SkippableResNet | None = None,
) -> dict:
    """Train (or import) the backbone of ``cfg`` into ``run_dir``; return the stage metrics.

    ``splits``, ``model``: the data and initial model of ``cfg``, if the caller built them already.
    """
    done = finished_stage(run_dir, STAGE, backbone_path(run_dir), resume)
    if done is not None:
        return done
    ctx = distributed.current()  # under torchrun: this rank's device; every rank trains, rank 0 writes
    device = ctx.device or resolve_device(cfg.device)
    splits = splits if splits is not None else load_splits(cfg.data)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_backbone(cfg, splits.train.num_classes)
    model.to(device)
    cost = measure_backbone_cost(model, image_size=image_size_of(splits.train))  # at the size the data has
    if ctx.is_main:
        processes = f", torchrun world size {ctx.world_size}" if ctx.enabled else ""
        print(
            f"pretrain: {cfg.model.arch} ({model.num_blocks} blocks, {cost.full_flops / 1e6:.1f} MFLOPs, "
            f"{cost.total_params / 1e6:.2f} M params) on {cfg.data.name}: {len(splits.train)} train / "
            f"{len(splits.val)} val / {len(splits.test)} test images, device {device}{processes}"
        )

    tic = time.perf_counter()
    history: dict = {"history": []}
    if cfg.pretrain.epochs > 0:
        writer = tensorboard_writer(run_dir, STAGE) if ctx.is_main else None
        try:
            history = train(
                model, splits.train, splits.val, cfg.pretrain, checkpoint_dir=run_dir / "checkpoints" / STAGE,
                writer=writer, resume=resume, seed=cfg.seed, desc=STAGE,
            )
        finally:
            if writer is not None:
                writer.close()
    if not ctx.is_main:  # the test scores and every file are rank 0's
        return {"history": history["history"], "rank": ctx.rank}
    # Training time of all sessions of this run (a resumed run adds the epochs done before).
    train_time = sum(r["epoch_time_s"] for r in history["history"])

    test_logits = predict(model, splits.test)
    test = scores(test_logits, splits.test.labels)
    metrics = {
        "arch": model.arch,
        "num_blocks": model.num_blocks,
        "device": str(device),
        "dataset": cfg.data.name,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": history["history"][-1].get("val_accuracy") if history["history"] else None,
        "best_val_accuracy": history.get("best_accuracy"),
        "test_accuracy_by_difficulty": accuracy_by_difficulty(test_logits, splits.test),
        "test_accuracy_random_keep": skip_tolerance(model, splits.test, seed=cfg.seed),
        "epochs": cfg.pretrain.epochs,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - tic,
        "cost": cost.as_dict(),
        "history": history["history"],
    }
    save_checkpoint(backbone_path(run_dir), model.cpu(), stage=STAGE, test_accuracy=test["accuracy"])
    update_metrics(run_dir, STAGE, metrics)
    print(
        f"pretrain: test accuracy {test['accuracy']:.4f}; with random keep rates "
        + ", ".join(f"{k}: {v:.4f}" for k, v in metrics["test_accuracy_random_keep"].items())
        + f"; training {train_time:.0f} s"
    )
    print(f"pretrain: backbone saved to {backbone_path(run_dir)}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return metrics


def load_backbone(run_dir: Path, device: str | torch.device = "cpu") -> SkippableResNet:
    """The backbone a finished pretrain stage left in ``run_dir``."""
    return load_model(backbone_path(run_dir), map_location=device).to(device)


def main(args) -> None:
    cfg = config_from_args(args)
    # Everything that can fail on bad input (device, launch, dataset, imported weights) fails
    # here, before the run directory is touched; a batch the ranks cannot share fails before
    # waiting for the other ranks.
    resolve_device(cfg.device)
    distributed.check_batch_divisible(cfg.pretrain.batch_size, distributed.env_world_size(), "pretrain.batch_size")
    distributed.init_distributed(cfg.device)
    splits = load_splits(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg, splits.train.num_classes)
    run_dir = prepare_run_dir(cfg, resume=args.resume, overwrite=args.overwrite)
    run_pretrain(cfg, run_dir, resume=args.resume, splits=splits, model=model)


if __name__ == "__main__":
    cli(main, experiment_parser(__doc__.splitlines()[0]), distributed_ok=True)
