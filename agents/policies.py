"""Policy networks for 32x32 image observations, as SB3 features extractors.

SB3's NatureCNN assumes Atari-sized frames (its 8x8 stride-4 first layer leaves almost nothing of
a 32x32 image), so dyndepth brings its own. The policy runs on every image before the backbone,
so its FLOPs count against the saving: keep it cheap relative to the backbone.
"""

from __future__ import annotations

import gymnasium as gym
import torch
import torch.nn as nn
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from backbone.errors import ConfigError
from backbone.models.resnet import build_resnet

EXTRACTORS = ("tiny", "resnet")


class TinyCNN(BaseFeaturesExtractor):
    """Three stride-2 3x3 convolutions (width w, 2w, 4w) and global pooling: ~1.5 MFLOPs at w=16."""

    def __init__(self, observation_space: gym.spaces.Box, width: int = 16):
        super().__init__(observation_space, features_dim=4 * width)
        channels = observation_space.shape[0]
        layers, c_in = [], channels
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)


class ResNetFeatures(BaseFeaturesExtractor):
    """A small CIFAR ResNet (BlockDrop's policy is a ResNet too) without its classifier."""

    def __init__(self, observation_space: gym.spaces.Box, width: int = 8, depth: int = 8):
        super().__init__(observation_space, features_dim=4 * width)
        # normalization "none": SB3 already scales uint8 images to [0, 1].
        self.net = build_resnet(depth, num_classes=1, width=width, normalization="none")
        del self.net.fc

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        h = self.net.stem(observations)
        for block in self.net.blocks:
            h = block(h)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)


def policy_kwargs(extractor: str, width: int, hidden: int = 64) -> dict:
    """``policy_kwargs`` for an SB3 actor-critic on image observations."""
    if extractor not in EXTRACTORS:
        raise ConfigError(f"policy.extractor must be one of {', '.join(EXTRACTORS)}, got {extractor!r}")
    cls = TinyCNN if extractor == "tiny" else ResNetFeatures
    return {
        "features_extractor_class": cls,
        "features_extractor_kwargs": {"width": width},
        "net_arch": {"pi": [hidden], "vf": [hidden]},
    }
