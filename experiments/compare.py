"""The comparison at matched compute: ``python -m experiments.compare --config FILE [--set k=v …]``.

Every method is a curve over its own knob on one accuracy-vs-FLOPs plot (FLOPs include the
policy or the gates), read at the FLOPs budgets of ``study.budgets`` (``experiments.curves``):

- **RL policy** over λ, before and after joint fine-tuning (from the run's policy stages);
- **differentiable gates** trained for each budget (FLOPs-budget loss, fine-tuning budget);
- **fixed subsets** of every size k: the best mask per size chosen on the held-out images
  (exhaustive where 2^L ≤ 4,096, beam search beyond), on the test split as they are, and the
  sizes that bracket each budget **fine-tuned** on their mask with the same budget as the pair;
- **random dropping** over keep rates as it is, and at each budget's keep rate **fine-tuned**
  with that drop rate (same budget);
- **static ResNets** over depth and width, one within 3% of each budget, trained from scratch
  with the pretraining recipe minus stochastic depth (``study.static_epochs`` epochs); for a
  torchvision backbone torchvision's ResNet-18/34/50, the closest in FLOPs to each budget (only
  these points exist), from ImageNet weights when ``model.weights`` is set;
- **confidence cascades** (``experiments.cascade``): a fine-tuned fixed subset answers the images
  it is sure of, a larger one (or the full backbone) the rest; the chain and thresholds for each
  budget chosen on the held-out split (none without one). The simplest per-image compute, built
  from the static networks above at their training budget: the control for whether adaptivity pays;
  its last stage may be the full backbone fine-tuned (that budget again) focused on the images the
  cheapest subset is unsure of (``agents.cascade.focused_loss``), a static network like the others;
  every other fine-tuned subset is fine-tuned that way too and is a point of the fine-tuned
  fixed-subset curve (the focus is a better recipe for static networks as well);
- the **full backbone**, as it is and fine-tuned with the same budget (what the extra epochs
  alone are worth), and the **per-image oracle** among the fixed-subset masks (a bound: how much
  any per-image policy could gain on this backbone).

Writes ``runs/<name>/{gates,baselines}/`` and the ``compare`` section of ``metrics.json``.
Streamed splits (``ImageFiles``) stream through every evaluation and training here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import torch

from agents.gates import evaluate_gates, load_gated, train_gates
from backbone.baselines import (
    fixed_mask_accuracy,
    masked_accuracy,
    mask_string,
    oracle_curve,
    random_keep_masks,
)
from backbone.data.datasets import Splits, load_splits
from backbone.data.streaming import image_size_of
from backbone.errors import ConfigError
from backbone.models.cost import measure_backbone_cost
from backbone.models.weights import load_checkpoint, save_checkpoint
from backbone.training import distributed
from backbone.training.loop import evaluate, predict, resolve_device, stochastic_depth_sampler
from backbone.training.refit import refit_heads, refit_images
from experiments.cascade import FULL, FULL_FT, cascades_of_run, focused_subsets, last_stages
from experiments.common import cli, config_from_args, experiment_parser, finished_stage, tensorboard_writer, update_metrics
from experiments.config import ExperimentConfig
from experiments.finetuned import finetuned_on_mask, finetuned_on_masks
from experiments.curves import accuracy_at, bracketing, headline, point
from experiments.pretrain import backbone_path, load_backbone
from experiments.static_networks import static_description, static_networks, static_recipe
from experiments.train_policy import run_ladder

STAGE = "compare"
RL, RL_FT = "RL policy", "RL policy + joint fine-tuning"
GATES, STATIC = "differentiable gates", "static ResNet (depth × width)"
SUBSET, SUBSET_FT = "fixed subset", "fixed subset + fine-tuning"
RANDOM, RANDOM_FT = "random dropping", "random dropping + fine-tuning"
ORACLE = "oracle (per image, fixed-subset masks)"
CASCADE = "confidence cascade (fixed subsets, then the full backbone)"


def policy_points(metrics: dict) -> dict[str, list[dict]]:
    """The RL curves from the run's policy stages (sections with "tag") and fine-tuned pairs
    (sections with "policy_tag"); training time includes the backbone's."""
    pretrain = metrics.get("pretrain", {}).get("train_time_s") or 0.0
    policies = {v["tag"]: v for v in metrics.values() if isinstance(v, dict) and "tag" in v and "test" in v}
    curves = {RL: [], RL_FT: []}
    for tag, p in policies.items():
        a = p["test"]["adaptivity"]
        extra = {"lam": p["reward"]["lam"], "tag": tag, "blocks_used_std": a["blocks_used_std"],
                 "hard_minus_easy_blocks": a.get("hard_minus_easy_blocks"), "distinct_masks": a["distinct_masks"]}
        curves[RL].append(point(p["test"]["flops_ratio"], p["test"]["accuracy"], pretrain + p["train_time_s"], **extra))
    for v in metrics.values():
        if isinstance(v, dict) and "policy_tag" in v and v["policy_tag"] in policies:
            p, a = policies[v["policy_tag"]], v["test"]["adaptivity"]
            extra = {"lam": p["reward"]["lam"], "tag": v["policy_tag"], "blocks_used_std": a["blocks_used_std"],
                     "hard_minus_easy_blocks": a.get("hard_minus_easy_blocks"), "distinct_masks": a["distinct_masks"]}
            curves[RL_FT].append(point(v["test"]["flops_ratio"], v["test"]["accuracy"],
                                       pretrain + p["train_time_s"] + v["train_time_s"], **extra))
    return {k: sorted(v, key=lambda q: q["flops_ratio"]) for k, v in curves.items() if v}


def fixed_subsets(cfg, backbone, cost, splits, pretrain_time, resume) -> tuple[dict, dict]:
    """The run's subset ladder (``experiments.train_policy.run_ladder``: searched on held-out
    images), its test curve as it is and fine-tuned at the sizes that bracket each budget (also
    the rungs of a nested ladder that the policy routes among), and the per-image oracle among its masks."""
    ladder = run_ladder(cfg, backbone, splits)
    full = cost.full_flops
    ratios = [f / full for f in ladder["flops"]]
    correct = torch.stack([predict_correct(backbone, splits.test, m) for m in ladder["masks"]])
    plain = [point(r, c.double().mean().item(), pretrain_time, k=int(m.sum()), mask=mask_string(m))
             for r, c, m in zip(ratios, correct, ladder["masks"])]
    ladders = [("", ladder, ratios)]
    if cfg.policy.action == "ladder" and cfg.policy.ladder_search == "nested":
        # The policy routes among the nested ladder's rungs, which are not the best subsets of their
        # sizes: each rung near a budget, fine-tuned on its own as a static network, is the direct
        # control for what the routing adds (on akamaster's ResNet-32 such a rung fine-tuned 1.8
        # points better than the best 9-block subset of the search; docs/results.md).
        nested = run_ladder(cfg, backbone, splits, nested=True)
        ladders.append(("nested_", nested, [f / full for f in nested["flops"]]))
    tuned, done = [], set()
    for prefix, rungs, rung_ratios in ladders:
        for k in sorted(set().union(*(bracketing(rung_ratios, b) for b in cfg.study.budgets))):
            mask = rungs["masks"][k]
            bits = mask_string(mask)
            if bits in done:  # a rung both ladders share is fine-tuned once
                continue
            done.add(bits)
            model, train_time = finetuned_on_mask(cfg, backbone, f"subset_{prefix}k{k}", mask, splits, resume)
            tuned.append(point(rung_ratios[k], fixed_mask_accuracy(model, splits.test, mask), pretrain_time + train_time,
                               k=k, mask=bits, search=rungs["search"]))
    oracle = oracle_curve(correct, torch.tensor(ladder["flops"]), full)
    info = {"search": ladder["search"], "search_images": ladder["images"], "search_s": ladder["search_s"],
            "masks": [mask_string(m) for m in ladder["masks"]], "held_out_accuracy": ladder["held_out_accuracy"]}
    return {SUBSET: plain, SUBSET_FT: sorted(tuned, key=lambda q: q["flops_ratio"])}, {"oracle": oracle, "ladder": info}


def cascade_points(cascades: dict, pretrain_time: float) -> list[dict]:
    """The cascades as curve points: training time the fine-tuning of the networks they chain."""
    return [point(c["flops_ratio"], c["accuracy"], pretrain_time + c["fine_tuning_time_s"], budget=c["budget"],
                  chain=c["chain"], sent_on=c["sent_on"], blocks_used_std=c["adaptivity"]["blocks_used_std"],
                  hard_minus_easy_blocks=c["adaptivity"].get("hard_minus_easy_blocks"))
            for c in cascades["cascades"]]


@torch.no_grad()
def predict_correct(model, dataset, mask: torch.Tensor) -> torch.Tensor:
    """(N,) bool: image n right with ``mask`` for every image."""
    logits = predict(model, dataset, keep_mask_fn=lambda images: mask.to(images.device).expand(images.shape[0], -1))
    return logits.argmax(1) == dataset.labels.cpu()


def random_dropping(cfg, backbone, cost, splits, pretrain_time, resume) -> dict:
    """Random dropping over ``study.keep_rates`` as it is, and fine-tuned at each budget's keep rate."""
    full, num_blocks, n = cost.full_flops, backbone.num_blocks, len(splits.test)
    span = sum(k - s for k, s in zip(cost.block_flops, cost.skip_flops))

    def scored(model, rate: float, train_time: float, **knob) -> dict:
        masks = random_keep_masks(n, num_blocks, rate, seed=cfg.seed)
        return point(cost.mask_flops(masks).mean().item() / full, masked_accuracy(model, splits.test, masks),
                     train_time, keep_rate=rate, **knob)

    plain = [scored(backbone, r, pretrain_time) for r in cfg.study.keep_rates]
    tuned = []
    for budget in cfg.study.budgets:
        rate = min(1.0, max(0.0, (budget * full - cost.min_flops) / span))
        ctx = distributed.current()  # under torchrun: masks drawn for the global batch, each rank keeps its rows
        sampler = stochastic_depth_sampler(num_blocks, 1.0 - rate, "uniform", ctx.rank, ctx.world_size)
        model, train_time = finetuned_on_masks(cfg, backbone, f"random_keep{rate:.3f}", sampler, splits, resume)
        tuned.append(scored(model, rate, pretrain_time + train_time, budget=budget))
    return {RANDOM: plain, RANDOM_FT: tuned}


def gates_for_budgets(cfg, backbone, splits, device, pretrain_time, resume) -> list[dict]:
    """The gated model trained for each budget (FLOPs-budget loss, the fine-tuning recipe)."""
    points = []
    for budget in cfg.study.budgets:
        out = cfg.run_dir / "gates" / f"target{budget:g}"
        if resume and (out / "gated.pt").exists():
            gated, train_time = load_gated(out / "gated.pt").to(device), load_checkpoint(out / "gated.pt")["train_time_s"]
        else:
            writer = tensorboard_writer(cfg.run_dir, f"gates_target{budget:g}")
            torch.manual_seed(cfg.seed)  # gate initialisation (and Gumbel noise) use the global RNG
            try:
                gated, history = train_gates(copy.deepcopy(backbone), splits.train, None,
                                             dataclasses.replace(cfg.gates, target=budget), cfg.finetune,
                                             checkpoint_dir=out / "checkpoints", writer=writer, resume=resume, seed=cfg.seed)
            finally:
                writer.close()
            train_time = sum(r["epoch_time_s"] for r in history["history"])
            if cfg.finetune.refit_heads:  # as every fine-tuned method: the classifier, on the gates' own decisions
                gated.eval()
                train_time += refit_heads(gated.backbone, refit_images(splits.train, cfg.finetune.refit_heads, cfg.seed),
                                          lambda images: (gated(images), gated.last_keep_mask)[1])
            save_checkpoint(out / "gated.pt", gated, train_time_s=train_time)
        m = evaluate_gates(gated, splits.test)
        points.append(point(m["flops_ratio"], m["accuracy"], pretrain_time + train_time, target=budget,
                            blocks_used_std=m["blocks_used_std"]))
    return points


def gap_closed(curves: dict, oracle: dict, budgets: list[float]) -> list[dict]:
    """Per budget: how much of the oracle's lead over the best fixed subset the RL policy takes
    (same backbone, before fine-tuning): (policy − subset) / (oracle − subset)."""
    oracle_points = [point(f, a) for f, a in zip(oracle["flops_ratio"], oracle["accuracy"])]
    rows = []
    for b in budgets:
        subset, policy = (accuracy_at(curves.get(k, []), b) for k in (SUBSET, RL))
        bound = accuracy_at(oracle_points, b)
        gap = None if None in (subset, policy, bound) or bound <= subset else (policy - subset) / (bound - subset)
        rows.append({"budget": b, "fixed_subset": subset, "policy": policy, "oracle": bound, "gap_closed": gap})
    return rows


def with_policy_curves(compare: dict, policy_metrics: dict) -> dict:
    """``compare`` (a ``compare`` section) with the RL curves of the policies in ``policy_metrics``
    (``policy_points``) in place of its own, and the headline and the oracle gap read again
    (``experiments.sweep`` adds policies trained in other run directories this way)."""
    curves = compare.get("curves", {})
    curves = {**{k: v for k, v in curves.items() if k == FULL}, **policy_points(policy_metrics),
              **{k: v for k, v in curves.items() if k not in (FULL, RL, RL_FT)}}
    result = {**compare, "curves": curves, "headline": headline(curves, compare["budgets"])}
    if "oracle" in compare:
        result["gap_closed"] = gap_closed(curves, compare["oracle"], compare["budgets"])
    return result


def run_compare(cfg: ExperimentConfig, resume: bool = False, splits: Splits | None = None,
                policy_metrics: dict | None = None) -> dict:
    """The comparison of the run's backbone. ``policy_metrics``: the metrics sections whose
    policies make the RL curves; default the run's own ``metrics.json``, ``{}`` for none."""
    run_dir = cfg.run_dir
    done = finished_stage(run_dir, STAGE, run_dir / "metrics.json", resume)
    if done is not None:
        return done
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if not backbone_path(run_dir).exists():
        raise ConfigError(f"no backbone in {run_dir}: run the earlier stages first")
    # Under torchrun every rank runs every step (the training data-parallel, the cheap scoring
    # duplicated, so the ranks stay in step) and rank 0 writes every file.
    ctx = distributed.current()
    device = ctx.device or resolve_device(cfg.device)
    splits = splits if splits is not None else load_splits(cfg.data)
    backbone = load_backbone(run_dir, device).eval()
    for section, v in metrics.items():  # else the policy curves would mix in results of another backbone
        if isinstance(v, dict) and "test" in v and v["test"].get("top_masks"):
            recorded = len(v["test"]["top_masks"][0]["mask"])
            if recorded != backbone.num_blocks:
                raise ConfigError(
                    f"the {section} results in {metrics_path} are for a backbone with {recorded} blocks but "
                    f"{backbone_path(run_dir)} has {backbone.num_blocks}: rerun train_policy (and finetune) for this backbone")
    cost = measure_backbone_cost(backbone, image_size_of(splits.test))  # at the size the data has
    pretrain_time = metrics.get("pretrain", {}).get("train_time_s") or 0.0
    tic = time.perf_counter()

    curves = {FULL: [point(1.0, evaluate(backbone, splits.test)["accuracy"], pretrain_time)]}
    leave_out = set(cfg.study.leave_out)
    fine_tuned = None
    if "full_finetune" not in leave_out:
        # The same fine-tuning budget on the full network: what the extra epochs alone are worth.
        fine_tuned = finetuned_on_masks(cfg, backbone, "full", None, splits, resume)
        curves[FULL_FT] = [point(1.0, evaluate(fine_tuned[0], splits.test)["accuracy"], pretrain_time + fine_tuned[1])]
    subsets, bound = fixed_subsets(cfg, backbone, cost, splits, pretrain_time, resume)
    curves.update(subsets)
    if "cascade" not in leave_out and len(splits.val) and subsets[SUBSET_FT]:
        distributed.barrier()  # rank 0 wrote the fine-tuned subsets' files; every rank reads them
        for name, model, seconds, mask in focused_subsets(cfg, backbone, cost, splits, resume):
            # Each subset's better recipe is a point of its own: the curve's envelope takes it.
            curves[SUBSET_FT].append(point(cost.mask_flops(mask).item() / cost.full_flops,
                                           fixed_mask_accuracy(model, splits.test, mask), pretrain_time + seconds,
                                           k=int(mask.sum()), mask=mask_string(mask), focused=name))
        curves[SUBSET_FT].sort(key=lambda q: q["flops_ratio"])
        distributed.barrier()
        lasts = last_stages(cfg, backbone, cost, splits, resume, train_missing=True, fine_tuned=fine_tuned)
        curves[CASCADE] = cascade_points(cascades_of_run(run_dir, lasts, cost, splits, cfg.study.budgets, device),
                                         pretrain_time)
    if "random_dropping" not in leave_out:
        curves.update(random_dropping(cfg, backbone, cost, splits, pretrain_time, resume))
    if "gates" not in leave_out:
        curves[GATES] = gates_for_budgets(cfg, backbone, splits, device, pretrain_time, resume)
    if "static" not in leave_out:
        curves[STATIC] = static_networks(cfg, backbone, cost, splits, device, resume)

    result = {
        "budgets": list(cfg.study.budgets),
        "curves": curves,
        "oracle": bound["oracle"],
        "fixed_subset_search": bound["ladder"],
        "static_recipe": {**{k: getattr(static_recipe(cfg), k) for k in ("epochs", "stochastic_depth", "distill")},
                          **static_description(cfg, backbone)},
        "finetune_budget": {"epochs": cfg.finetune.epochs, "images": len(splits.train), "distill": cfg.finetune.distill,
                            "refit_heads": cfg.finetune.refit_heads},
        "left_out": sorted(leave_out),
        "wall_time_s": time.perf_counter() - tic,
    }
    result = with_policy_curves(result, metrics if policy_metrics is None else policy_metrics)
    if ctx.is_main:
        update_metrics(run_dir, STAGE, result)
        print_headline(result)
    return result


def print_headline(result: dict) -> None:
    for row in result["headline"]:
        print(f"at {100 * row['budget']:.0f}% of the full network's FLOPs (winner: {row['winner']}):")
        for name, acc in sorted(row["accuracy"].items(), key=lambda kv: -(kv[1] or -1)):
            if acc is not None:
                print(f"  {name:<40}{100 * acc:>7.2f}%")


def main(args) -> None:
    cfg = config_from_args(args)
    resolve_device(cfg.device)
    recipe = static_recipe(cfg)  # an imported backbone without a static budget fails before any work
    world = distributed.env_world_size()
    distributed.check_batch_divisible(cfg.finetune.batch_size, world, "finetune.batch_size")
    distributed.check_batch_divisible(recipe.batch_size, world, "pretrain.batch_size (the static networks' recipe)")
    distributed.init_distributed(cfg.device)
    run_compare(cfg, resume=args.resume, splits=load_splits(cfg.data))


if __name__ == "__main__":
    cli(main, experiment_parser(__doc__.splitlines()[0]), distributed_ok=True)
