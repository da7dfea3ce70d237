"""The one supervised training / evaluation loop of dyndepth.

Used for backbone pretraining, for the static baselines (same recipe, other depth) and, through
``mask_sampler``, for training with stochastic depth or with masks chosen by a policy.
Checkpoints (written atomically) hold everything the run needs to continue: weights, optimiser,
schedule, RNG states, the running sums of a part-done epoch and the ``after_step`` hook's own
state. They are written at the end of every epoch, every ``checkpoint_every_s`` seconds inside
one, and when SIGINT/SIGTERM asks the run to stop (see ``backbone.training.interrupt``). The data order
and augmentation of epoch ``k`` / batch ``i`` are functions of ``(seed, k, i)``, so on the CPU a
run resumed with ``resume=True`` after a kill at any point ends bit-identical to one never
interrupted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from backbone.data.batching import BatchLoader
from backbone.data.datasets import ImageDataset
from backbone.errors import ConfigError, DyndepthError
from backbone.training.interrupt import Interrupted, deferred_stop, stop_requested
from backbone.models.resnet import CifarResNet
from backbone.models.weights import load_checkpoint, save_checkpoint

#: ``mask_sampler(images, labels, generator) -> keep_mask or None`` picks the blocks of a batch.
MaskSampler = Callable[[torch.Tensor, torch.Tensor, torch.Generator], "torch.Tensor | None"]
#: ``loss_fn(images, labels, keep_mask) -> (loss, logits)`` replaces the plain cross-entropy
#: (e.g. a differentiable-gate model adds its compute penalty).
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]
#: ``after_step(images, labels, keep_mask, logits)`` runs after each optimiser step (e.g. the
#: policy's own update in joint fine-tuning, which needs the backbone's predictions).
AfterStep = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], None]


@dataclass
class TrainConfig:
    """Recipe of one supervised training run (defaults: the CIFAR ResNet recipe of He et al.)."""

    epochs: int = 160
    batch_size: int = 128
    lr: float = 0.1  # for batch_size 128; scale it yourself for other sizes
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (per step) or "multistep" (per epoch)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1  # multistep decay factor
    warmup_epochs: float = 0.0  # linear warm-up from lr/10
    label_smoothing: float = 0.0
    augment: bool = True  # random crop (padding 4) + horizontal flip, on the device
    # Stochastic depth (Huang et al. 2016): per-sample block dropping while training, with drop
    # probability growing linearly from 0 to this value at the last block ("linear") or equal for
    # every block ("uniform"). Kept blocks are not rescaled, as in LayerDrop: a block then behaves
    # the same in training and at inference, where a policy drops blocks outright.
    stochastic_depth: float = 0.0
    stochastic_depth_schedule: str = "linear"
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # weights and activations in NHWC: faster convolutions on CPU and GPU
    compile: bool = False  # torch.compile the plain (unmasked) forward
    eval_batch_size: int = 512
    # Also checkpoint inside an epoch when this many seconds passed since the last save (0: only
    # at epoch ends), so a killed run loses at most this much of a long CPU epoch.
    checkpoint_every_s: float = 600.0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "epochs must be >= 0 (0: no training, e.g. evaluate imported weights)"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.checkpoint_every_s >= 0, "checkpoint_every_s must be >= 0 (0: only at epoch ends)"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.schedule in ("cosine", "multistep"), "schedule must be 'cosine' or 'multistep'"),
            (all(0 < m < 1 for m in self.milestones), "milestones are fractions of the epochs, in (0, 1)"),
            (0 < self.gamma <= 1, "gamma must be in (0, 1]"),
            (self.warmup_epochs >= 0 and (self.epochs == 0 or self.warmup_epochs < self.epochs), "warmup_epochs must be in [0, epochs)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.stochastic_depth < 1, "stochastic_depth (drop rate of the last block) must be in [0, 1)"),
            (self.stochastic_depth_schedule in ("linear", "uniform"), "stochastic_depth_schedule must be 'linear' or 'uniform'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device: cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of all random choices of one epoch (see the module docstring)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


def stochastic_depth_sampler(num_blocks: int, drop_last: float, schedule: str = "linear") -> MaskSampler:
    """Mask sampler for stochastic depth: block ``i`` kept with probability ``1 - d_i``."""
    if schedule == "linear":
        drop = [drop_last * (i + 1) / num_blocks for i in range(num_blocks)]
    else:
        drop = [drop_last] * num_blocks
    keep_prob = 1.0 - torch.tensor(drop)

    def sample(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(images.shape[0], num_blocks, generator=gen, device=gen.device)
        return u < keep_prob.to(u.device)

    return sample


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm parameters and biases (standard practice; it only hurts them).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Learning-rate factor per optimisation step: warm-up, then cosine or multistep."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    milestones = [int(m * cfg.epochs) * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.gamma ** sum(step >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def predict(
    model: CifarResNet,
    dataset: ImageDataset,
    batch_size: int = 512,
    keep_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: bool = True,
) -> torch.Tensor:
    """Logits (float32, CPU) of ``model`` on every image of ``dataset``, in order.

    ``keep_mask_fn(images) -> keep_mask`` chooses the blocks per batch (None: all blocks).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    loader = BatchLoader(dataset, batch_size, device=device, shuffle=False)
    for images, _ in loader.epoch_batches(0):
        keep_mask = keep_mask_fn(images) if keep_mask_fn is not None else None
        with _autocast(device, amp):
            outputs.append(model(images, keep_mask).float().cpu())
    model.train(was_training)
    if not outputs:
        return torch.empty(0, model.num_classes)
    return torch.cat(outputs)


def evaluate(
    model: CifarResNet,
    dataset: ImageDataset,
    batch_size: int = 512,
    keep_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset``."""
    return scores(predict(model, dataset, batch_size, keep_mask_fn), dataset.labels)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``logits`` against ``labels``."""
    return {
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "num_images": len(labels),
    }


class NonFiniteLossError(DyndepthError):
    """Training produced a NaN or infinite loss."""


def train(
    model: CifarResNet,
    train_set: ImageDataset,
    val_set: ImageDataset | None,
    cfg: TrainConfig,
    checkpoint_dir: Path | None = None,
    writer=None,
    resume: bool = False,
    mask_sampler: MaskSampler | None = None,
    loss_fn: LossFn | None = None,
    after_step: AfterStep | None = None,
    seed: int = 0,
    desc: str = "train",
) -> dict:
    """Train ``model`` (already on its device) with ``cfg``; return the training history.

    ``checkpoint_dir``: where ``last.pt`` (every epoch) and ``best.pt`` (best validation accuracy)
    go; with ``resume`` training continues from ``last.pt``. ``writer``: a TensorBoard
    ``SummaryWriter`` or None. ``mask_sampler`` overrides ``cfg.stochastic_depth``; ``loss_fn`` and
    ``after_step`` see the module docstring's types. ``model`` may be any module with ``num_blocks``,
    ``num_classes`` and ``arch`` whose ``forward(images, keep_mask)`` returns logits.
    """
    device = next(model.parameters()).device
    if mask_sampler is None and cfg.stochastic_depth > 0:
        mask_sampler = stochastic_depth_sampler(model.num_blocks, cfg.stochastic_depth, cfg.stochastic_depth_schedule)
    # channels_last trains a CIFAR ResNet 1.3x faster on these CPUs too (benchmark) and on GPUs;
    # the model's stem puts its input into the layout of its weights.
    model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    loader = BatchLoader(
        train_set, cfg.batch_size, device=device, shuffle=True, seed=seed, augment=cfg.augment, drop_last=True
    )
    if len(loader) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_set)} training images")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    forward = torch.compile(model) if cfg.compile else model

    history: list[dict] = []
    start_epoch, start_batch, best_accuracy, partial = 0, 0, -1.0, None
    last_path = best_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
        if resume and last_path.exists():
            state = load_checkpoint(last_path)
            # Our own checkpoint of this very run: a plain state-dict load (model may be a wrapper).
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_accuracy, history = state["epoch"], state["best_accuracy"], state["history"]
            start_batch, partial = state.get("batch", 0), state.get("partial")
            _restore_rng(state.get("rng"), device)
            if hasattr(after_step, "load_state_dict") and "after_step" in state:
                after_step.load_state_dict(state["after_step"])

    def save_last(epoch_done: int, batch_done: int, sums: dict | None = None) -> None:
        """``last.pt`` after ``epoch_done`` whole epochs and ``batch_done`` batches of the next."""
        extra = {"epoch": epoch_done, "batch": batch_done, "best_accuracy": best_accuracy, "history": history,
                 "rng": _rng_state(device)}
        if sums is not None:
            extra["partial"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in sums.items()}
        if hasattr(after_step, "state_dict"):
            extra["after_step"] = after_step.state_dict()
        save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), **extra)

    step = start_epoch * len(loader) + start_batch
    last_save = time.monotonic()
    with deferred_stop():
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            gen = epoch_generator(seed, epoch, device)
            first = start_batch if epoch == start_epoch else 0
            if first and partial is not None:  # resumed in the middle of this epoch
                gen.set_state(partial.pop("mask_rng"))
                sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in partial.items()}
            else:
                zero = torch.zeros((), device=device)
                sums = {"loss_sum": zero, "correct_sum": zero.clone(), "seen": 0, "time_s": 0.0}
            tic = time.perf_counter()
            bar = tqdm(loader.epoch_batches(epoch, first), total=len(loader), initial=first,
                       desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False)
            for batch, (images, labels) in enumerate(bar, start=first):
                keep_mask = mask_sampler(images, labels, gen) if mask_sampler is not None else None
                with _autocast(device, cfg.amp):
                    if loss_fn is not None:
                        loss, logits = loss_fn(images, labels, keep_mask)
                    else:
                        logits = forward(images) if keep_mask is None else model(images, keep_mask)
                        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if after_step is not None:
                    after_step(images, labels, keep_mask, logits.detach())
                step += 1
                # Accumulate on the device: no host sync per step.
                sums["loss_sum"] = sums["loss_sum"] + loss.detach() * labels.shape[0]
                sums["correct_sum"] = sums["correct_sum"] + (logits.argmax(1) == labels).sum()
                sums["seen"] += labels.shape[0]
                signal_name = stop_requested()
                overdue = cfg.checkpoint_every_s > 0 and time.monotonic() - last_save > cfg.checkpoint_every_s
                if last_path is not None and (signal_name or overdue):
                    if not torch.isfinite(sums["loss_sum"]):  # never save diverged weights over good ones
                        raise NonFiniteLossError(_diverged(epoch, step, last_path))
                    now = time.perf_counter()
                    sums["time_s"] += now - tic
                    tic = now
                    save_last(epoch, batch + 1, {**sums, "mask_rng": gen.get_state()})
                    last_save = time.monotonic()
                if signal_name:
                    where = f"epoch {epoch + 1}, batch {batch + 1}/{len(loader)}"
                    if last_path is None:
                        raise Interrupted(f"{signal_name}: stopped at {where} (no checkpoint directory)")
                    raise Interrupted(f"{signal_name}: stopped at {where}; saved {last_path}: rerun with --resume")
            bar.close()
            epoch_time = sums["time_s"] + time.perf_counter() - tic
            seen = sums["seen"]
            train_loss = sums["loss_sum"].item() / seen
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(_diverged(epoch, step, last_path))
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": sums["correct_sum"].item() / seen,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen / epoch_time,
                "epoch_time_s": epoch_time,
            }
            if val_set is not None and len(val_set) > 0:
                val = evaluate(model, val_set, cfg.eval_batch_size)
                record.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
            history.append(record)
            _log_epoch(writer, record, step)
            tqdm.write(_format_record(desc, record))

            accuracy = record.get("val_accuracy", record["train_accuracy"])
            is_best = accuracy > best_accuracy
            best_accuracy = max(best_accuracy, accuracy)
            if last_path is not None:
                # best.pt first: last.pt records the best accuracy, so a kill between the two
                # must not leave a last.pt that believes a best.pt was written.
                if is_best:
                    save_checkpoint(best_path, model, epoch=epoch + 1, best_accuracy=best_accuracy, history=history)
                save_last(epoch + 1, 0)
                last_save = time.monotonic()
    return {"history": history, "best_accuracy": best_accuracy, "epochs": cfg.epochs}


def _diverged(epoch: int, step: int, last_path: Path | None) -> str:
    # The loss is summed on the device (no sync per step), so the step is where it was noticed.
    kept = (f"the last good checkpoint ({last_path}) is kept" if last_path is not None and last_path.exists()
            else "no checkpoint was written yet")
    return f"non-finite training loss in epoch {epoch + 1} (noticed at step {step}); {kept}. Lower the learning rate."


def _rng_state(device: torch.device) -> dict:
    # The global RNGs matter too: SB3 samples a policy's masks from them (joint fine-tuning).
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict | None, device: torch.device) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _log_epoch(writer, record: dict, step: int) -> None:
    if writer is None:
        return
    writer.add_scalar("losses/train_loss", record["train_loss"], step)
    writer.add_scalar("charts/train_accuracy", record["train_accuracy"], step)
    writer.add_scalar("charts/learning_rate", record["lr"], step)
    writer.add_scalar("charts/images_per_s", record["images_per_s"], step)
    if "val_accuracy" in record:
        writer.add_scalar("losses/val_loss", record["val_loss"], step)
        writer.add_scalar("charts/val_accuracy", record["val_accuracy"], step)
    writer.flush()


def _format_record(desc: str, record: dict) -> str:
    text = (
        f"{desc} epoch {record['epoch']}: loss {record['train_loss']:.3f} "
        f"train acc {record['train_accuracy']:.3f}"
    )
    if "val_accuracy" in record:
        text += f" val acc {record['val_accuracy']:.3f}"
    return text + f" ({record['images_per_s']:.0f} img/s)"
