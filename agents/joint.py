"""Joint fine-tuning of the backbone and the block-skipping policy.

Both sets of weights change, in the one supervised loop of ``backbone.training.loop``:

- **Backbone**: cross-entropy on training images, each run with a keep mask *sampled from the
  policy*, so the backbone learns to work with the blocks the policy actually keeps.
- **Policy**: after every backbone step, one policy-gradient step (REINFORCE with BlockDrop's
  self-critical baseline: advantage = reward of the sampled mask − reward of the policy's own
  deterministic mask) on a batch of the policy's images — the held-out split, not the backbone's
  training images, on which a backbone is almost always right and dropping everything would look
  free. The policy is the SB3 model's own network, so the result stays a loadable SB3 policy.
  Both kinds of policy work (``agents.pair.DynamicModel.rollout``): the one-shot one samples all
  bits at once, the sequential one a decision per block, its log-probability summed over them.

**BatchNorm.** In a masked training forward each block normalises (and updates its running
statistics) with only the rows that the policy routes through it, which is exactly the
population that block sees at inference. Running statistics therefore adapt to the policy's
routing instead of to the full network's; the policy's forward passes run in eval mode.

**Under torchrun** (``torchrun -m experiments.finetune``) the backbone trains data-parallel as in
``train``, and the policy step is data-parallel too: every rank takes its share of the same
global policy batch (``finetune.policy_batch_size``), scores it with rank 0's BatchNorm
statistics (broadcast before each step: the backbone's running statistics are per rank), and
the policy's gradients are averaged over ranks before Adam's step, so every rank keeps the same
policy; the end of training checks that the ranks' copies agree. What differs from one process:
the backbone's BatchNorm batch statistics (per rank), and with ``backbone_masks: sampled`` the
random draws of the masks (SB3 samples each rank's rows with its own RNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from agents.pair import DynamicModel
from backbone.data.batching import BatchLoader
from backbone.data.datasets import ImageDataset
from backbone.errors import ConfigError
from backbone.training import distributed
from backbone.training.loop import TrainConfig, train
from backbone.training.refit import refit_heads, refit_images
from envs.rewards import RewardConfig, episode_reward, reward_score


@dataclass
class FinetuneConfig(TrainConfig):
    """The ``finetune:`` section: the backbone recipe of ``TrainConfig`` plus the policy's step."""

    epochs: int = 10
    lr: float = 0.01  # fine-tuning: a tenth of the pretraining rate
    warmup_epochs: float = 0.0
    policy_lr: float = 1e-4  # Adam on the policy network
    policy_batch_size: int = 256
    entropy_coef: float = 0.01  # bonus on the policy's entropy: without it the self-critical step collapses to one mask
    # Which masks the backbone trains on: "sampled" from the policy (it sees the policy's
    # exploration too), the policy's "greedy" ones (exactly the routing used at inference), or
    # "rungs": a ladder policy's candidate masks, one drawn uniformly per image (slimmable-style:
    # every path the policy may choose stays good, not only the ones it chooses today).
    backbone_masks: str = "sampled"
    # After joint fine-tuning, train a fresh policy (PPO, ``policy.timesteps``) on the fine-tuned
    # backbone, frozen, and make it the pair's policy (experiments.finetune): the first policy
    # chose each image's path on the backbone *before* fine-tuning, and its small policy-gradient
    # steps during fine-tuning do not keep up with how much the paths' accuracies change.
    refresh_policy: bool = False
    # After fine-tuning, refit the classifier on this many clean training images (0: off;
    # backbone.training.refit), as every fine-tuned baseline of the comparison does with the same
    # images. A ladder pair gets one head per rung (backbone.models.path_heads), each refitted on
    # every image through its rung: one backbone's paths then share their blocks but not their
    # classifier. (Training such heads by SGD within the epoch gained nothing: docs/results.md.)
    refit_heads: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy_lr <= 0 or self.policy_batch_size < 1 or self.entropy_coef < 0:
            raise ConfigError("finetune.policy_lr must be > 0, policy_batch_size >= 1, entropy_coef >= 0")
        if self.refit_heads < 0:
            raise ConfigError(f"finetune.refit_heads is a number of training images (0: off), got {self.refit_heads}")
        if self.backbone_masks not in ("sampled", "greedy", "rungs"):
            raise ConfigError(f"finetune.backbone_masks must be sampled, greedy or rungs, got {self.backbone_masks!r}")


class PolicyGradientStep:
    """The policy's update after each backbone step (an ``after_step`` hook of ``train``)."""

    def __init__(self, pair: DynamicModel, policy_images: ImageDataset, reward: RewardConfig, cfg: FinetuneConfig, seed: int):
        self.pair, self.reward, self.cfg = pair, reward, cfg
        device = next(pair.parameters()).device
        ctx = distributed.current()  # under torchrun: this rank's share of each global policy batch
        ranks = {"rank": ctx.rank, "world_size": ctx.world_size} if ctx.enabled else {}
        self.loader = BatchLoader(policy_images, cfg.policy_batch_size, device=device, shuffle=True, seed=seed + 1,
                                  drop_last=False, **ranks)
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
            logits = backbone(images, masks)
        backbone.train(was_training)
        correct = logits.argmax(1) == labels
        # The env's per-image baseline is a constant per image: the self-critical difference
        # below cancels it, so only the score itself matters here.
        score = reward_score(self.reward, logits, labels) if self.reward.kind == "linear" else None
        return episode_reward(self.reward, correct, masks.sum(1), backbone.num_blocks, score)

    def __call__(self, *_unused) -> None:
        images, labels = self._next_batch()
        distributed.broadcast_module(self.pair.backbone, parameters=False)  # rank 0's BN statistics score every share
        policy = self.pair.policy
        was_training = policy.training
        policy.set_training_mode(False)  # no train/eval difference in our policies; SB3 convention for rollouts
        sampled = self.pair.rollout(images, deterministic=False)
        with torch.no_grad():
            greedy = self.pair.rollout(images, deterministic=True).keep_mask
        advantage = self._rewards(images, labels, sampled.keep_mask) - self._rewards(images, labels, greedy)
        loss = -(advantage * sampled.log_prob).mean() - self.cfg.entropy_coef * sampled.entropy.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients_of(list(policy.parameters()))  # the mean over ranks' shares: one policy everywhere
        self.optimizer.step()
        policy.set_training_mode(was_training)
        self.history.append({"policy_loss": loss.item(), "blocks_sampled": sampled.keep_mask.sum(1).float().mean().item()})


def joint_finetune(
    pair: DynamicModel,
    train_set: ImageDataset,
    policy_set: ImageDataset,
    val_set: ImageDataset | None,
    reward: RewardConfig,
    cfg: FinetuneConfig,
    checkpoint_dir: Path | None = None,
    writer=None,
    resume: bool = False,
    seed: int = 0,
) -> dict:
    """Fine-tune the backbone and the policy of ``pair`` (either env's policy) together, in place.

    ``train_set``: the backbone's images; ``policy_set``: the policy's images; ``val_set``:
    evaluated each epoch with the pair's greedy masks. Checkpoints of the pair (one state dict,
    plus the policy's optimiser and data position) go to ``checkpoint_dir``; ``resume``
    continues from the last checkpoint. Returns ``train``'s history plus ``policy_steps``.
    """
    policy_step = PolicyGradientStep(pair, policy_set, reward, cfg, seed)
    greedy = cfg.backbone_masks == "greedy"
    if cfg.backbone_masks == "rungs" and pair.ladder is None:
        raise ConfigError("finetune.backbone_masks: rungs needs a ladder policy (policy.action: ladder)")

    def sample_masks(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if cfg.backbone_masks == "rungs":
            rungs = torch.randint(0, pair.ladder.shape[0], (images.shape[0],), generator=gen, device=gen.device)
            return pair.ladder[rungs.to(pair.ladder.device)]
        # SB3 samples with the global torch RNG (not ``gen``); train() checkpoints that RNG too.
        return pair.decide(images, deterministic=greedy)

    result = train(
        pair, train_set, val_set, cfg, checkpoint_dir=checkpoint_dir, writer=writer, resume=resume,
        mask_sampler=sample_masks, after_step=policy_step, seed=seed, desc="finetune",
    )
    refit_s = 0.0
    if cfg.refit_heads:
        if pair.ladder is not None and pair.backbone.path_heads is None:
            pair.backbone.attach_path_heads(pair.ladder.cpu())
        refit_s = refit_heads(pair.backbone, refit_images(train_set, cfg.refit_heads, seed),
                              lambda images: pair.decide(images, deterministic=True))
    distributed.check_same_on_all_ranks(pair, "the backbone and policy")
    if writer is not None and policy_step.history:
        for i, h in enumerate(policy_step.history):
            writer.add_scalar("losses/policy_loss", h["policy_loss"], i)
            writer.add_scalar("charts/blocks_sampled", h["blocks_sampled"], i)
        writer.flush()
    return {**result, "policy_steps": len(policy_step.history), "refit_time_s": refit_s}
