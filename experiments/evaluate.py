"""Evaluate a run's trained policy + backbone: ``python -m experiments.evaluate --run DIR [--json]``.

On the chosen split (default test): top-1, blocks used (mean ± std), FLOPs per image including
the policy, FLOPs ratio, adaptivity (distinct masks, masks covering 90% of the images, blocks
and accuracy per difficulty group, per-image keep probabilities), wall-clock latency against
the full backbone (a stream of ``study.latency_stream`` different images at batch 1, and one
batch of ``study.latency_batch``; warm-up, median of repeats, one precision: float32), accuracy
and blocks per class, the most frequent masks, and the training time of every stage. Updates
``metrics.json`` (section ``evaluation``), ``report.md`` and the plots of the run directory;
``--json`` prints the evaluation as one JSON object. A streamed split (``streamed_imagefolder``)
is decoded into memory once for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agents.adaptivity import difficulty_groups, log_adaptivity
from agents.evaluation import evaluate_policy_on, pair_latency, policy_flops
from agents.pair import DynamicModel
from agents.rl import make_dynamic_model, make_skip_task
from backbone.baselines import mask_string
from backbone.data.datasets import load_splits
from backbone.data.streaming import in_memory
from backbone.errors import ConfigError
from backbone.models.weights import load_model
from backbone.training.loop import resolve_device
from experiments.common import cli, load_policy, owning, print_report, report_parser, tensorboard_writer, update_metrics
from experiments.config import load_config
from experiments.finetune import finetune_dir, finetune_section
from experiments.pretrain import backbone_path
from experiments.report import plot_examples, write_report
from experiments.train_policy import load_ladder, policy_dir


def final_pair_paths(run_dir: Path, tag: str = "policy", finetuned: bool = True) -> tuple[str, Path, Path]:
    """(name, backbone, policy) of the run's final dynamic model of policy ``tag``: fine-tuned if it
    exists (and ``finetuned``; else the policy on the pretrained backbone)."""
    if finetuned and (finetune_dir(run_dir, tag) / "policy.zip").exists():
        return finetune_section(tag), finetune_dir(run_dir, tag) / "backbone.pt", finetune_dir(run_dir, tag) / "policy.zip"
    if (policy_dir(run_dir, tag) / "policy.zip").exists():
        return tag, backbone_path(run_dir), policy_dir(run_dir, tag) / "policy.zip"
    raise ConfigError(f"{run_dir} has no trained policy (policy.zip): run experiments.train_policy first")


def load_final_pair(run_dir: Path, tag: str = "policy", finetuned: bool = True):
    """(config, name, SB3 model, ladder or None, the pair as a DynamicModel, device) of the run's
    final dynamic model of policy ``tag`` (fine-tuned if it exists and ``finetuned``)."""
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    name, backbone_file, policy_file = final_pair_paths(run_dir, tag, finetuned)
    # The stage's own config: a policy trained with --tag may differ from the run's (λ, env, ...).
    stage_config = policy_file.parent / "config.yaml"
    cfg = load_config(stage_config if stage_config.exists() else run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    backbone = load_model(backbone_file, map_location=device).to(device).eval()
    model = load_policy(policy_file, cfg.policy.algo, backbone, cfg.policy.env, backbone_file, device)
    ladder = load_ladder(policy_file.parent)
    return cfg, name, model, ladder, make_dynamic_model(cfg.policy, backbone, model, ladder).eval(), device


def evaluate_run(run_dir: Path, split: str = "test", tag: str = "policy") -> dict:
    """Evaluate the final (backbone, policy) pair of ``run_dir`` on ``split``; update its report."""
    if not (run_dir / "config.yaml").exists():  # before taking the lock, which would create the folder
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    with owning(run_dir):
        return _evaluate(run_dir, split, tag)


def _evaluate(run_dir: Path, split: str, tag: str) -> dict:
    cfg, name, model, ladder, pair, device = load_final_pair(run_dir, tag)
    # Per-image evaluation needs the pixels at hand: a streamed split is decoded into memory once
    # (the test split as data.max_test_images left it, the others capped like the policy's images).
    dataset = in_memory(getattr(load_splits(cfg.data), split), None if split == "test" else cfg.data.max_policy_images,
                        cfg.data.split_seed + 2)
    task = make_skip_task(cfg.policy, pair.backbone, dataset, device, ladder)
    groups = difficulty_groups(load_model(backbone_path(run_dir), map_location=device).to(device).eval(), dataset)
    extra = policy_flops(model, task, cfg.policy.env)
    result = evaluate_policy_on(model, task, cfg.policy.env, extra_flops=extra, groups=groups)
    s = cfg.study
    result["latency"] = pair_latency(pair, dataset, s.latency_batch, s.latency_stream, s.latency_repeats, device, extra)
    result["examples"] = examples_by_difficulty(pair, dataset, groups[0])
    plot_examples(dataset, result["examples"], groups[1], run_dir / "examples.png")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    times = {k: v["train_time_s"] for k, v in metrics.items()
             if isinstance(v, dict) and isinstance(v.get("train_time_s"), (int, float))}
    result.update(model=name, split=split, device=str(device), policy_flops=extra, backbone_flops=task.cost.full_flops,
                  train_time_s=times)
    metrics = update_metrics(run_dir, "evaluation", result)
    write_report(run_dir, metrics, cfg)
    writer = tensorboard_writer(run_dir, "evaluation")
    try:  # the final model's adaptivity beside the training curves
        log_adaptivity(lambda tag, value, step: writer.add_histogram(tag, value, step) if torch.is_tensor(value)
                       else writer.add_scalar(tag, value, step), f"evaluation_{split}", result, 0)
    finally:
        writer.close()
    return result


def examples_by_difficulty(pair: DynamicModel, dataset, groups: torch.Tensor, per_group: int = 6) -> list[dict]:
    """A few images of the easiest and of the hardest group with the mask the model gave each
    (for the report's picture of who gets which blocks)."""
    device = next(pair.parameters()).device
    picked = []
    for g in (int(groups.min()), int(groups.max())):
        idx = (groups == g).nonzero().flatten()[:per_group]
        masks = pair.decide(dataset.images[idx.to(dataset.images.device)].to(device)).cpu()
        picked += [{"index": int(i), "group": g, "label": int(dataset.labels[i]), "mask": mask_string(m)}
                   for i, m in zip(idx.tolist(), masks)]
    return picked


def main() -> None:
    parser = report_parser(__doc__.splitlines()[0], "run directory, e.g. runs/quickstart")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--tag", default="policy", help="policy to evaluate when there is no fine-tuned pair")

    def run(args) -> None:
        def print_text(result: dict) -> None:
            print(f"{result['model']} on {args.split}: top-1 {result['accuracy']:.4f}, blocks {result['blocks_used']:.2f} "
                  f"± {result['blocks_used_std']:.2f}, FLOPs ratio {result['flops_ratio']:.3f} (policy included)")
            for row in result.get("latency", []):
                print(f"  batch {row['batch']}: full {row['full_ms']:.2f} ms, dynamic {row['dynamic_ms']:.2f} ms, "
                      f"time ratio {row['time_ratio']:.2f} vs FLOPs ratio {row['flops_ratio']:.2f}")
            print(f"report: {args.run / 'report.md'}")

        print_report(evaluate_run(args.run, args.split, args.tag), args.json, print_text)

    # cli() parses again; hand it this parser.
    cli(run, parser)


if __name__ == "__main__":
    main()
