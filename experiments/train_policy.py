"""Train a block-skipping policy: ``python -m experiments.train_policy --config FILE [--set k=v …]``.

Needs the backbone of a finished pretrain stage in ``runs/<name>/backbone.pt`` (or
``model.init_checkpoint``). Writes ``runs/<name>/<tag>/`` (``--tag``, default ``policy``):
``config.yaml``, ``policy.zip`` (SB3), ``checkpoints/last.zip`` + ``progress.json`` (resume),
TensorBoard logs in ``runs/<name>/tb/<tag>/`` and the ``<tag>`` section of ``metrics.json``.
Several tags (e.g. one per λ) share one backbone.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from agents.callbacks import save_atomic
from agents.evaluation import evaluate_policy_on
from agents.rl import train_policy
from backbone.data.datasets import ImageDataset, Splits, load_splits, split_train_val
from backbone.errors import ConfigError
from backbone.models.resnet import CifarResNet
from backbone.training.loop import evaluate, resolve_device
from envs.block_skip import SkipTask
from experiments.common import cli, config_from_args, experiment_parser, finished_stage, prepare_output_dir, update_metrics
from experiments.config import ExperimentConfig
from experiments.pretrain import backbone_path, build_backbone, load_backbone


def policy_dir(run_dir: Path, tag: str = "policy") -> Path:
    return run_dir / tag


def find_backbone(cfg: ExperimentConfig, splits: Splits, device: torch.device) -> CifarResNet:
    """The run's pretrained backbone, else the imported ``model.init_checkpoint``."""
    if backbone_path(cfg.run_dir).exists():
        return load_backbone(cfg.run_dir, device)
    if cfg.model.init_checkpoint:
        return build_backbone(cfg, splits.train.num_classes).to(device)
    raise ConfigError(
        f"no backbone in {cfg.run_dir}: run `python -m experiments.pretrain` with this config first, "
        f"or set model.init_checkpoint to import one"
    )


def policy_images(cfg: ExperimentConfig, splits: Splits) -> tuple[ImageDataset, ImageDataset]:
    """(training, held-out evaluation) images of the policy.

    The policy learns on ``policy.data_split`` (by default the validation part the backbone never
    trained on: on its own training images a backbone is nearly always right, and a policy
    trained there learns to drop everything).
    """
    images = splits.val if cfg.policy.data_split == "val" else splits.train
    if len(images) == 0:
        raise ConfigError("the policy has no images: set data.val_fraction > 0, or policy.data_split: train")
    return split_train_val(images, cfg.policy.eval_fraction, cfg.data.split_seed + 1)


def policy_tasks(cfg: ExperimentConfig, backbone: CifarResNet, splits: Splits, device) -> tuple[SkipTask, SkipTask | None, SkipTask]:
    """(training, held-out evaluation, test) tasks sharing one backbone."""
    p = cfg.policy
    train_images, eval_images = policy_images(cfg, splits)
    task = SkipTask(backbone, train_images, p.reward, device=device, obs_size=p.obs_size)
    eval_task = SkipTask(backbone, eval_images, p.reward, device=device, obs_size=p.obs_size) if len(eval_images) else None
    test_task = SkipTask(backbone, splits.test, p.reward, device=device, obs_size=p.obs_size)
    return task, eval_task, test_task


def run_train_policy(
    cfg: ExperimentConfig, tag: str = "policy", resume: bool = False, splits: Splits | None = None
) -> dict:
    """Train the policy of ``cfg`` on the run's backbone; evaluate it on the test split."""
    run_dir, out_dir = cfg.run_dir, policy_dir(cfg.run_dir, tag)
    done = finished_stage(run_dir, tag, out_dir / "policy.zip", resume)
    if done is not None:
        return done
    device = resolve_device(cfg.device)
    splits = splits if splits is not None else load_splits(cfg.data)
    backbone = find_backbone(cfg, splits, device)
    task, eval_task, test_task = policy_tasks(cfg, backbone, splits, device)
    p = cfg.policy
    print(
        f"{tag}: {p.algo} on the {p.env} env, reward {p.reward.kind} (lambda {p.reward.lam}), "
        f"{len(task.dataset)} training images, {p.timesteps} timesteps, device {device}"
    )
    tic = time.perf_counter()
    model, progress = train_policy(
        p, task, out_dir / "checkpoints", eval_task, seed=cfg.seed, resume=resume, tb_dir=run_dir / "tb" / tag
    )
    save_atomic(model, out_dir / "policy.zip")
    test = evaluate_policy_on(model, test_task, p.env, extra_flops=progress["policy_flops"])
    full = evaluate(backbone, splits.test)
    metrics = {
        "tag": tag,
        "algo": p.algo,
        "env": p.env,
        "reward": {"kind": p.reward.kind, "lam": p.reward.lam, "normalize": p.reward.normalize, "penalty": p.reward.penalty},
        "timesteps": progress["timesteps"],
        "train_time_s": progress["train_time_s"],
        "wall_time_s": time.perf_counter() - tic,
        "policy_flops": progress["policy_flops"],
        "backbone_flops": task.cost.full_flops,
        "full_backbone_test_accuracy": full["accuracy"],
        "test": test,
        "eval_history": progress["eval_history"],
    }
    update_metrics(run_dir, tag, metrics)
    print(
        f"{tag}: test accuracy {test['accuracy']:.4f} (full backbone {full['accuracy']:.4f}) using "
        f"{test['blocks_used']:.2f} ± {test['blocks_used_std']:.2f} of {task.num_blocks} blocks, "
        f"FLOPs ratio {test['flops_ratio']:.3f} incl. the policy; training {progress['train_time_s']:.0f} s"
    )
    print(f"{tag}: policy saved to {out_dir / 'policy.zip'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return metrics


def main(args) -> None:
    cfg = config_from_args(args)
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data)  # bad input fails here, before anything is written
    find_backbone(cfg, splits, device)
    prepare_output_dir(policy_dir(cfg.run_dir, args.tag), cfg, resume=args.resume, overwrite=args.overwrite)
    run_train_policy(cfg, args.tag, resume=args.resume, splits=splits)


if __name__ == "__main__":
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--tag", default="policy", help="sub-directory of the run for this policy (e.g. lam0.05)")
    cli(main, parser)
