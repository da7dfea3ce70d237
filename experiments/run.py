"""The whole study in one command: ``python -m experiments.run --config FILE [--set k=v …] [--resume]``.

pretrain (or import) → train policy (+ one policy per λ of ``study.lambdas``) → joint fine-tune
of each → the comparison at matched compute (``study.baselines``, ``experiments.compare``) →
evaluate → report. With ``--resume`` every stage whose output exists is skipped, so an
interrupted run continues where it stopped. With several ``study.seeds`` each seed gets
``runs/<name>/seed<S>/`` and ``runs/<name>/summary.md`` gives mean ± std over seeds of every
method's accuracy at each budget (``study.share_backbone``: the seeds share the first seed's
backbone); with one seed the run is ``runs/<name>/``.
"""

from __future__ import annotations

import dataclasses
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
    update_metrics,
    write_json,
)
from experiments.compare import run_compare
from experiments.static_networks import static_recipe
from experiments.config import ExperimentConfig
from experiments.curves import seed_summary
from experiments.evaluate import evaluate_run
from experiments.finetune import finetune_dir, run_finetune
from experiments.pretrain import backbone_path, build_backbone, run_pretrain
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


def run_one(cfg: ExperimentConfig, splits: Splits, resume: bool, overwrite: bool, shared_backbone: Path | None = None) -> dict:
    """Every stage of one seed, each skipped on ``resume`` when its output exists.
    ``shared_backbone``: a finished run directory whose backbone (and pretrain metrics) to reuse."""
    run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    if shared_backbone is not None and not backbone_path(run_dir).exists():
        share_backbone(shared_backbone, run_dir)
    run_pretrain(cfg, run_dir, resume=resume or shared_backbone is not None, splits=splits)  # seeds torch, then builds the backbone
    for tag, lam_cfg in [("policy", cfg)] + [(f"lam{lam:g}", with_lambda(cfg, lam)) for lam in cfg.study.lambdas]:
        prepare_output_dir(policy_dir(run_dir, tag), lam_cfg, resume=resume)
        run_train_policy(lam_cfg, tag, resume=resume, splits=splits)
        if cfg.finetune.epochs > 0:
            prepare_output_dir(finetune_dir(run_dir, tag), lam_cfg, resume=resume)
            run_finetune(lam_cfg, tag, resume=resume, splits=splits)
    if cfg.study.baselines:
        run_compare(cfg, resume=resume, splits=splits)
    evaluation = evaluate_run(run_dir)
    log_sweep_hparams(run_dir)
    return evaluation


def share_backbone(source: Path, run_dir: Path) -> None:
    """Copy ``source``'s backbone and pretrain metrics into ``run_dir`` (``study.share_backbone``),
    and the static networks it trained from scratch, if any: like the backbone they depend on
    nothing a seed varies (policies, fine-tuning), and they are the study's longest training."""
    import json
    import shutil

    shutil.copy2(backbone_path(source), backbone_path(run_dir))
    for ladder in source.glob("ladder*.json"):  # a function of the backbone and the held-out images only
        shutil.copy2(ladder, run_dir / ladder.name)
    statics = sorted(source.glob("baselines/static_*.pt"))  # none yet where seeds run side by side (a sweep)
    for static in statics:
        (run_dir / "baselines").mkdir(parents=True, exist_ok=True)
        shutil.copy2(static, run_dir / "baselines" / static.name)
    pretrain = json.loads((source / "metrics.json").read_text())["pretrain"]
    update_metrics(run_dir, "pretrain", {**pretrain, "shared_from": str(source), "shared_statics": [s.stem for s in statics]})


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
    """Mean ± std over seeds of every method's accuracy at every budget (``experiments.curves``)."""
    import json

    headlines = [json.loads((d / "metrics.json").read_text())["compare"]["headline"] for d in run_dirs]
    rows = seed_summary(headlines)
    out = Path(cfg.output_dir) / cfg.name
    shared = cfg.study.share_backbone
    pretrains = [json.loads((d / "metrics.json").read_text()).get("pretrain", {}) for d in run_dirs[1:]]
    shared_statics = bool(shared and all(p.get("shared_statics") for p in pretrains))
    write_json(out / "summary.json", {"seeds": cfg.study.seeds, "shared_backbone": shared,
                                      "shared_static_networks": shared_statics, "budgets": rows})
    what = "backbone and from-scratch static networks" if shared_statics else "backbone"
    lines = [f"# {cfg.name}: mean ± std over seeds {cfg.study.seeds}", "",
             (f"All seeds share the first seed's {what}; policies, fine-tuning and the other baselines are per seed."
              if shared else "Every seed trains its own backbone."), ""]
    for row in rows:
        lines += [f"## At {100 * row['budget']:.0f}% of the full network's FLOPs (winner: {row['winner']})", "",
                  "| method | top-1 (%) | seeds |", "|---|---|---|"]
        for name, st in sorted(row["methods"].items(), key=lambda kv: -kv[1]["mean"]):
            lines.append(f"| {name} | {100 * st['mean']:.2f} ± {100 * st['std']:.2f} | {st['seeds']} |")
        lines.append("")
    lines += ["Per-seed reports: " + ", ".join(f"[{d.name}]({d.name}/report.md)" for d in run_dirs), ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out / "summary.md"


def main(args) -> None:
    cfg = config_from_args(args)
    resolve_device(cfg.device)
    splits = load_splits(cfg.data)  # bad data input fails here, before anything is written
    build_backbone(cfg, splits.train.num_classes)  # and a bad imported checkpoint
    if cfg.study.baselines:
        static_recipe(cfg)  # an imported backbone without study.static_epochs: refused before the policies train
    run_dirs = []
    for seed_cfg in seed_configs(cfg):
        shared = run_dirs[0] if run_dirs and cfg.study.share_backbone else None
        run_one(seed_cfg, splits, resume=args.resume, overwrite=args.overwrite, shared_backbone=shared)
        run_dirs.append(seed_cfg.run_dir)
    print()
    if len(run_dirs) > 1:
        print(f"summary over seeds: {summarize_seeds(cfg, run_dirs)}")
    for run_dir in run_dirs:
        print(f"report: {run_dir / 'report.md'}")
    print(f"TensorBoard: tensorboard --logdir {Path(cfg.output_dir) / cfg.name}")


if __name__ == "__main__":
    cli(main, experiment_parser(__doc__.splitlines()[0]))
