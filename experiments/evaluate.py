"""Evaluate a run's trained policy + backbone: ``python -m experiments.evaluate --run DIR [--json]``.

On the chosen split (default test): top-1, blocks used (mean ± std), FLOPs per image including
the policy, FLOPs ratio, wall-clock latency at batch 1 and at a large batch (warm-up, median of
repeats, on the run's device) against the full backbone, accuracy and blocks per class and per
difficulty level, the most frequent masks, and the training time of every stage. Updates
``metrics.json`` (section ``evaluation``), ``report.md`` and the plots of the run directory;
``--json`` prints the evaluation as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from agents.evaluation import evaluate_policy_on, policy_flops, policy_keep_masks
from backbone.models.cost import median_times
from backbone.data.datasets import load_splits
from backbone.errors import ConfigError
from backbone.training.loop import resolve_device
from backbone.models.weights import load_model
from envs.block_skip import SkipTask
from experiments.common import cli, load_policy, update_metrics
from experiments.config import load_config
from experiments.finetune import finetune_dir
from experiments.pretrain import backbone_path
from experiments.report import write_report
from experiments.train_policy import policy_dir


def final_pair_paths(run_dir: Path, tag: str = "policy") -> tuple[str, Path, Path]:
    """(name, backbone, policy) of the run's final dynamic model: fine-tuned if it exists."""
    if (finetune_dir(run_dir) / "policy.zip").exists():
        return "finetune", finetune_dir(run_dir) / "backbone.pt", finetune_dir(run_dir) / "policy.zip"
    if (policy_dir(run_dir, tag) / "policy.zip").exists():
        return tag, backbone_path(run_dir), policy_dir(run_dir, tag) / "policy.zip"
    raise ConfigError(f"{run_dir} has no trained policy (policy.zip): run experiments.train_policy first")


def measure_latency(task: SkipTask, model, batch_sizes, repeats: int) -> list[dict]:
    """Wall-clock per batch of the full backbone and of policy + masked backbone, same images.

    The policy runs as the torch module it is, on the device (``agents.evaluation.policy_keep_masks``),
    not through SB3's ``predict``, whose NumPy round trip is an API convenience, not model cost.
    """
    device, backbone, rows = task.device, task.backbone, []
    for batch in batch_sizes:
        idx = torch.arange(min(batch, task.num_images), device=device)
        images, obs = task.dataset.images[idx.cpu()].to(device), task.observation(idx)

        def dynamic() -> None:
            backbone(images, policy_keep_masks(model, obs))

        with torch.inference_mode():
            times = median_times({"full": lambda: backbone(images), "dynamic": dynamic}, device, warmup=2, repeats=repeats)
        rows.append({"batch": len(idx), "full_ms": times["full"] * 1e3, "dynamic_ms": times["dynamic"] * 1e3,
                     "time_ratio": times["full"] / times["dynamic"]})
    return rows


def evaluate_run(run_dir: Path, split: str = "test", tag: str = "policy") -> dict:
    """Evaluate the final (backbone, policy) pair of ``run_dir`` on ``split``; update its report."""
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    name, backbone_file, policy_file = final_pair_paths(run_dir, tag)
    backbone = load_model(backbone_file, map_location=device).to(device).eval()
    model = load_policy(policy_file, cfg.policy.algo, backbone, cfg.policy.env, backbone_file, device)
    splits = load_splits(cfg.data)
    dataset = getattr(splits, split)
    task = SkipTask(backbone, dataset, cfg.policy.reward, device=device, obs_size=cfg.policy.obs_size)
    extra = policy_flops(model, task, cfg.policy.env)
    result = evaluate_policy_on(model, task, cfg.policy.env, extra_flops=extra)
    if cfg.policy.env == "oneshot":
        result["latency"] = measure_latency(task, model, (1, cfg.study.latency_batch), cfg.study.latency_repeats)
        for row in result["latency"]:
            row["flops_ratio"] = 1 / result["flops_ratio"]  # full ÷ dynamic, to set beside time_ratio
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    times = {s: metrics[s].get("train_time_s") for s in ("pretrain", "finetune") if s in metrics}
    times.update({k: v.get("train_time_s") for k, v in metrics.items() if isinstance(v, dict) and "tag" in v})
    for method in metrics.get("compare", {}).get("methods", []):
        if method["method"].startswith(("differentiable gates", "static")):
            times[method["method"]] = method["train_time_s"]
    result.update(model=name, split=split, device=str(device), policy_flops=extra, backbone_flops=task.cost.full_flops,
                  train_time_s=times)
    metrics = update_metrics(run_dir, "evaluation", result)
    write_report(run_dir, metrics, cfg)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory, e.g. runs/quickstart")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--tag", default="policy", help="policy to evaluate when there is no fine-tuned pair")
    parser.add_argument("--json", action="store_true", help="print the evaluation as one JSON object")
    parser.add_argument("--debug", action="store_true")

    def run(args) -> None:
        result = evaluate_run(args.run, args.split, args.tag)
        if args.json:
            json.dump(result, sys.stdout)
            print()
        else:
            print(f"{result['model']} on {args.split}: top-1 {result['accuracy']:.4f}, blocks {result['blocks_used']:.2f} "
                  f"± {result['blocks_used_std']:.2f}, FLOPs ratio {result['flops_ratio']:.3f} (policy included)")
            for row in result.get("latency", []):
                print(f"  batch {row['batch']}: full {row['full_ms']:.2f} ms, dynamic {row['dynamic_ms']:.2f} ms, "
                      f"time ratio {row['time_ratio']:.2f} vs FLOPs ratio {row['flops_ratio']:.2f}")
            print(f"report: {args.run / 'report.md'}")

    # cli() parses again; hand it this parser.
    cli(run, parser)


if __name__ == "__main__":
    main()
