"""The whole study in one command: ``python -m experiments.run --config FILE [--set k=v …] [--resume]``.

pretrain (or import) → train policy (+ one policy per λ of ``study.lambdas``) → joint fine-tune →
baselines (``study.baselines``) → evaluate → report. With ``--resume`` every stage whose output
exists is skipped, so an interrupted run continues where it stopped. With several
``study.seeds`` each seed gets ``runs/<name>/seed<S>/`` and ``runs/<name>/summary.md`` gives
mean ± std over seeds; with one seed the run is ``runs/<name>/``.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from backbone.data.datasets import Splits, load_splits
from backbone.training.loop import resolve_device
from experiments.common import (
    cli,
    config_from_args,
    experiment_parser,
    prepare_output_dir,
    prepare_run_dir,
    tensorboard_writer,
    write_json,
)
from experiments.compare import run_compare
from experiments.config import ExperimentConfig
from experiments.evaluate import evaluate_run
from experiments.finetune import finetune_dir, run_finetune
from experiments.pretrain import build_backbone, run_pretrain
from experiments.report import sweep_points
from experiments.train_policy import policy_dir, run_train_policy


def seed_configs(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One config per seed of the study (the run itself when there is one seed)."""
    seeds = cfg.study.seeds or [cfg.seed]
    if len(seeds) == 1:
        return [dataclasses.replace(cfg, seed=seeds[0])]
    base = str(Path(cfg.output_dir) / cfg.name)
    return [dataclasses.replace(cfg, seed=s, output_dir=base, name=f"seed{s}") for s in seeds]


def with_lambda(cfg: ExperimentConfig, lam: float) -> ExperimentConfig:
    reward = dataclasses.replace(cfg.policy.reward, lam=lam)
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, reward=reward))


def run_one(cfg: ExperimentConfig, splits: Splits, resume: bool, overwrite: bool) -> dict:
    """Every stage of one seed, each skipped on ``resume`` when its output exists."""
    run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    run_pretrain(cfg, run_dir, resume=resume, splits=splits)  # seeds torch, then builds the backbone
    prepare_output_dir(policy_dir(run_dir), cfg, resume=resume)
    run_train_policy(cfg, "policy", resume=resume, splits=splits)
    for lam in cfg.study.lambdas:
        tag, lam_cfg = f"lam{lam:g}", with_lambda(cfg, lam)
        prepare_output_dir(policy_dir(run_dir, tag), lam_cfg, resume=resume)
        run_train_policy(lam_cfg, tag, resume=resume, splits=splits)
    if cfg.policy.env == "oneshot" and cfg.finetune.epochs > 0:
        prepare_output_dir(finetune_dir(run_dir), cfg, resume=resume)
        run_finetune(cfg, "policy", resume=resume, splits=splits)
    if cfg.study.baselines:
        run_compare(cfg, resume=resume, splits=splits)
    evaluation = evaluate_run(run_dir)
    log_sweep_hparams(run_dir)
    return evaluation


def log_sweep_hparams(run_dir: Path) -> None:
    """TensorBoard's HPARAMS tab: one row per trained policy (λ → accuracy, FLOPs ratio)."""
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    writer = tensorboard_writer(run_dir, "hparams")
    for point in sweep_points(metrics):
        writer.add_hparams(
            {"lambda": point["lam"], "tag": point["tag"]},
            {"hparams/accuracy": point["accuracy"], "hparams/flops_ratio": point["flops_ratio"],
             "hparams/blocks_used": point["blocks_used"]},
            run_name=point["tag"],
        )
    writer.close()


def summarize_seeds(cfg: ExperimentConfig, run_dirs: list[Path]) -> Path:
    """Mean ± std over seeds of every method of the comparison (names without their details)."""
    import json

    per_method: dict[str, dict[str, list[float]]] = {}
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        methods = metrics.get("compare", {}).get("methods", [])
        for m in methods or [{"method": "final model", **metrics["evaluation"]}]:
            name = m["method"].split(" (")[0]
            entry = per_method.setdefault(name, {"accuracy": [], "flops_ratio": []})
            entry["accuracy"].append(m["accuracy"])
            entry["flops_ratio"].append(m["flops_ratio"])

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    summary = {name: {k: mean_std(v) for k, v in entry.items()} | {"seeds": len(entry["accuracy"])} for name, entry in per_method.items()}
    out = Path(cfg.output_dir) / cfg.name
    write_json(out / "summary.json", {"seeds": cfg.study.seeds, "methods": summary})
    lines = [f"# {cfg.name}: mean ± std over seeds {cfg.study.seeds}", "", "| method | top-1 (%) | FLOPs ratio | seeds |", "|---|---|---|---|"]
    for name, s in summary.items():
        (acc, acc_sd), (fr, fr_sd) = s["accuracy"], s["flops_ratio"]
        lines.append(f"| {name} | {100 * acc:.2f} ± {100 * acc_sd:.2f} | {fr:.3f} ± {fr_sd:.3f} | {s['seeds']} |")
    lines += ["", "Per-seed reports: " + ", ".join(f"[{d.name}]({d.name}/report.md)" for d in run_dirs), ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out / "summary.md"


def main(args) -> None:
    cfg = config_from_args(args)
    resolve_device(cfg.device)
    splits = load_splits(cfg.data)  # bad data input fails here, before anything is written
    build_backbone(cfg, splits.train.num_classes)  # and a bad imported checkpoint
    run_dirs = []
    for seed_cfg in seed_configs(cfg):
        run_one(seed_cfg, splits, resume=args.resume, overwrite=args.overwrite)
        run_dirs.append(seed_cfg.run_dir)
    print()
    if len(run_dirs) > 1:
        print(f"summary over seeds: {summarize_seeds(cfg, run_dirs)}")
    for run_dir in run_dirs:
        print(f"report: {run_dir / 'report.md'}")
    print(f"TensorBoard: tensorboard --logdir {Path(cfg.output_dir) / cfg.name}")


if __name__ == "__main__":
    cli(main, experiment_parser(__doc__.splitlines()[0]))
