"""Jointly fine-tune backbone and policy: ``python -m experiments.finetune --config FILE [--tag T] [--set k=v …]``.

Needs the run's pretrained backbone and trained policy ``--tag`` (default ``policy``, the one
of ``policy.reward.lam``; λ-sweep policies are ``lam<λ>``). Writes ``runs/<name>/finetune/``
(``finetune_<tag>/`` for other tags): ``backbone.pt`` + ``policy.zip`` (the fine-tuned pair,
each loadable on its own), ``checkpoints/last.pt`` (the pair, for ``--resume``), TensorBoard
logs in ``runs/<name>/tb/finetune[_<tag>]/`` and the ``finetune[_<tag>]`` section of
``metrics.json``. With ``finetune.refresh_policy`` a fresh policy is then trained (PPO) on the
fine-tuned backbone and becomes the pair's (checkpoints in ``refresh/``; the jointly fine-tuned
policy's test scores stay in ``test_before_refresh``). Works for policies of both envs (one-shot and sequential). For streamed data
the backbone's training images stream; the policy's images and the test split are decoded into
memory (``experiments.train_policy.policy_images``, ``test_images``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from agents.callbacks import save_atomic
from agents.evaluation import evaluate_policy_on, policy_flops
from agents.joint import joint_finetune
from agents.rl import make_dynamic_model, make_skip_task, train_policy
from backbone.data.datasets import Splits, load_splits
from backbone.errors import ConfigError
from backbone.models.weights import save_checkpoint
from backbone.training.loop import resolve_device
from backbone.training import distributed
from experiments.common import (
    cli,
    config_from_args,
    experiment_parser,
    finished_stage,
    load_policy,
    prepare_output_dir,
    tensorboard_writer,
    update_metrics,
)
from experiments.config import ExperimentConfig
from experiments.pretrain import backbone_path, load_backbone
from experiments.train_policy import (load_ladder, policy_dir, policy_images, save_ladder, test_groups, test_images,
                                     training_tasks)


def finetune_section(tag: str = "policy") -> str:
    """The metrics section (and directory name) of the fine-tuned pair of policy ``tag``."""
    return "finetune" if tag == "policy" else f"finetune_{tag}"


def finetune_dir(run_dir: Path, tag: str = "policy") -> Path:
    return run_dir / finetune_section(tag)


def run_finetune(cfg: ExperimentConfig, tag: str = "policy", resume: bool = False, splits: Splits | None = None) -> dict:
    """Fine-tune the run's backbone and policy ``tag`` together; evaluate the pair on the test split."""
    run_dir, out_dir, section = cfg.run_dir, finetune_dir(cfg.run_dir, tag), finetune_section(tag)
    done = finished_stage(run_dir, section, out_dir / "policy.zip", resume)
    if done is not None:
        return done
    ctx = distributed.current()  # under torchrun: this rank's device; every rank trains, rank 0 writes
    device = ctx.device or resolve_device(cfg.device)
    backbone, model = load_pair(cfg, tag, device)
    splits = splits if splits is not None else load_splits(cfg.data)
    train_images, eval_images = policy_images(cfg, splits)
    p = cfg.policy
    ladder = load_ladder(policy_dir(run_dir, tag))
    pair = make_dynamic_model(p, backbone, model, ladder)
    writer = tensorboard_writer(run_dir, section)
    torch.manual_seed(cfg.seed)  # the policy samples masks with torch's global RNG
    tic = time.perf_counter()
    try:
        result = joint_finetune(
            pair, splits.train, train_images, eval_images if len(eval_images) else None, p.reward, cfg.finetune,
            checkpoint_dir=out_dir / "checkpoints", writer=writer, resume=resume, seed=cfg.seed,
        )
    finally:
        writer.close()
    if not ctx.is_main:  # the test scores and every file are rank 0's
        return {"history": result["history"], "rank": ctx.rank}
    pair.eval()
    save_checkpoint(out_dir / "backbone.pt", pair.backbone, stage=section)
    test_task = make_skip_task(p, pair.backbone, test_images(splits), device, ladder)
    groups = test_groups(cfg, test_task.dataset, device)
    joint_time = sum(r["epoch_time_s"] for r in result["history"]) + result["refit_time_s"]
    metrics = {"policy_tag": tag, "lam": p.reward.lam, "epochs": cfg.finetune.epochs, "policy_steps": result["policy_steps"],
               "refit_heads": cfg.finetune.refit_heads, "refit_time_s": result["refit_time_s"]}
    if cfg.finetune.refresh_policy:
        # The jointly fine-tuned policy, for the record, then a fresh one on the fine-tuned backbone.
        metrics["test_before_refresh"] = evaluate_policy_on(model, test_task, p.env, extra_flops=policy_flops(model, test_task, p.env),
                                                            groups=groups)
        task, eval_task = training_tasks(cfg, pair.backbone, (train_images, eval_images), device, ladder)
        model, refresh = train_policy(p, task, out_dir / "refresh", eval_task, seed=cfg.seed, resume=resume,
                                      tb_dir=run_dir / "tb" / f"{section}_refresh")
        metrics["refresh_time_s"] = refresh["train_time_s"]
    save_atomic(model, out_dir / "policy.zip")  # model.policy is the fine-tuned (or refreshed) network itself
    if ladder is not None:
        save_ladder(out_dir, ladder)

    extra = policy_flops(model, test_task, p.env)
    test = evaluate_policy_on(model, test_task, p.env, extra_flops=extra, groups=groups)
    metrics.update({
        "joint_train_time_s": joint_time,
        # What the pair's backbone and policy took after the first policy: the comparison's budget.
        "train_time_s": joint_time + metrics.get("refresh_time_s", 0.0),
        "wall_time_s": time.perf_counter() - tic,
        "policy_flops": extra,
        "test": test,
        "history": result["history"],
        "batchnorm": "running statistics updated only by the rows each block runs on (the policy's routing)",
    })
    update_metrics(run_dir, section, metrics)
    print(
        f"{section}: test accuracy {test['accuracy']:.4f} using {test['blocks_used']:.2f} ± "
        f"{test['blocks_used_std']:.2f} of {test_task.num_blocks} blocks, FLOPs ratio {test['flops_ratio']:.3f}; "
        f"training {metrics['train_time_s']:.0f} s; pair saved in {out_dir}"
    )
    return metrics


def check_inputs(cfg: ExperimentConfig, tag: str) -> None:
    for path, stage in ((backbone_path(cfg.run_dir), "pretrain"), (policy_dir(cfg.run_dir, tag) / "policy.zip", "train_policy")):
        if not path.exists():
            raise ConfigError(f"{path} not found: run `python -m experiments.{stage}` with this config first")


def load_pair(cfg: ExperimentConfig, tag: str, device):
    """The run's backbone and policy ``tag``, checked to fit each other."""
    check_inputs(cfg, tag)
    backbone = load_backbone(cfg.run_dir, device)
    policy_file = policy_dir(cfg.run_dir, tag) / "policy.zip"
    return backbone, load_policy(policy_file, cfg.policy.algo, backbone, cfg.policy.env, backbone_path(cfg.run_dir), device)


def main(args) -> None:
    cfg = config_from_args(args)
    load_pair(cfg, args.tag, resolve_device(cfg.device))  # a bad backbone or policy fails before anything is written
    world = distributed.env_world_size()
    distributed.check_batch_divisible(cfg.finetune.batch_size, world, "finetune.batch_size")
    distributed.check_batch_divisible(cfg.finetune.policy_batch_size, world, "finetune.policy_batch_size")
    distributed.init_distributed(cfg.device)
    splits = load_splits(cfg.data)
    prepare_output_dir(finetune_dir(cfg.run_dir, args.tag), cfg, resume=args.resume, overwrite=args.overwrite)
    run_finetune(cfg, args.tag, resume=args.resume, splits=splits)


if __name__ == "__main__":
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--tag", default="policy", help="which trained policy of the run to fine-tune")
    cli(main, parser, distributed_ok=True)
