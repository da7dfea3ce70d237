"""Evaluating a trained block-skipping policy: its FLOPs, its keep masks, and its accuracy and
compute on every image of a task (overall, per class, per difficulty, most frequent masks)."""

from __future__ import annotations

import torch
from stable_baselines3.common.base_class import BaseAlgorithm

from backbone.models.cost import count_flops
from envs.block_skip import SkipTask


def policy_flops(model: BaseAlgorithm, task: SkipTask, env_kind: str) -> int:
    """FLOPs of the policy's decisions for one image (actor only; the critic is not used at inference)."""
    space = model.observation_space
    obs = torch.zeros((1,) + space.shape, device=model.device)
    was_training = model.policy.training
    # Eval mode: in training mode the policy's BatchNorm layers would fold this dummy input
    # into their running statistics and change every later decision.
    model.policy.set_training_mode(False)
    try:
        flops = count_flops(lambda: model.policy._predict(obs, deterministic=True))
    finally:
        model.policy.set_training_mode(was_training)
    return flops * (task.num_blocks if env_kind == "sequential" else 1)


def policy_keep_masks(model: BaseAlgorithm, observations: torch.Tensor) -> torch.Tensor:
    """The one-shot policy's deterministic keep masks for a batch of observations, computed as
    a deployed model would: the policy network on the device, no NumPy round trip (what SB3's
    ``predict`` adds). Same masks as ``model.predict(..., deterministic=True)``."""
    model.policy.set_training_mode(False)
    with torch.no_grad():
        actions = model.policy.get_distribution(observations.float()).get_actions(deterministic=True)
    return actions.reshape(observations.shape[0], -1).bool()


@torch.no_grad()
def evaluate_policy_on(
    model: BaseAlgorithm, task: SkipTask, env_kind: str = "oneshot", batch_size: int = 512, extra_flops: float = 0.0
) -> dict:
    """Deterministic policy on every image of ``task.dataset``: accuracy, blocks, FLOPs, keep rates.

    ``extra_flops``: per-image FLOPs to add to the backbone's (the policy's own, see ``policy_flops``).
    """
    results = {k: [] for k in ("correct", "blocks_used", "flops", "keep_mask", "reward")}
    for start in range(0, task.num_images, batch_size):
        idx = torch.arange(start, min(start + batch_size, task.num_images), device=task.device)
        if env_kind == "oneshot":
            out = task.play(idx, policy_keep_masks(model, task.observation(idx)))
        else:
            h, used = task.seq_start(idx), torch.zeros(len(idx), dtype=torch.long, device=task.device)
            keep = torch.zeros(len(idx), task.num_blocks, dtype=torch.bool, device=task.device)
            for i in range(task.num_blocks):
                run = task.seq_effective_run(policy_keep_masks(model, task.seq_observation(h, i, used))[:, 0], i)
                h, used, keep[:, i] = task.seq_block(h, i, run), used + run.long(), run
            out = task.seq_finish(h, idx, used, keep)
        for key in results:
            results[key].append(out[key].cpu())
    r = {k: torch.cat(v) for k, v in results.items()}
    correct, blocks = r["correct"].float(), r["blocks_used"].double()
    flops = r["flops"].double() + extra_flops
    metrics = {
        "num_images": task.num_images,
        "accuracy": correct.mean().item(),
        "blocks_used": blocks.mean().item(),
        "blocks_used_std": blocks.std(unbiased=False).item(),
        "flops": flops.mean().item(),
        "flops_ratio": (flops / task.cost.full_flops).mean().item(),
        "reward": r["reward"].double().mean().item(),
        "keep_rate_per_block": r["keep_mask"].float().mean(0).tolist(),
        "blocks_histogram": torch.bincount(r["blocks_used"].long(), minlength=task.num_blocks + 1).tolist(),
    }
    metrics["by_class"] = _grouped(task.dataset.labels.cpu(), correct, blocks, task.dataset.classes)
    if task.dataset.difficulty is not None:
        metrics["by_difficulty"] = _grouped(task.dataset.difficulty.cpu(), correct, blocks)
    metrics["top_masks"] = _top_masks(r["keep_mask"], correct)
    return metrics


def _grouped(groups: torch.Tensor, correct: torch.Tensor, blocks: torch.Tensor, names=None) -> dict:
    return {
        (names[int(g)] if names else str(int(g))): {
            "accuracy": correct[groups == g].mean().item(),
            "blocks_used": blocks[groups == g].mean().item(),
            "count": int((groups == g).sum()),
        }
        for g in groups.unique()
    }


def _top_masks(keep_mask: torch.Tensor, correct: torch.Tensor, k: int = 5) -> list[dict]:
    """The ``k`` most frequent masks ("1" = block run), with their share and accuracy."""
    patterns, inverse, counts = torch.unique(keep_mask.bool(), dim=0, return_inverse=True, return_counts=True)
    order = counts.argsort(descending=True)[:k]
    return [
        {
            "mask": "".join("1" if b else "0" for b in patterns[i].tolist()),
            "share": counts[i].item() / len(keep_mask),
            "accuracy": correct[inverse == i].mean().item(),
        }
        for i in order.tolist()
    ]
