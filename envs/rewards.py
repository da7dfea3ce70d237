"""Rewards for choosing which residual blocks to execute on an image.

One episode = one image and one keep mask; the reward scores the prediction the masked backbone
makes and the blocks it executed (``blocks_used``, out of ``num_blocks``).

``kind="linear"`` (the project's reward)::

    R = 1[correct] - λ · blocks_used            (normalize=False)
    R = 1[correct] - λ · blocks_used / L        (normalize=True, L = num_blocks)

λ is the price of one block in units of "one correct prediction". Two options grade the
per-image signal without changing the default (the card's reward):

- ``signal``: what "correct" scores. ``"correct"`` (default) is 1[correct]; ``"prob"`` is the
  masked backbone's probability of the true class and ``"logprob"`` its logarithm (floored at
  ``LOGPROB_FLOOR``). With 0/1 a hopeless image is best served by running nothing and only
  borderline images feel a block; a graded score gives every image credit for every block.
- ``baseline``: ``"full"`` subtracts the full backbone's score on the same image. That is a
  per-image constant, so no optimal decision changes, but the image's own difficulty leaves the
  reward and the advantage carries the mask's effect alone.
 The expected reward is
``P(correct) - λ·E[blocks_used]``, so a block is worth executing iff it raises P(correct) by
more than λ (λ/L with ``normalize``; λ then prices the whole network, which keeps one λ
meaningful across depths). λ = 0 asks for accuracy alone; λ ≥ 1 (≥ L normalised) makes every
block cost more than any gain in accuracy, so the optimum executes nothing. Sweeping λ traces the
accuracy/FLOPs trade-off. The reward is a sum over blocks, so the sequential environment can pay
it out densely: −λ per executed block at each step, +1[correct] at the end (:func:`block_cost`).

``kind="blockdrop"`` (Wu et al. 2018, "BlockDrop", eq. 2)::

    R = 1 - (blocks_used / L)²   if correct
    R = -γ                       otherwise        (γ = ``penalty``)

A correct prediction always beats a wrong one, whatever it costs, and among correct predictions
fewer blocks are better. The quadratic term is flat near a full network and steep near an empty
one: dropping the first blocks earns little, so the policy is pushed to keep accuracy first and
to save blocks only where the prediction stays correct. γ sets how much worse a mistake is than
the most expensive correct answer (reward 0). The reward is not a sum over blocks, so the
sequential environment pays it out only at the final step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backbone.errors import ConfigError

REWARD_KINDS = ("linear", "blockdrop")
SIGNALS = ("correct", "prob", "logprob")
BASELINES = ("none", "full")
#: log-probability signals are floored here (p = 0.0067): a hopeless image costs at most this much.
LOGPROB_FLOOR = -5.0


@dataclass
class RewardConfig:
    """How an episode is scored.

    ``kind``: "linear" (correct − λ·blocks_used) or "blockdrop" (Wu et al. 2018).
    ``lam``: λ, the cost of one executed block (linear only).
    ``normalize``: linear only: charge λ·blocks_used/num_blocks, so λ prices the whole network.
    ``penalty``: blockdrop's γ: a wrong prediction earns −γ.
    ``signal``: linear only: "correct" (1[correct], the default), "prob" or "logprob" (module docstring).
    ``baseline``: linear only: "none", or "full" to subtract the full backbone's score per image.
    """

    kind: str = "linear"
    lam: float = 0.01
    normalize: bool = False
    penalty: float = 1.0
    signal: str = "correct"
    baseline: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise ConfigError(f"policy.reward.kind must be one of {', '.join(REWARD_KINDS)}, got {self.kind!r}")
        for name in ("lam", "penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"policy.reward.{name} must be a number, got {value!r}")
            if not value >= 0:  # also rejects NaN
                raise ConfigError(f"policy.reward.{name} must be >= 0, got {value}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"policy.reward.normalize must be true or false, got {self.normalize!r}")
        if self.signal not in SIGNALS:
            raise ConfigError(f"policy.reward.signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"policy.reward.baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.kind != "linear" and (self.signal, self.baseline) != ("correct", "none"):
            raise ConfigError("policy.reward.signal and baseline apply to the linear reward only")

    @classmethod
    def from_any(cls, value: RewardConfig | dict | None) -> RewardConfig:
        """A RewardConfig from a RewardConfig, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            fields = ("kind", "lam", "normalize", "penalty", "signal", "baseline")
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise ConfigError(f"unknown field(s) policy.reward.{', policy.reward.'.join(unknown)}; "
                                  f"expected {', '.join(fields)}")
            return cls(**value)
        raise ConfigError(f"policy.reward must be a mapping or RewardConfig, got {type(value).__name__}")


def block_cost(cfg: RewardConfig, num_blocks: int) -> float | None:
    """The charge for one executed block when the reward is paid out per block.

    λ (λ/num_blocks with ``normalize``) for the linear reward; None for blockdrop, whose reward
    does not split into per-block terms.
    """
    if cfg.kind != "linear":
        return None
    return cfg.lam / num_blocks if cfg.normalize else cfg.lam


def reward_score(cfg: RewardConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-image score of the linear reward, float32 (B,): 1[correct], the true class's
    probability, or its floored log-probability (``cfg.signal``)."""
    if cfg.signal == "correct":
        return (logits.argmax(1) == labels).to(torch.float32)
    log_p = torch.log_softmax(logits.float(), 1).gather(1, labels.view(-1, 1)).squeeze(1)
    return log_p.exp() if cfg.signal == "prob" else log_p.clamp(min=LOGPROB_FLOOR)


def episode_reward(cfg: RewardConfig, correct: torch.Tensor, blocks_used: torch.Tensor, num_blocks: int,
                   score: torch.Tensor | None = None) -> torch.Tensor:
    """Reward of finished episodes, float32 (B,) on the inputs' device.

    ``correct``: bool (B,), the masked backbone's prediction was right. ``blocks_used``: (B,)
    number of executed blocks. ``num_blocks``: blocks in the backbone (L). ``score``: linear only,
    what replaces 1[correct] (``reward_score``, minus the per-image baseline if any); None = 1[correct].
    """
    hit = correct.to(torch.float32) if score is None else score.to(torch.float32)
    used = blocks_used.to(torch.float32)
    if cfg.kind == "linear":
        return hit - block_cost(cfg, num_blocks) * used
    bonus = 1.0 - (used / num_blocks) ** 2
    return torch.where(correct.bool(), bonus, torch.full_like(bonus, -cfg.penalty))
