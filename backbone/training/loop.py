"""The one supervised training / evaluation loop of dyndepth.

Used for backbone pretraining, for the static baselines (same recipe, other depth) and, through
``mask_sampler``, for training with stochastic depth or with masks chosen by a policy.
Checkpoints (written atomically) hold everything the run needs to continue: weights, optimiser,
schedule, RNG states, the running sums of a part-done epoch and the ``after_step`` hook's own
state. They are written at the end of every epoch, every ``checkpoint_every_s`` seconds inside
one, and when SIGINT/SIGTERM asks the run to stop (see ``backbone.training.interrupt``). The data order
and augmentation of epoch ``k`` / batch ``i`` are functions of ``(seed, k, i)``, so on the CPU a
run resumed with ``resume=True`` after a kill at any point ends bit-identical to one never
interrupted. On CUDA the same holds with ``DYNDEPTH_DETERMINISTIC=1`` (deterministic kernels, see
``recipe.use_deterministic_training``); without it, to float tolerance.

Under ``torchrun`` (``backbone.training.distributed``) the same loop trains data-parallel: each
rank its share of every global batch, gradients averaged, rank 0 writing, every rank stopping,
checkpointing and noticing a diverged loss at the same step, validation sharded.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from backbone.data.datasets import ImageDataset
from backbone.data.streaming import ImageFiles, make_loader
from backbone.errors import ConfigError, DyndepthError
from backbone.models.masked import call_block, memory_format_of
from backbone.models.resnet import CifarResNet
from backbone.models.weights import load_checkpoint, save_checkpoint
from backbone.training import distributed
from backbone.training.distributed import DistContext
from backbone.training.evaluation import evaluate, predict, scores  # noqa: F401  (re-exported)
from backbone.training.interrupt import Interrupted, deferred_stop, stop_requested
from backbone.training.recipe import (  # noqa: F401  (re-exported: the loop's public names)
    AfterStep,
    LossFn,
    MaskSampler,
    TrainConfig,
    amp_dtype,
    autocast,
    backbone_of,
    build_optimizer,
    build_scheduler,
    distillation_loss,
    distillation_teacher,
    epoch_generator,
    grad_scaler,
    resolve_device,
    stochastic_depth_sampler,
    training_memory_format,
    use_deterministic_training,
)

class NonFiniteLossError(DyndepthError):
    """Training produced a NaN or infinite loss."""


def train(
    model: CifarResNet,
    train_set: ImageDataset | ImageFiles,
    val_set: ImageDataset | ImageFiles | None,
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
    ``num_classes`` and ``arch`` whose ``forward(images, keep_mask)`` returns logits. Either kind
    of split works: in memory (batches cut on the device) or ``ImageFiles`` streamed by workers.

    Under torchrun every rank calls this with the same arguments: ``cfg.batch_size`` is the
    global batch, ``mask_sampler`` sees this rank's rows (a sampler that draws from ``gen`` should
    draw for the global batch and keep its rows, as ``stochastic_depth_sampler`` does), ``after_step``
    runs on every rank, and only rank 0 writes checkpoints and to ``writer``.
    """
    ctx = distributed.current()
    device = next(model.parameters()).device
    if os.environ.get("DYNDEPTH_DETERMINISTIC") == "1":
        use_deterministic_training()
    if ctx.enabled:
        distributed.check_batch_divisible(cfg.batch_size, ctx.world_size, "batch_size")
        writer = writer if ctx.is_main else None
    if mask_sampler is None and cfg.stochastic_depth > 0:
        mask_sampler = stochastic_depth_sampler(model.num_blocks, cfg.stochastic_depth, cfg.stochastic_depth_schedule,
                                                ctx.rank, ctx.world_size)
    # The model's stem puts its input into the layout of its weights; after training the model
    # goes back to the layout it came in (models are built channels-last, the inference layout).
    original_format = next((memory_format_of(p) for p in backbone_of(model).parameters() if p.dim() == 4),
                           torch.contiguous_format)
    model.to(memory_format=training_memory_format(model, cfg, device))
    loader = make_loader(train_set, cfg.batch_size, device=device, shuffle=True, seed=seed, augment=cfg.augment,
                         drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
    if len(loader) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_set)} training images")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    scaler = grad_scaler(device, cfg.amp)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    forward, uncompile = _compile_for_training(model, cfg, masked=mask_sampler is not None or loss_fn is not None)
    # Built before a resume loads the checkpoint: the teacher is the model this run started from.
    teacher = distillation_teacher(model) if cfg.distill > 0 else None

    history: list[dict] = []
    start_epoch, start_batch, best_accuracy, partial = 0, 0, -1.0, None
    last_path = best_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
        if resume and last_path.exists():  # every rank loads the same file
            state = load_checkpoint(last_path)
            # Our own checkpoint of this very run: a plain state-dict load (model may be a wrapper).
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "grad_scaler" in state:
                scaler.load_state_dict(state["grad_scaler"])
            start_epoch, best_accuracy, history = state["epoch"], state["best_accuracy"], state["history"]
            start_batch, partial = state.get("batch", 0), state.get("partial")
            _restore_rng(state.get("rng"), device)
            if hasattr(after_step, "load_state_dict") and "after_step" in state:
                after_step.load_state_dict(state["after_step"])
    distributed.broadcast_module(model)  # one starting point, however each rank built its model
    if teacher is not None:
        distributed.broadcast_module(teacher)

    def save_last(epoch_done: int, batch_done: int, sums: dict | None = None) -> None:
        """``last.pt`` after ``epoch_done`` whole epochs and ``batch_done`` batches of the next."""
        extra = {"epoch": epoch_done, "batch": batch_done, "best_accuracy": best_accuracy, "history": history,
                 "rng": _rng_state(device)}
        if sums is not None:
            extra["partial"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in sums.items()}
        if hasattr(after_step, "state_dict"):
            extra["after_step"] = after_step.state_dict()
        if scaler.is_enabled():
            extra["grad_scaler"] = scaler.state_dict()
        save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), **extra)

    def overdue() -> bool:
        return cfg.checkpoint_every_s > 0 and time.monotonic() - last_save > cfg.checkpoint_every_s

    step = start_epoch * len(loader) + start_batch
    last_save = time.monotonic()
    try:
        with deferred_stop():
            for epoch in range(start_epoch, cfg.epochs):
                model.train()
                gen = epoch_generator(seed, epoch, "cpu")
                first = start_batch if epoch == start_epoch else 0
                sums = _zero_sums(device)
                if first and partial is not None:  # resumed in the middle of this epoch
                    gen.set_state(partial.pop("mask_rng"))
                    if ctx.is_main:  # the saved sums are those of all ranks together
                        sums = {k: v.to(device) if torch.is_tensor(v) else v for k, v in partial.items()}
                tic = time.perf_counter()
                bar = tqdm(loader.epoch_batches(epoch, first), total=len(loader), initial=first,
                           desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, disable=not ctx.is_main)
                for batch, (images, labels) in enumerate(bar, start=first):
                    keep_mask = mask_sampler(images, labels, gen) if mask_sampler is not None else None
                    with autocast(device, cfg.amp):
                        if loss_fn is not None:
                            loss, logits = loss_fn(images, labels, keep_mask)
                        else:
                            logits = forward(images) if keep_mask is None else model(images, keep_mask)
                            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(images)
                            loss = loss + cfg.distill * distillation_loss(logits, teacher_logits, cfg.distill_temperature)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if ctx.enabled:  # one host message a step: stop?, checkpoint due?, which parameters got gradients
                        flags = distributed.all_reduce_flags(
                            [_signal_code(stop_requested()), int(overdue()), *(int(p.grad is not None) for p in params)])
                        distributed.average_gradients(params, flags[2:])
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    if after_step is not None:
                        after_step(images, labels, keep_mask, logits.detach())
                    step += 1
                    # Accumulate on the device: no host sync per step.
                    sums["loss_sum"] = sums["loss_sum"] + loss.detach() * labels.shape[0]
                    sums["correct_sum"] = sums["correct_sum"] + (logits.argmax(1) == labels).sum()
                    sums["seen"] += labels.shape[0]
                    if ctx.enabled:
                        signal_name, due = _signal_name(flags[0]), bool(flags[1])
                    else:
                        signal_name, due = stop_requested(), overdue()
                    if last_path is not None and (signal_name or due):
                        now = time.perf_counter()
                        sums["time_s"] += now - tic
                        tic = now
                        totals = _global_sums(sums, ctx)
                        if not torch.isfinite(totals["loss_sum"]):  # never save diverged weights over good ones
                            raise NonFiniteLossError(_diverged(epoch, step, last_path))
                        if ctx.is_main:
                            save_last(epoch, batch + 1, {**totals, "mask_rng": gen.get_state()})
                        distributed.barrier()  # no rank may exit on a stop while rank 0 still writes
                        last_save = time.monotonic()
                    if signal_name:
                        where = f"epoch {epoch + 1}, batch {batch + 1}/{len(loader)}"
                        if last_path is None:
                            raise Interrupted(f"{signal_name}: stopped at {where} (no checkpoint directory)")
                        raise Interrupted(f"{signal_name}: stopped at {where}; saved {last_path}: rerun with --resume")
                bar.close()
                epoch_time = sums["time_s"] + time.perf_counter() - tic
                totals = _global_sums(sums, ctx)
                seen = totals["seen"]
                train_loss = totals["loss_sum"].item() / seen
                if not math.isfinite(train_loss):
                    raise NonFiniteLossError(_diverged(epoch, step, last_path))
                record = {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "train_accuracy": totals["correct_sum"].item() / seen,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": seen / epoch_time,  # of all ranks together
                    "epoch_time_s": epoch_time,
                }
                if val_set is not None and len(val_set) > 0:
                    val = _validate(model, val_set, cfg, ctx)
                    record.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
                history.append(record)
                if ctx.is_main:
                    _log_epoch(writer, record, step)
                    # stderr, like the progress bars: stdout carries a command's result (--json)
                    tqdm.write(_format_record(desc, record), file=sys.stderr)

                accuracy = record.get("val_accuracy", record["train_accuracy"])
                is_best = accuracy > best_accuracy
                best_accuracy = max(best_accuracy, accuracy)
                if last_path is not None and ctx.is_main:
                    # best.pt first: last.pt records the best accuracy, so a kill between the two
                    # must not leave a last.pt that believes a best.pt was written.
                    if is_best:
                        save_checkpoint(best_path, model, epoch=epoch + 1, best_accuracy=best_accuracy, history=history)
                    save_last(epoch + 1, 0)
                last_save = time.monotonic()
    finally:
        uncompile()
        model.to(memory_format=original_format)
    distributed.check_same_on_all_ranks(model, "the trained weights")  # one gradient average per step keeps them equal
    return {"history": history, "best_accuracy": best_accuracy, "epochs": cfg.epochs}


def _compile_for_training(model: nn.Module, cfg: TrainConfig, masked: bool) -> tuple[Callable, Callable[[], None]]:
    """The forward of unmasked steps, and what undoes the compilation after training.

    Unmasked: the whole model through ``torch.compile``. Masked steps (stochastic depth, policy
    masks, a ``loss_fn``) call the model itself, so its blocks are compiled instead
    (``compile_blocks``): the masked forward sends a different number of rows through each block,
    which one whole-model graph cannot follow.
    """
    if not cfg.compile:
        return model, lambda: None
    if not masked:
        return torch.compile(model), lambda: None
    target = model if hasattr(model, "compile_blocks") else getattr(model, "backbone", None)
    if not hasattr(target, "compile_blocks"):
        warnings.warn(f"compile: {type(model).__name__} has no compile_blocks; its masked forward runs eagerly")
        return model, lambda: None
    if target._call_block is not call_block:  # the caller compiled them already: keep theirs
        return model, lambda: None
    target.compile_blocks()
    return model, lambda: target.compile_blocks(False)


def _zero_sums(device: torch.device) -> dict:
    zero = torch.zeros((), device=device)
    return {"loss_sum": zero, "correct_sum": zero.clone(), "seen": 0, "time_s": 0.0}


def _global_sums(sums: dict, ctx: DistContext) -> dict:
    """The running sums of all ranks together (this rank's wall time); ``sums`` alone in one process."""
    if not ctx.enabled:
        return sums
    loss_sum, correct_sum = sums["loss_sum"], sums["correct_sum"]
    totals = torch.stack([loss_sum.double(), correct_sum.double(), torch.tensor(float(sums["seen"]), device=loss_sum.device, dtype=torch.float64)])
    distributed.all_reduce_sum(totals)
    return {"loss_sum": totals[0].to(loss_sum.dtype), "correct_sum": totals[1].to(correct_sum.dtype),
            "seen": int(totals[2].item()), "time_s": sums["time_s"]}


def _validate(model: nn.Module, val_set: ImageDataset | ImageFiles, cfg: TrainConfig, ctx: DistContext) -> dict:
    """Validation accuracy and loss; under torchrun each rank scores its share of ``val_set`` with
    rank 0's BatchNorm statistics (those of the checkpoint), and the sums are all-reduced."""
    if not ctx.enabled:
        return evaluate(model, val_set, cfg.eval_batch_size)
    distributed.broadcast_module(model, parameters=False)
    lo, hi = (len(val_set) * r // ctx.world_size for r in (ctx.rank, ctx.rank + 1))
    part = val_set.subset(range(lo, hi))
    logits = predict(model, part, cfg.eval_batch_size)
    loss = F.cross_entropy(logits, part.labels, reduction="sum").item() if hi > lo else 0.0
    totals = torch.tensor([loss, (logits.argmax(1) == part.labels).sum().item(), hi - lo], dtype=torch.float64)
    loss, correct, count = distributed.all_reduce_sum(totals, host=True).tolist()
    return {"accuracy": correct / count, "loss": loss / count, "num_images": int(count)}


def _signal_code(name: str | None) -> int:
    return signal.Signals[name].value if name else 0


def _signal_name(code: int) -> str | None:
    return signal.Signals(code).name if code else None


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
