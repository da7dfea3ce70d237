"""Train a block-skipping policy: ``python -m experiments.train_policy --config FILE [--set k=v …]``.

Needs the backbone of a finished pretrain stage in ``runs/<name>/backbone.pt`` (or
``model.init_checkpoint``). Writes ``runs/<name>/<tag>/`` (``--tag``, default ``policy``):
``config.yaml``, ``policy.zip`` (SB3), ``checkpoints/last.zip`` + ``progress.json`` (resume),
TensorBoard logs in ``runs/<name>/tb/<tag>/`` and the ``<tag>`` section of ``metrics.json``.
Several tags (e.g. one per λ) share one backbone.

The env holds its images in memory: for streamed data (``ImageFiles``) the policy's images (at
most ``data.max_policy_images``) and the test split are decoded once into memory
(``backbone.data.streaming.in_memory``); the backbone's own test accuracy streams.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from agents.adaptivity import difficulty_groups
from agents.callbacks import save_atomic
from agents.evaluation import evaluate_policy_on
from agents.rl import make_skip_task, train_policy
from backbone.baselines import mask_string, subset_ladder
from backbone.data.datasets import ImageDataset, Splits, load_splits, split_train_val
from backbone.data.streaming import in_memory
from backbone.errors import ConfigError
from backbone.models.resnet import SkippableResNet
from backbone.training.loop import evaluate, resolve_device
from envs.block_skip import SkipTask
from experiments.common import cli, config_from_args, experiment_parser, finished_stage, prepare_output_dir, update_metrics, write_json
from experiments.config import ExperimentConfig
from experiments.pretrain import backbone_path, build_backbone, load_backbone


def policy_dir(run_dir: Path, tag: str = "policy") -> Path:
    return run_dir / tag


LADDER_FILE = "ladder.json"


def save_ladder(directory: Path, masks: torch.Tensor) -> None:
    """The candidate masks of a ladder policy, beside its policy.zip ("1" = block run)."""
    write_json(directory / LADDER_FILE, {"masks": [mask_string(m) for m in masks]})


def load_ladder(directory: Path) -> torch.Tensor | None:
    """The ladder saved in ``directory``, or None when its policy decides keep bits."""
    path = directory / LADDER_FILE
    if not path.exists():
        return None
    try:
        masks = json.loads(path.read_text())["masks"]
        return torch.tensor([[c == "1" for c in m] for m in masks], dtype=torch.bool)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a ladder file (expected {{\"masks\": [\"1101...\", ...]}}): {err}") from None


def test_groups(cfg: ExperimentConfig, test_images: ImageDataset, device) -> tuple[torch.Tensor, list[str], str]:
    """Difficulty groups of the test images, from the run's pretrained backbone: every policy
    and fine-tuned pair of the run is reported on the same groups."""
    return difficulty_groups(load_backbone(cfg.run_dir, device).eval(), test_images)


def find_backbone(cfg: ExperimentConfig, splits: Splits, device: torch.device) -> SkippableResNet:
    """The run's pretrained backbone, else the imported ``model.init_checkpoint`` or ``model.weights``."""
    if backbone_path(cfg.run_dir).exists():
        return load_backbone(cfg.run_dir, device)
    if cfg.model.init_checkpoint or cfg.model.weights:
        return build_backbone(cfg, splits.train.num_classes).to(device)
    raise ConfigError(
        f"no backbone in {cfg.run_dir}: run `python -m experiments.pretrain` with this config first, "
        f"or set model.init_checkpoint to import one"
    )


def policy_images(cfg: ExperimentConfig, splits: Splits) -> tuple[ImageDataset, ImageDataset]:
    """(training, held-out evaluation) images of the policy, in memory.

    The policy learns on ``policy.data_split`` (by default the validation part the backbone never
    trained on: on its own training images a backbone is nearly always right, and a policy
    trained there learns to drop everything), at most ``data.max_policy_images`` of them (a
    stratified subset), decoded into memory if they are streamed.
    """
    images = splits.val if cfg.policy.data_split == "val" else splits.train
    if len(images) == 0:
        raise ConfigError("the policy has no images: set data.val_fraction > 0, or policy.data_split: train")
    images = in_memory(images, cfg.data.max_policy_images, cfg.data.split_seed + 2)
    return split_train_val(images, cfg.policy.eval_fraction, cfg.data.split_seed + 1)


def test_images(splits: Splits) -> ImageDataset:
    """The test split in memory (decoded once if streamed; ``data.max_test_images`` caps it), for
    the per-image evaluation of policies: the same images the other methods are scored on."""
    return in_memory(splits.test)


def policy_tasks(cfg: ExperimentConfig, backbone: SkippableResNet, splits: Splits, device,
                 ladder: torch.Tensor | None = None) -> tuple[SkipTask, SkipTask | None, SkipTask]:
    """(training, held-out evaluation, test) tasks sharing one backbone."""
    task, eval_task = training_tasks(cfg, backbone, policy_images(cfg, splits), device, ladder)
    return task, eval_task, make_skip_task(cfg.policy, backbone, test_images(splits), device, ladder)


def training_tasks(cfg: ExperimentConfig, backbone: SkippableResNet, images: tuple[ImageDataset, ImageDataset], device,
                   ladder: torch.Tensor | None = None) -> tuple[SkipTask, SkipTask | None]:
    """(training, held-out evaluation) tasks on ``images`` (``policy_images``), sharing one backbone."""
    train_images, eval_images = images
    task = make_skip_task(cfg.policy, backbone, train_images, device, ladder)
    return task, make_skip_task(cfg.policy, backbone, eval_images, device, ladder) if len(eval_images) else None


def run_ladder(cfg: ExperimentConfig, backbone, splits: Splits, nested: bool = False) -> dict:
    """The fixed-subset ladder of the run's backbone: the best subset of every size k = 0..L on
    the policy's training images (held out from the backbone; exhaustive where 2^L <= 4,096,
    else beam search; ``nested``: greedy elimination). Computed once and kept in
    ``runs/<name>/ladder[_nested].json``: the comparison's fixed subsets and a ladder policy's
    candidate masks are the same. Returns {"masks": (L+1, L) bool, "held_out_accuracy",
    "flops", "search", "search_s", "images"}."""
    path = cfg.run_dir / ("ladder_nested.json" if nested else "ladder.json")
    if path.exists():
        saved = json.loads(path.read_text())
        if len(saved["masks"][0]) == backbone.num_blocks:
            return {**saved, "masks": torch.tensor([[c == "1" for c in m] for m in saved["masks"]], dtype=torch.bool)}
    images = policy_images(cfg, splits)[0]
    if cfg.study.search_images is not None and cfg.study.search_images < len(images):  # deep nets: beam search is slow
        images = split_train_val(images, cfg.study.search_images / len(images), cfg.data.split_seed + 2)[1]
    tic = time.perf_counter()
    ladder = subset_ladder(backbone.eval(), images, nested=nested)
    ladder.update(search_s=time.perf_counter() - tic, images=len(images))
    write_json(path, {**ladder, "masks": [mask_string(m) for m in ladder["masks"]]})
    return ladder


def policy_ladder(cfg: ExperimentConfig, backbone, splits: Splits, out_dir: Path) -> torch.Tensor | None:
    """For ``policy.action: ladder``: the run's ladder (``run_ladder``), its rungs of at least
    ``policy.ladder_min_blocks`` blocks, also saved beside the policy."""
    if cfg.policy.env != "oneshot" or cfg.policy.action != "ladder":
        return None
    masks = run_ladder(cfg, backbone, splits, nested=cfg.policy.ladder_search == "nested")["masks"]
    masks = masks[masks.sum(1) >= cfg.policy.ladder_min_blocks]
    if len(masks) < 2:
        raise ConfigError(f"policy.ladder_min_blocks {cfg.policy.ladder_min_blocks} leaves {len(masks)} rung(s) of the "
                          f"{backbone.num_blocks}-block backbone's ladder: a policy needs at least two to choose from")
    save_ladder(out_dir, masks)
    return masks


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
    ladder = policy_ladder(cfg, backbone, splits, out_dir)
    task, eval_task, test_task = policy_tasks(cfg, backbone, splits, device, ladder)
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
    groups = difficulty_groups(backbone.eval(), test_task.dataset)
    test = evaluate_policy_on(model, test_task, p.env, extra_flops=progress["policy_flops"], groups=groups)
    full = evaluate(backbone, splits.test)
    metrics = {
        "tag": tag,
        "algo": p.algo,
        "env": p.env,
        "observation": p.observation if p.env == "oneshot" else "activation statistics",
        "action": p.action if p.env == "oneshot" else "run or skip, per block",
        "ladder": None if ladder is None else [mask_string(m) for m in ladder],
        "reward": dataclasses.asdict(p.reward),
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
