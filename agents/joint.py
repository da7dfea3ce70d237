"""Joint fine-tuning of the backbone and the block-skipping policy.

Both sets of weights change, in the one supervised loop of ``backbone.training.loop``:

- **Backbone**: cross-entropy on training images, each run with a keep mask *sampled from the
  policy*, so the backbone learns to work with the blocks the policy actually keeps.
- **Policy**: after every backbone step, one policy-gradient step (REINFORCE with BlockDrop's
  self-critical baseline: advantage = reward of the sampled mask − reward of the policy's own
  deterministic mask) on a batch of the policy's images — the held-out split, not the backbone's
  training images, on which a backbone is almost always right and dropping everything would look
  free. The policy is the SB3 model's own network, so the result stays a loadable SB3 policy.

**BatchNorm.** In a masked training forward each block normalises (and updates its running
statistics) with only the rows that the policy routes through it, which is exactly the
population that block sees at inference. Running statistics therefore adapt to the policy's
routing instead of to the full network's; the policy's forward passes run in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from stable_baselines3.common.base_class import BaseAlgorithm

from backbone.data.batching import BatchLoader
from backbone.data.datasets import ImageDataset
from backbone.errors import ConfigError
from backbone.models.resnet import BackboneWrapper, CifarResNet
from backbone.training.loop import TrainConfig, train
from envs.block_skip import downsample_images
from envs.rewards import RewardConfig, episode_reward


@dataclass
class FinetuneConfig(TrainConfig):
    """The ``finetune:`` section: the backbone recipe of ``TrainConfig`` plus the policy's step."""

    epochs: int = 10
    lr: float = 0.01  # fine-tuning: a tenth of the pretraining rate
    warmup_epochs: float = 0.0
    policy_lr: float = 1e-4  # Adam on the policy network
    policy_batch_size: int = 256
    entropy_coef: float = 0.01  # bonus on the policy's entropy: without it the self-critical step collapses to one mask

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy_lr <= 0 or self.policy_batch_size < 1 or self.entropy_coef < 0:
            raise ConfigError("finetune.policy_lr must be > 0, policy_batch_size >= 1, entropy_coef >= 0")


class PolicyBackbone(BackboneWrapper):
    """The (backbone, policy) pair as one module: one state dict, one checkpoint, and
    ``forward(images)`` runs the backbone with the policy's deterministic masks."""

    def __init__(self, backbone: CifarResNet, policy: nn.Module, obs_size: int | None = None):
        super().__init__()
        self.backbone, self.policy, self.obs_size = backbone, policy, obs_size

    @property
    def arch(self) -> dict:
        return {**self.backbone.arch, "policy": type(self.policy).__name__, "obs_size": self.obs_size}

    def observe(self, images: torch.Tensor) -> torch.Tensor:
        """What the policy sees (as in the environment): uint8 images, downsampled if configured,
        as floats; the SB3 policy scales them to [0, 1] itself."""
        if self.obs_size is not None and self.obs_size != images.shape[-1]:
            images = downsample_images(images, self.obs_size)
        return images.float()

    def distribution(self, images: torch.Tensor):
        return self.policy.get_distribution(self.observe(images))

    @torch.no_grad()
    def decide(self, images: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        was_training = self.policy.training
        self.policy.eval()
        mask = self.distribution(images).get_actions(deterministic=deterministic).bool()
        self.policy.train(was_training)
        return mask

    def forward(self, images: torch.Tensor, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        if keep_mask is None:
            keep_mask = self.decide(images)
        return self.backbone(images, keep_mask)


class PolicyGradientStep:
    """The policy's update after each backbone step (an ``after_step`` hook of ``train``)."""

    def __init__(self, pair: PolicyBackbone, policy_images: ImageDataset, reward: RewardConfig, cfg: FinetuneConfig, seed: int):
        self.pair, self.reward, self.cfg = pair, reward, cfg
        device = next(pair.parameters()).device
        self.loader = BatchLoader(policy_images, cfg.policy_batch_size, device=device, shuffle=True, seed=seed + 1, drop_last=False)
        self.optimizer = torch.optim.Adam(pair.policy.parameters(), lr=cfg.policy_lr)
        self._epoch, self._position, self._batches = 0, 0, None  # where in the policy images we are
        self.history: list[dict] = []

    def _next_batch(self):
        if self._position == len(self.loader):  # this epoch of policy images is used up
            self._epoch, self._position, self._batches = self._epoch + 1, 0, None
        if self._batches is None:
            self._batches = self.loader.epoch_batches(self._epoch, self._position)
        self._position += 1
        return next(self._batches)

    def state_dict(self) -> dict:
        """What a checkpoint of ``train`` keeps of this hook, so a resumed run continues exactly."""
        return {"optimizer": self.optimizer.state_dict(), "epoch": self._epoch, "position": self._position,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._epoch, self._position, self.history = state["epoch"], state["position"], state["history"]
        self._batches = None

    def _rewards(self, images, labels, masks) -> torch.Tensor:
        backbone = self.pair.backbone
        was_training = backbone.training
        backbone.eval()  # score with running statistics, as at inference; no BN update here
        with torch.no_grad():
            correct = backbone(images, masks).argmax(1) == labels
        backbone.train(was_training)
        return episode_reward(self.reward, correct, masks.sum(1), backbone.num_blocks)

    def __call__(self, *_unused) -> None:
        images, labels = self._next_batch()
        dist = self.pair.distribution(images)
        sampled = dist.get_actions(deterministic=False).detach()
        greedy = dist.get_actions(deterministic=True).detach()
        advantage = self._rewards(images, labels, sampled.bool()) - self._rewards(images, labels, greedy.bool())
        loss = -(advantage * dist.log_prob(sampled)).mean() - self.cfg.entropy_coef * dist.entropy().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.history.append({"policy_loss": loss.item(), "blocks_sampled": sampled.sum(1).float().mean().item()})


def joint_finetune(
    backbone: CifarResNet,
    model: BaseAlgorithm,
    train_set: ImageDataset,
    policy_set: ImageDataset,
    val_set: ImageDataset | None,
    reward: RewardConfig,
    cfg: FinetuneConfig,
    obs_size: int | None = None,
    checkpoint_dir: Path | None = None,
    writer=None,
    resume: bool = False,
    seed: int = 0,
) -> tuple[PolicyBackbone, dict]:
    """Fine-tune ``backbone`` and the policy of SB3 ``model`` (one-shot env) together, in place.

    ``train_set``: the backbone's images; ``policy_set``: the policy's images; ``val_set``:
    evaluated each epoch with the pair's deterministic masks. Checkpoints of the pair (one state
    dict, plus the policy's optimiser and data position) go to ``checkpoint_dir``; ``resume``
    continues from the last checkpoint.
    """
    if not hasattr(model.policy, "get_distribution") or model.action_space.__class__.__name__ != "MultiBinary":
        raise ConfigError("joint fine-tuning needs a policy trained on the oneshot env (MultiBinary masks)")
    pair = PolicyBackbone(backbone, model.policy, obs_size)
    policy_step = PolicyGradientStep(pair, policy_set, reward, cfg, seed)

    def sample_masks(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # SB3 samples with the global torch RNG (not ``gen``); train() checkpoints that RNG too.
        return pair.decide(images, deterministic=False)

    result = train(
        pair, train_set, val_set, cfg, checkpoint_dir=checkpoint_dir, writer=writer, resume=resume,
        mask_sampler=sample_masks, after_step=policy_step, seed=seed, desc="finetune",
    )
    if writer is not None and policy_step.history:
        for i, h in enumerate(policy_step.history):
            writer.add_scalar("losses/policy_loss", h["policy_loss"], i)
            writer.add_scalar("charts/blocks_sampled", h["blocks_sampled"], i)
        writer.flush()
    return pair, {**result, "policy_steps": len(policy_step.history)}

