"""Baselines beside the gated model: ``python -m experiments.compare --config FILE [--set k=v …]``.

Always in the same run, on the test split: the full backbone; the RL policy before and after
joint fine-tuning; the differentiable-gate model (same backbone, fine-tuning budget); a static
ResNet of equal FLOPs trained with the pretraining recipe; random dropping at the gated model's
keep rate; the best fixed block subset of that size (greedy, chosen on held-out images); the
dynamic model's most frequent mask with the backbone fine-tuned on it (same recipe as the joint
fine-tuning: what that fine-tuning gains without per-image decisions). Writes
``runs/<name>/{gates,baselines}/`` and the ``compare`` section of ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import time

import torch

from agents.gates import evaluate_gates, load_gated, train_gates
from backbone.baselines import fixed_mask_accuracy, greedy_fixed_subset, masked_accuracy, random_keep_masks, static_depth_for_flops
from backbone.models.cost import measure_backbone_cost
from backbone.data.datasets import Splits, load_splits
from backbone.errors import ConfigError
from backbone.models.resnet import build_resnet
from backbone.training.loop import evaluate, resolve_device, train
from backbone.models.weights import load_checkpoint, load_model, save_checkpoint
from experiments.common import cli, config_from_args, experiment_parser, finished_stage, tensorboard_writer, update_metrics
from experiments.config import ExperimentConfig
from experiments.pretrain import backbone_path, load_backbone
from experiments.train_policy import policy_images

STAGE = "compare"


def gated_reference(metrics: dict) -> tuple[str, dict]:
    """The dynamic model the baselines are matched to: the fine-tuned pair, else the policy."""
    for key in ("finetune", "policy"):
        if key in metrics:
            return key, metrics[key]["test"]
    raise ConfigError("no trained policy in this run: run train_policy (and finetune) first")


def _record(method: str, accuracy: float, flops: float, full_flops: float, blocks: float, train_time: float | None, **extra) -> dict:
    return {"method": method, "accuracy": accuracy, "flops": flops, "flops_ratio": flops / full_flops,
            "blocks_used": blocks, "train_time_s": train_time, **extra}


def run_gates(cfg: ExperimentConfig, backbone, splits: Splits, device, resume: bool) -> dict:
    out = cfg.run_dir / "gates"
    if resume and (out / "gated.pt").exists():
        gated, train_time = load_gated(out / "gated.pt").to(device), load_checkpoint(out / "gated.pt")["train_time_s"]
    else:
        writer = tensorboard_writer(cfg.run_dir, "gates")
        torch.manual_seed(cfg.seed)  # gate initialisation (and Gumbel noise) use the global RNG
        try:
            gated, history = train_gates(copy.deepcopy(backbone), splits.train, None, cfg.gates, cfg.finetune,
                                         checkpoint_dir=out / "checkpoints", writer=writer, resume=resume, seed=cfg.seed)
        finally:
            writer.close()
        train_time = sum(r["epoch_time_s"] for r in history["history"])
        save_checkpoint(out / "gated.pt", gated, train_time_s=train_time)
    return {"metrics": evaluate_gates(gated, splits.test), "train_time_s": train_time}


def run_static(cfg: ExperimentConfig, backbone, target_flops: float, splits: Splits, device, resume: bool) -> dict:
    depth, flops = static_depth_for_flops(target_flops, backbone)
    out = cfg.run_dir / "baselines" / f"static_resnet{depth}.pt"
    if resume and out.exists():
        model, train_time = load_model(out).to(device), load_checkpoint(out)["train_time_s"]
    else:
        torch.manual_seed(cfg.seed)
        a = backbone.arch
        model = build_resnet(depth, a["num_classes"], a["shortcut"], a["width"], a["normalization"]).to(device)
        writer = tensorboard_writer(cfg.run_dir, f"static_resnet{depth}")
        try:
            history = train(model, splits.train, splits.val, cfg.pretrain, checkpoint_dir=out.parent / f"checkpoints_resnet{depth}",
                            writer=writer, resume=resume, seed=cfg.seed, desc=f"static resnet{depth}")
        finally:
            writer.close()
        train_time = sum(r["epoch_time_s"] for r in history["history"])
        save_checkpoint(out, model, train_time_s=train_time)
    return {"depth": depth, "flops": flops, "accuracy": evaluate(model, splits.test)["accuracy"], "train_time_s": train_time}


def run_fixed_mask_finetune(cfg: ExperimentConfig, backbone, mask: torch.Tensor, splits: Splits, device, resume: bool) -> dict:
    """The fair comparator of joint fine-tuning: the same fine-tuning recipe and budget, but one
    fixed mask (the dynamic model's most frequent) for every image, i.e. a static sub-network."""
    out = cfg.run_dir / "baselines" / "fixed_mask_finetuned.pt"
    if resume and out.exists():
        model, train_time = load_model(out).to(device), load_checkpoint(out)["train_time_s"]
    else:
        model = copy.deepcopy(backbone)
        fixed = mask.to(device)

        def same_mask(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return fixed.expand(images.shape[0], -1)

        history = train(model, splits.train, None, cfg.finetune, checkpoint_dir=out.parent / "checkpoints_fixed_mask",
                        resume=resume, mask_sampler=same_mask, seed=cfg.seed, desc="fixed-mask fine-tune")
        train_time = sum(r["epoch_time_s"] for r in history["history"])
        save_checkpoint(out, model, train_time_s=train_time)
    return {"accuracy": fixed_mask_accuracy(model, splits.test, mask), "train_time_s": train_time}


def run_compare(cfg: ExperimentConfig, resume: bool = False, splits: Splits | None = None) -> dict:
    run_dir = cfg.run_dir
    done = finished_stage(run_dir, STAGE, run_dir / "metrics.json", resume)
    if done is not None:
        return done
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if not backbone_path(run_dir).exists():
        raise ConfigError(f"no backbone in {run_dir}: run the earlier stages first")
    reference_stage, reference = gated_reference(metrics)
    device = resolve_device(cfg.device)
    splits = splits if splits is not None else load_splits(cfg.data)
    backbone = load_backbone(run_dir, device)
    recorded = len(reference["top_masks"][0]["mask"])
    if recorded != backbone.num_blocks:  # else the fixed-mask baseline fails after the others have trained
        raise ConfigError(
            f"the {reference_stage} results in {metrics_path} are for a backbone with {recorded} blocks but "
            f"{backbone_path(run_dir)} has {backbone.num_blocks}: rerun train_policy (and finetune) for this backbone"
        )
    cost = measure_backbone_cost(backbone)
    full = cost.full_flops
    keep_rate = reference["blocks_used"] / backbone.num_blocks
    tic = time.perf_counter()

    methods = [_record("full backbone", evaluate(backbone, splits.test)["accuracy"], full, full, backbone.num_blocks,
                       metrics.get("pretrain", {}).get("train_time_s"))]
    if "policy" in metrics:
        p = metrics["policy"]
        methods.append(_record("RL policy", p["test"]["accuracy"], p["test"]["flops"], full, p["test"]["blocks_used"],
                               p["train_time_s"], lam=p["reward"]["lam"]))
    if "finetune" in metrics:
        f = metrics["finetune"]
        methods.append(_record("RL policy + joint fine-tuning", f["test"]["accuracy"], f["test"]["flops"], full,
                               f["test"]["blocks_used"], f["train_time_s"]))
    gates = run_gates(cfg, backbone, splits, device, resume)
    g = gates["metrics"]
    methods.append(_record("differentiable gates", g["accuracy"], g["flops"], full, g["blocks_used"], gates["train_time_s"], lam=cfg.gates.lam))

    static = run_static(cfg, backbone, reference["flops"], splits, device, resume)
    methods.append(_record(f"static ResNet-{static['depth']} (equal FLOPs)", static["accuracy"], static["flops"], full,
                           None, static["train_time_s"]))

    random_masks = random_keep_masks(len(splits.test), backbone.num_blocks, keep_rate, seed=cfg.seed)
    methods.append(_record(f"random dropping (keep rate {keep_rate:.2f})", masked_accuracy(backbone, splits.test, random_masks),
                           cost.mask_flops(random_masks).mean().item(), full, random_masks.float().sum(1).mean().item(), None))

    num_keep = max(1, round(reference["blocks_used"]))
    _, held_out = policy_images(cfg, splits)
    subset, path = greedy_fixed_subset(backbone, held_out if len(held_out) else splits.val, num_keep)
    methods.append(_record(f"best fixed subset ({num_keep} blocks)", fixed_mask_accuracy(backbone, splits.test, subset),
                           cost.mask_flops(subset).item(), full, num_keep, None,
                           mask="".join("1" if b else "0" for b in subset.tolist())))

    top = reference["top_masks"][0]["mask"]
    frequent = torch.tensor([c == "1" for c in top])
    tuned = run_fixed_mask_finetune(cfg, backbone, frequent, splits, device, resume)
    methods.append(_record(f"most frequent mask, fine-tuned ({int(frequent.sum())} blocks)", tuned["accuracy"],
                           cost.mask_flops(frequent).item(), full, int(frequent.sum()), tuned["train_time_s"], mask=top))

    result = {"reference": reference_stage, "keep_rate": keep_rate, "methods": methods, "gates": g,
              "fixed_subset_path": path, "wall_time_s": time.perf_counter() - tic}
    update_metrics(run_dir, STAGE, result)
    print_table(methods)
    return result


def print_table(methods: list[dict]) -> None:
    print(f"{'method':<42}{'top-1':>8}{'blocks':>8}{'MFLOPs':>10}{'FLOPs ratio':>13}{'train s':>9}")
    for m in methods:
        blocks = f"{m['blocks_used']:.2f}" if m["blocks_used"] is not None else "-"
        train_time = f"{m['train_time_s']:.0f}" if m["train_time_s"] is not None else "-"
        print(f"{m['method']:<42}{m['accuracy']:>8.4f}{blocks:>8}{m['flops'] / 1e6:>10.2f}{m['flops_ratio']:>13.3f}{train_time:>9}")


def main(args) -> None:
    cfg = config_from_args(args)
    resolve_device(cfg.device)
    run_compare(cfg, resume=args.resume, splits=load_splits(cfg.data))


if __name__ == "__main__":
    cli(main, experiment_parser(__doc__.splitlines()[0]))
