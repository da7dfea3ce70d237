"""Policy networks for the block-skipping envs, as SB3 policies and features extractors.

- Image observations (``"pixels"``): SB3's NatureCNN assumes Atari-sized frames (its 8x8
  stride-4 first layer leaves almost nothing of a 32x32 image), so dyndepth brings its own.
- Stem-feature observations (``"stem"``): :class:`StemFeatures` standardises the vector with
  fixed statistics of the policy's training images (kept in the policy, so a deployed policy
  normalises exactly as in training) and an MLP head decides. No BatchNorm anywhere: PPO
  collects rollouts in eval mode and updates in train mode, and BatchNorm would make the two
  disagree on every log-probability of a product of L bits.

:class:`BoundedPolicy` is SB3's actor-critic with BlockDrop's bounded exploration as an option:
each keep probability p is used as ``α·p + (1−α)·(1−p)``, so it stays in [1−α, α] while
training and a logit can never saturate into a decision that is no longer explored.
Deterministic decisions (p > 0.5) are unchanged by the bound.
"""

from __future__ import annotations

import gymnasium as gym
import torch
import torch.nn as nn
import torch.nn.functional as F
from stable_baselines3.common.distributions import BernoulliDistribution, CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from backbone.errors import ConfigError
from backbone.models.resnet import build_resnet

EXTRACTORS = ("tiny", "resnet")


class TinyCNN(BaseFeaturesExtractor):
    """Three stride-2 3x3 convolutions (width w, 2w, 4w) with ReLU and global pooling: ~1.5
    MFLOPs at w=16 on 32x32 images."""

    def __init__(self, observation_space: gym.spaces.Box, width: int = 16):
        super().__init__(observation_space, features_dim=4 * width)
        layers, c_in = [], observation_space.shape[0]
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)


class ResNetFeatures(BaseFeaturesExtractor):
    """A small CIFAR ResNet (BlockDrop's policy is a ResNet too) without its classifier. Its
    BatchNorm layers are kept in eval mode (running statistics frozen at their initial
    values, so they act as fixed affine maps): see the module docstring."""

    def __init__(self, observation_space: gym.spaces.Box, width: int = 8, depth: int = 8):
        super().__init__(observation_space, features_dim=4 * width)
        # normalization "none": SB3 already scales uint8 images to [0, 1].
        self.net = build_resnet(depth, num_classes=1, width=width, normalization="none")
        del self.net.fc

    def train(self, mode: bool = True) -> ResNetFeatures:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        h = self.net.run_blocks(self.net.stem(observations))
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


def _inverse_std(std: torch.Tensor) -> torch.Tensor:
    # A feature that never varied on the training images (a padded channel, a constant map)
    # must not be blown up when another routing makes it move: its scale is floored at a
    # hundredth of the typical feature's.
    return 1.0 / (std + 1e-2 * std.mean() + 1e-6)


class StemFeatures(BaseFeaturesExtractor):
    """Standardised stem-feature vectors: ``(obs − mean) / std`` with fixed per-feature
    statistics (``mean``, ``std``: lists of the observation's length)."""

    def __init__(self, observation_space: gym.spaces.Box, mean: list[float], std: list[float]):
        super().__init__(observation_space, features_dim=int(observation_space.shape[0]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", _inverse_std(torch.tensor(std, dtype=torch.float32)))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations.flatten(1).float() - self.mean) * self.inv_std


class SequentialFeatures(BaseFeaturesExtractor):
    """The sequential env's observation with its activation statistics standardised per block
    position (``mean``, ``std``: L lists of 2F values, measured with every block run): stages
    live on very different scales, and one shared scale would let the block one-hot dominate."""

    def __init__(self, observation_space: gym.spaces.Box, mean: list[list[float]], std: list[list[float]]):
        super().__init__(observation_space, features_dim=int(observation_space.shape[0]))
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.stats_dim, self.num_blocks = mean_t.shape[1], mean_t.shape[0]
        self.register_buffer("mean", mean_t)
        self.register_buffer("inv_std", _inverse_std(std_t))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        obs = observations.float()
        stats, one_hot = obs[:, : self.stats_dim], obs[:, self.stats_dim : self.stats_dim + self.num_blocks]
        # The terminal observation has no block: its one-hot is all zero, and so is the shift.
        standardised = (stats - one_hot @ self.mean) * (one_hot @ self.inv_std + (1 - one_hot.sum(1, keepdim=True)))
        return torch.cat([standardised, obs[:, self.stats_dim :]], 1)


def bound_logits(logits: torch.Tensor, alpha: float, binary: bool) -> torch.Tensor:
    """Logits of the probabilities ``α·p + (1−α)·(1−p)`` per bit (``binary``: Bernoulli), or of a
    K-way choice (softmax over the last dimension) mixed with the uniform choice so that the same
    holds for K = 2: ``β·p + (1−β)/K`` with ``β = 2α − 1``. Computed in log space."""
    log_a, log_b = torch.log(torch.tensor(alpha)), torch.log1p(torch.tensor(-alpha))
    if binary:
        keep = torch.logaddexp(log_a + F.logsigmoid(logits), log_b + F.logsigmoid(-logits))
        drop = torch.logaddexp(log_b + F.logsigmoid(logits), log_a + F.logsigmoid(-logits))
        return keep - drop
    beta, k = 2 * alpha - 1, logits.shape[-1]
    if beta <= 0:
        return torch.zeros_like(logits)
    floor = torch.log(torch.tensor((1 - beta) / k)) if beta < 1 else torch.tensor(float("-inf"))
    return torch.logaddexp(torch.log(torch.tensor(beta)) + torch.log_softmax(logits, -1), floor)


class BoundedPolicy(ActorCriticPolicy):
    """SB3's actor-critic policy; ``exploration_bound`` α in (0.5, 1] keeps every keep
    probability in [1−α, α] (1 = no bound)."""

    def __init__(self, *args, exploration_bound: float = 1.0, **kwargs):
        if not 0.5 < exploration_bound <= 1.0:
            raise ConfigError(f"policy.exploration_bound must be in (0.5, 1], got {exploration_bound}")
        self.exploration_bound = exploration_bound
        super().__init__(*args, **kwargs)

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor):
        logits = self.action_net(latent_pi)
        binary = isinstance(self.action_dist, BernoulliDistribution)
        if self.exploration_bound < 1.0 and (binary or isinstance(self.action_dist, CategoricalDistribution)):
            logits = bound_logits(logits, self.exploration_bound, binary)
        return self.action_dist.proba_distribution(action_logits=logits)


def policy_kwargs(extractor: str, width: int, hidden: int = 64, exploration_bound: float = 1.0,
                  feature_stats: tuple[list, list] | None = None, sequential: bool = False) -> dict:
    """``policy_kwargs`` for a :class:`BoundedPolicy`: an image extractor (``extractor``, ``width``)
    or, with ``feature_stats`` = (mean, std), the standardiser of stem features (or of the
    sequential env's observation, ``sequential``); ``hidden``: width of the actor's and critic's
    hidden layer."""
    kwargs = {"net_arch": {"pi": [hidden], "vf": [hidden]}, "exploration_bound": exploration_bound}
    if feature_stats is not None:
        mean, std = feature_stats
        return {**kwargs, "features_extractor_class": SequentialFeatures if sequential else StemFeatures,
                "features_extractor_kwargs": {"mean": mean, "std": std}}
    if extractor not in EXTRACTORS:
        raise ConfigError(f"policy.extractor must be one of {', '.join(EXTRACTORS)}, got {extractor!r}")
    cls = TinyCNN if extractor == "tiny" else ResNetFeatures
    return {**kwargs, "features_extractor_class": cls, "features_extractor_kwargs": {"width": width}}
