"""The static baseline of ``experiments.compare``: plain ResNets of the backbone's family, one per
FLOPs budget, trained from scratch (or, for a torchvision backbone with ``model.weights``, from
each depth's ImageNet weights) with the pretraining recipe minus stochastic depth and
distillation, for ``study.static_epochs`` epochs. The answer to "does a network that spends its
blocks per image beat a network that was simply built smaller?"
"""

from __future__ import annotations

import dataclasses

import torch

from backbone.baselines import static_family_for_flops, static_torchvision_for_flops
from backbone.data.streaming import image_size_of
from backbone.errors import ConfigError
from backbone.models.torchvision_resnet import build_torchvision_resnet, resolve_weights
from backbone.models.weights import load_checkpoint, load_model, model_from_arch, save_checkpoint
from backbone.training.loop import evaluate, train
from experiments.common import tensorboard_writer
from experiments.config import ExperimentConfig
from experiments.curves import point


def static_recipe(cfg: ExperimentConfig):
    """The static networks' recipe: the backbone's, from scratch, without stochastic depth or distillation."""
    epochs = cfg.study.static_epochs or cfg.pretrain.epochs
    if epochs < 1:
        raise ConfigError("the backbone is imported (pretrain.epochs: 0): set study.static_epochs, the "
                          "from-scratch budget of the static networks (e.g. the imported backbone's epochs)")
    warmup = min(cfg.pretrain.warmup_epochs, max(0.0, epochs - 1))
    # From scratch: no trained model to distil from at the start.
    return dataclasses.replace(cfg.pretrain, epochs=epochs, stochastic_depth=0.0, warmup_epochs=warmup, distill=0.0)


def static_start(cfg: ExperimentConfig, backbone) -> str:
    """Where the static networks start: scratch, or for a torchvision backbone with
    ``model.weights`` each depth's ImageNet weights (the family's own name for them, else DEFAULT)."""
    if backbone.arch.get("family") == "torchvision" and cfg.model.weights is not None:
        return "ImageNet weights"
    return "scratch"


def static_weights(weights: str, name: str) -> str:
    """``weights`` where torchvision has them for ``name`` (resnet18/34 have only V1), else DEFAULT."""
    try:
        return resolve_weights(name, weights).name
    except ConfigError:  # no such weights for this depth, or a file for the backbone's depth only
        return "DEFAULT"


def static_model(cfg: ExperimentConfig, backbone, knob: dict):
    """A fresh static network of ``knob`` like ``backbone`` (classes, normalisation, shortcut)."""
    a = backbone.arch
    if "arch" not in knob:
        return model_from_arch({**a, "depth": knob["depth"], "width": knob["width"]})
    if static_start(cfg, backbone) == "scratch":
        return model_from_arch({**a, "name": knob["arch"]})
    return build_torchvision_resnet(knob["arch"], a["num_classes"], static_weights(cfg.model.weights, knob["arch"]),
                                    a["normalization"], new_head=True)


def static_networks(cfg, backbone, cost, splits, device, resume) -> list[dict]:
    """One plain ResNet per budget: the CIFAR depth × width whose FLOPs lie closest to it, or the
    closest of torchvision's ResNet-18/34/50 for a torchvision backbone. Budgets that pick the
    same network share it."""
    recipe, points, trained = static_recipe(cfg), [], {}
    image_size = image_size_of(splits.train)
    for budget in cfg.study.budgets:
        if backbone.arch.get("family") == "torchvision":
            tv_name, flops = static_torchvision_for_flops(budget * cost.full_flops, backbone, image_size)
            name, knob = f"static_{tv_name}", {"arch": f"tv_{tv_name}"}
        else:
            depth, width, flops = static_family_for_flops(budget * cost.full_flops, backbone, image_size=image_size)
            name, knob = f"static_d{depth}_w{width}", {"depth": depth, "width": width}
        out = cfg.run_dir / "baselines" / f"{name}.pt"
        if name in trained:
            model, train_time = trained[name]
        elif out.exists() and (resume or cfg.study.share_backbone):  # resumed, or the first seed's (run.share_backbone)
            model, train_time = load_model(out).to(device), load_checkpoint(out)["train_time_s"]
        else:
            torch.manual_seed(cfg.seed)
            model = static_model(cfg, backbone, knob).to(device)
            writer = tensorboard_writer(cfg.run_dir, name)
            try:
                history = train(model, splits.train, splits.val, recipe, checkpoint_dir=out.parent / f"checkpoints_{name}",
                                writer=writer, resume=resume, seed=cfg.seed, desc=name)
            finally:
                writer.close()
            train_time = sum(r["epoch_time_s"] for r in history["history"])
            save_checkpoint(out, model, train_time_s=train_time)
        trained[name] = model, train_time
        points.append(point(flops / cost.full_flops, evaluate(model, splits.test)["accuracy"], train_time,
                            **knob, budget=budget, epochs=recipe.epochs))
    return points


def static_description(cfg: ExperimentConfig, backbone) -> dict:
    """The report's words on the static networks: where they start and what the family holds."""
    start = static_start(cfg, backbone)
    text = "from scratch" if start == "scratch" else "from each depth's ImageNet weights (a fresh classifier)"
    if backbone.arch.get("family") == "torchvision":
        family = "torchvision depths tv_resnet18/34/50 only"
        text += f" ({family}: the closest in FLOPs to each budget, which need not lie within 3% of it)"
    else:
        family = "CIFAR depth × width"
    return {"from": text, "start": start, "family": family}
