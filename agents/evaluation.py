"""Evaluating a trained block-skipping policy: its FLOPs, its keep masks and probabilities, and
its accuracy, compute and adaptivity on every image of a task (overall, per class, per
difficulty group, most frequent masks)."""

from __future__ import annotations

import torch
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.adaptivity import adaptivity, difficulty_groups
from agents.pair import DynamicModel, greedy_decisions
from backbone.models.cost import count_flops, measure_backbone_cost, median_times, time_per_block
from envs.block_skip import SkipTask


def policy_flops(model: BaseAlgorithm, task: SkipTask, env_kind: str) -> int:
    """FLOPs of the policy's decisions for one image (actor only; the critic is not used at inference)."""
    space = model.observation_space
    obs = torch.zeros((1,) + space.shape, device=model.device)
    was_training = model.policy.training
    model.policy.set_training_mode(False)
    try:
        flops = count_flops(lambda: model.policy._predict(obs, deterministic=True))
    finally:
        model.policy.set_training_mode(was_training)
    return flops * (task.num_blocks if env_kind == "sequential" else 1)


def dynamic_model(model: BaseAlgorithm, task: SkipTask, env_kind: str) -> DynamicModel:
    """The task's backbone and ``model``'s policy as one deployable :class:`DynamicModel`."""
    return DynamicModel(task.backbone, model.policy, env_kind, task.observation_kind,
                        task.obs_shape[-1] if task.observation_kind == "pixels" else None, task.stem_grid,
                        task.ladder if env_kind == "oneshot" else None)


def policy_keep_masks(model: BaseAlgorithm, observations: torch.Tensor) -> torch.Tensor:
    """The policy's deterministic actions for a batch of observations, computed as a deployed
    model would (on the device, no NumPy round trip, which is what SB3's ``predict`` adds): keep
    bits (B, L) or chosen indices (B, 1). Same as ``model.predict(..., deterministic=True)``."""
    model.policy.set_training_mode(False)
    return greedy_decisions(model.policy, observations.float()).reshape(observations.shape[0], -1)


@torch.no_grad()
def evaluate_policy_on(
    model: BaseAlgorithm, task: SkipTask, env_kind: str = "oneshot", batch_size: int = 512, extra_flops: float = 0.0,
    groups: tuple[torch.Tensor, list[str], str] | None = None,
) -> dict:
    """Deterministic policy on every image of ``task.dataset``: accuracy, blocks, FLOPs, keep
    rates, and adaptivity (``agents.adaptivity``) per difficulty group.

    ``extra_flops``: per-image FLOPs to add to the backbone's (the policy's own, see ``policy_flops``).
    ``groups``: (group per image, names, description) of the task's images; default: computed
    from ``task.backbone`` (``agents.adaptivity.difficulty_groups``). Pass the pretrained
    backbone's groups to compare several models on the same groups.
    """
    pair = dynamic_model(model, task, env_kind)
    model.policy.set_training_mode(False)
    results = {k: [] for k in ("correct", "blocks_used", "flops", "keep_mask", "reward", "keep_prob")}
    for start in range(0, task.num_images, batch_size):
        idx = torch.arange(start, min(start + batch_size, task.num_images), device=task.device)
        roll = pair.rollout(task.dataset.images[idx], deterministic=True)
        out = task.play(idx, roll.keep_mask)
        out["keep_prob"] = roll.keep_prob
        for key in results:
            results[key].append(out[key].cpu())
    r = {k: torch.cat(v) for k, v in results.items()}
    correct, blocks = r["correct"].float(), r["blocks_used"].double()
    flops = r["flops"].double() + extra_flops
    group_index, group_names, how = groups if groups is not None else difficulty_groups(task.backbone, task.dataset)
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
        "adaptivity": adaptivity(r["keep_mask"], r["correct"], group_index, group_names, r["keep_prob"]),
        "difficulty_groups": how,
    }
    metrics["by_difficulty"] = metrics["adaptivity"]["by_difficulty"]
    metrics["by_class"] = _grouped(task.dataset.labels.cpu(), correct, blocks, task.dataset.classes)
    metrics["top_masks"] = _top_masks(r["keep_mask"], correct)
    return metrics


def pair_latency(pair: DynamicModel, dataset, batch: int, stream: int, repeats: int, device, policy_flops: float = 0.0,
                 warmup: int = 2, breakdown: bool = False) -> list[dict]:
    """Wall-clock of the full backbone and of the dynamic model (policy + masked backbone, the
    stem run once), float32, on the same images: a stream of ``stream`` different images one at
    a time (batch 1: each image gets its own mask, as deployed) and one batch of ``batch``.

    Each row also holds the FLOPs ratio (full ÷ dynamic, policy included) of exactly those
    images, and ``efficiency`` = time ratio ÷ FLOPs ratio (1.0: every saved FLOP saved time).

    ``breakdown``: also where the pair's time goes. The masked backbone alone on the policy's
    masks is timed interleaved with the other two (``policy_ms``: the pair minus it, within one
    measurement); ``kept_time_share`` is the share of the full forward's time those masks keep by
    per-block times (skipped downsampling blocks' shortcuts included), the time of a runner that
    skips at no cost. FLOPs undercount blocks that are
    slow per FLOP: ``cost_model_efficiency`` (that share against the FLOPs ratio) is this part of
    the gap, ``runner_efficiency`` the runner's; efficiency ≈ their product × the masked
    backbone's share of the pair's time.
    """
    backbone, rows = pair.backbone, []
    cost = measure_backbone_cost(backbone, dataset.images.shape[-1])
    for size in (1, batch):
        count = min(stream if size == 1 else size, len(dataset))
        images = dataset.images[:count].to(device)
        chunks = images.split(size)
        with torch.inference_mode():
            chunk_masks = [pair.decide(x) for x in chunks]
            fns = {"full": lambda: [backbone(x) for x in chunks], "dynamic": lambda: [pair(x) for x in chunks]}
            if breakdown:
                fns["masked"] = lambda: [backbone(x, m) for x, m in zip(chunks, chunk_masks)]
            times = median_times(fns, device, warmup=warmup, repeats=repeats)
            block_times = time_per_block(backbone, chunks[0], device, repeats) if breakdown else None
        masks = torch.cat(chunk_masks).cpu()
        flops_ratio = cost.full_flops / (cost.mask_flops(masks).mean().item() + policy_flops)
        time_ratio = times["full"] / times["dynamic"]
        row = {"batch": size, "images": count, "full_ms": times["full"] * 1e3 / len(chunks),
               "dynamic_ms": times["dynamic"] * 1e3 / len(chunks), "time_ratio": time_ratio,
               "flops_ratio": flops_ratio, "efficiency": time_ratio / flops_ratio,
               "distinct_masks": int(torch.unique(masks, dim=0).shape[0]), "dtype": "float32"}
        if breakdown:
            share = block_times.share(masks)
            row.update(masked_backbone_ms=times["masked"] * 1e3 / len(chunks), kept_time_share=share,
                       policy_ms=(times["dynamic"] - times["masked"]) * 1e3 / len(chunks),
                       runner_efficiency=times["full"] * share / times["masked"],
                       cost_model_efficiency=1 / share / flops_ratio)
        rows.append(row)
    return rows


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
