"""Residual CNN backbones whose blocks can be skipped per sample, and their training."""

from backbone.errors import CheckpointError, ConfigError, DatasetError, DyndepthError
from backbone.resnet import NORMALIZATION, BasicBlock, CifarResNet, build_resnet

__all__ = [
    "BasicBlock",
    "CheckpointError",
    "CifarResNet",
    "ConfigError",
    "DatasetError",
    "DyndepthError",
    "NORMALIZATION",
    "build_resnet",
]
