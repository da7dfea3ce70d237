"""Residual CNN backbones whose blocks can be skipped per sample, their data and their training.

Sub-packages: ``backbone.models`` (skippable CIFAR and torchvision ResNets, costs, weights),
``backbone.data`` (datasets, device batching, streamed loading), ``backbone.training`` (the one
training loop, interrupts).
"""

from backbone.cpu_allocator import tune_cpu_allocator
from backbone.errors import CheckpointError, ConfigError, DatasetError, DyndepthError
from backbone.models.cost import measure_backbone_cost
from backbone.models.resnet import NORMALIZATION, BasicBlock, CifarResNet, build_resnet
from backbone.models.torchvision_resnet import TorchvisionResNet, build_backbone, build_torchvision_resnet
from backbone.models.weights import load_model, load_weights

# Before any tensor exists: freed activations stay in the process instead of being page-faulted
# in again on every call (backbone.cpu_allocator; DYNDEPTH_CPU_ALLOCATOR=system opts out).
tune_cpu_allocator()

__all__ = [
    "BasicBlock",
    "CheckpointError",
    "CifarResNet",
    "ConfigError",
    "DatasetError",
    "DyndepthError",
    "NORMALIZATION",
    "TorchvisionResNet",
    "build_backbone",
    "build_resnet",
    "build_torchvision_resnet",
    "load_model",
    "load_weights",
    "measure_backbone_cost",
]
