"""Skippable residual networks (CIFAR and torchvision ResNets), the masked block runner, their costs and their weights."""

from backbone.models.cost import BackboneCost, count_flops, measure_backbone_cost
from backbone.models.masked import run_block_masked
from backbone.models.resnet import BasicBlock, CifarResNet, SkippableResNet, build_resnet
from backbone.models.torchvision_resnet import TorchvisionResNet, build_backbone, build_torchvision_resnet
from backbone.models.weights import load_checkpoint, load_model, load_weights, save_checkpoint

__all__ = [
    "BackboneCost",
    "BasicBlock",
    "CifarResNet",
    "SkippableResNet",
    "TorchvisionResNet",
    "build_backbone",
    "build_resnet",
    "build_torchvision_resnet",
    "count_flops",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "measure_backbone_cost",
    "run_block_masked",
    "save_checkpoint",
]
