"""The deployable dynamic-depth model: a skippable backbone and the policy that routes it.

:class:`DynamicModel` holds the backbone and the SB3 policy network (so a checkpoint of the pair
is one state dict, and the policy stays loadable by SB3) and knows both kinds of policy:

- one-shot (``env="oneshot"``): the policy sees the image or the stem's features once and
  decides every block (or, with a ``ladder`` of candidate masks, picks one of them); the stem
  runs once and the blocks run on its output;
- sequential (``env="sequential"``): before each block the policy sees statistics of the
  running activation and decides that block (SkipNet-style).

``forward(images)`` is inference with the greedy decisions; ``rollout`` samples decisions with
their log-probabilities (joint fine-tuning's policy gradient) and reports the per-image keep
probabilities (adaptivity). Both follow exactly the observations of ``envs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from stable_baselines3.common.distributions import BernoulliDistribution

from backbone.models.masked import run_block_masked
from backbone.models.resnet import BackboneWrapper, SkippableResNet
from envs.observations import downsample_images, sequential_observation, stem_features_of

ENVS = ("oneshot", "sequential")


def greedy_decisions(policy: torch.nn.Module, observations: torch.Tensor) -> torch.Tensor:
    """An SB3 policy's deterministic actions from its logits alone (no distribution objects, no
    NumPy: what a deployed model pays): (B, L) bool keep bits, or (B,) the chosen index of a
    discrete action (the sequential env's run/skip, a ladder rung)."""
    with torch.no_grad():
        head = _fused_head(policy)
        if head is not None:
            logits = head(observations)
        else:
            features = policy.extract_features(observations, policy.pi_features_extractor)
            logits = policy.action_net(policy.mlp_extractor.forward_actor(features))
    if isinstance(policy.action_dist, BernoulliDistribution):
        return logits > 0  # the exploration bound keeps p > 0.5 exactly where the logit is > 0
    return logits.argmax(1)  # the bound keeps the order of the probabilities


class _FusedHead:
    """A stem-feature policy's actor as two matrix products: the standardisation folded into the
    first layer (``W·((x − m)·s) + b = (W·s)·x + (b − W·s·m)``). At batch 1 each module call of
    SB3's path costs as much as its arithmetic, and the policy's time counts against the saving."""

    def __init__(self, policy: torch.nn.Module):
        extractor, (first, act), last = policy.pi_features_extractor, policy.mlp_extractor.policy_net, policy.action_net
        w = first.weight * extractor.inv_std
        self.w1, self.b1 = w.detach().clone(), (first.bias - w @ extractor.mean).detach().clone()
        self.w2, self.b2, self.act = last.weight.detach().clone(), last.bias.detach().clone(), act
        # The tensors it is made of: six version counters, not every parameter of the policy.
        self.sources = (first.weight, first.bias, last.weight, last.bias, extractor.inv_std, extractor.mean)
        self.version = _weights_version(self.sources)

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        hidden = self.act(torch.addmm(self.b1, observations.flatten(1).float(), self.w1.t()))
        return torch.addmm(self.b2, hidden, self.w2.t())


def _weights_version(tensors) -> tuple:
    # In-place updates (optimiser steps, load_state_dict) bump a tensor's version counter.
    return tuple((id(t), t._version, t.data_ptr()) for t in tensors)


def _fused_head(policy: torch.nn.Module) -> _FusedHead | None:
    """The cached fused actor of a policy with a stem-feature standardiser and one hidden layer
    (rebuilt when its weights changed), else None (the general SB3 path)."""
    from agents.policies import StemFeatures

    net = policy.mlp_extractor.policy_net
    if not (isinstance(policy.pi_features_extractor, StemFeatures) and len(net) == 2
            and isinstance(net[0], torch.nn.Linear)):
        return None
    head = policy.__dict__.get("_dyndepth_fused_head")
    if head is None or head.version != _weights_version(head.sources) or head.sources[0] is not net[0].weight:
        head = _FusedHead(policy)
        policy._dyndepth_fused_head = head
    return head


@dataclass
class Rollout:
    """Decisions for a batch: ``keep_mask`` (B, L) bool, ``keep_prob`` (B, L) the policy's
    probability of each taken-or-not decision being "run", ``log_prob`` and ``entropy`` (B,)
    summed over the decisions, and ``features`` the backbone's last activation (sequential only)."""

    keep_mask: torch.Tensor
    keep_prob: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    features: torch.Tensor | None = None


class DynamicModel(BackboneWrapper):
    """Backbone + policy. ``policy``: the SB3 policy network (``model.policy``); ``observation``,
    ``obs_size``, ``stem_grid``: what the one-shot policy sees, as in ``envs.block_skip.SkipTask``."""

    def __init__(self, backbone: SkippableResNet, policy: torch.nn.Module, env: str = "oneshot",
                 observation: str = "pixels", obs_size: int | None = None, stem_grid: int = 4,
                 ladder: torch.Tensor | None = None):
        super().__init__()
        if env not in ENVS:
            raise ValueError(f"env must be one of {ENVS}, got {env!r}")
        self.backbone, self.policy = backbone, policy
        self.env, self.observation, self.obs_size, self.stem_grid = env, observation, obs_size, stem_grid
        # The candidate masks of a ladder policy: a buffer, so it moves with the model.
        self.register_buffer("ladder", None if ladder is None else ladder.bool().clone())

    @property
    def arch(self) -> dict:
        return {**self.backbone.arch, "policy": type(self.policy).__name__, "env": self.env,
                "observation": self.observation, "obs_size": self.obs_size, "stem_grid": self.stem_grid,
                "ladder": None if self.ladder is None else ["".join("1" if b else "0" for b in m) for m in self.ladder.tolist()]}

    # ------------------------------------------------------------------ observations
    def observe(self, images: torch.Tensor, stem_out: torch.Tensor) -> torch.Tensor:
        """The one-shot observation of ``images`` (whose stem output is ``stem_out``), as a float
        tensor for the SB3 policy (which scales image observations to [0, 1] itself)."""
        if self.observation == "stem":
            return stem_features_of(stem_out, self.stem_grid)
        if self.obs_size is not None and self.obs_size != images.shape[-1]:
            images = downsample_images(images, self.obs_size)
        return images.float()

    def _sequential_obs(self, h: torch.Tensor, i: int, used: torch.Tensor) -> torch.Tensor:
        return sequential_observation(h, i, used, self.num_blocks, self.backbone.feature_dim)

    def greedy_masks(self, observations: torch.Tensor) -> torch.Tensor:
        """The one-shot policy's deterministic keep masks (B, L) bool."""
        actions = greedy_decisions(self.policy, observations)
        return self.ladder[actions] if self.ladder is not None else actions

    # ------------------------------------------------------------------ decisions
    def rollout(self, images: torch.Tensor, deterministic: bool = False) -> Rollout:
        """Decide the blocks of ``images`` (sampled, or greedy with ``deterministic``). The
        backbone runs without gradients; the policy's log-probabilities keep theirs."""
        with torch.no_grad():
            h = self.backbone.stem(images)
        if self.env == "oneshot":
            dist = self.policy.get_distribution(self.observe(images, h))
            actions = dist.get_actions(deterministic=deterministic)
            if self.ladder is None:
                return Rollout(actions.bool(), dist.distribution.probs, dist.log_prob(actions), dist.entropy())
            # A block's keep probability: the probability of the rungs that run it.
            keep_prob = dist.distribution.probs @ self.ladder.float()
            return Rollout(self.ladder[actions.long()], keep_prob, dist.log_prob(actions), dist.entropy())
        used = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        keep, probs, log_prob, entropy = [], [], 0.0, 0.0
        for i, block in enumerate(self.backbone.blocks):
            dist = self.policy.get_distribution(self._sequential_obs(h, i, used))
            run = dist.get_actions(deterministic=deterministic).view(-1)
            log_prob, entropy = log_prob + dist.log_prob(run), entropy + dist.entropy()
            keep.append(run.bool())
            probs.append(dist.distribution.probs[:, 1])
            with torch.no_grad():
                h = run_block_masked(block, h, run.nonzero().squeeze(1), (run == 0).nonzero().squeeze(1))
            used = used + run.long()
        return Rollout(torch.stack(keep, 1), torch.stack(probs, 1), log_prob, entropy, h)

    @torch.no_grad()
    def decide(self, images: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Keep masks (B, L) bool for ``images``, with the policy in eval mode."""
        was_training = self.policy.training
        self.policy.set_training_mode(False)
        mask = self.rollout(images, deterministic).keep_mask
        self.policy.set_training_mode(was_training)
        return mask

    def forward(self, images: torch.Tensor, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; with ``keep_mask`` the backbone runs that mask (training), else the policy's
        greedy decisions (inference: the stem runs once, the policy in eval mode)."""
        if keep_mask is not None:
            return self.backbone(images, keep_mask)
        if self.policy.training:  # the call walks every module: ~25 µs of a ~1 ms batch-1 forward
            self.policy.set_training_mode(False)
        h = self.backbone.stem(images)
        if self.env == "oneshot":
            masks = self.greedy_masks(self.observe(images, h))
            return self.backbone.classify(self.backbone.run_blocks(h, masks), masks)
        used = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        for i, block in enumerate(self.backbone.blocks):
            run = greedy_decisions(self.policy, self._sequential_obs(h, i, used)) == 1
            h = run_block_masked(block, h, run.nonzero().squeeze(1), (~run).nonzero().squeeze(1))
            used = used + run.long()
        return self.backbone.head(h)
