"""What a supervised run is made of, apart from the loop itself: its config, the device, the
optimiser and learning-rate schedule, stochastic depth, mixed precision and determinism."""

from __future__ import annotations

import copy
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.errors import ConfigError

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
    batch_size: int = 128  # the global batch: under torchrun each of N processes takes batch_size / N
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
    # Knowledge distillation from the model as it starts this run, all blocks kept (Hinton et al.
    # 2015; slimmable networks' in-place distillation): this weight times T² · KL(teacher ‖ model)
    # at temperature ``distill_temperature`` is added to the loss. For fine-tuning a trained
    # backbone on masks (joint, fixed subsets, random dropping, gates): every path learns from the
    # full network's soft predictions, not only from the labels. 0: off.
    distill: float = 0.0
    distill_temperature: float = 4.0
    amp: bool = True  # CUDA only: bf16 autocast, or fp16 with a GradScaler on GPUs without bf16
    # Weights and activations in NHWC while training: true / false, or null: chosen per model
    # (``training_memory_format``).
    channels_last: typing.Optional[bool] = None
    compile: bool = False  # torch.compile: the whole model, or its blocks when masks are used
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
            (self.distill >= 0 and self.distill_temperature > 0, "distill must be >= 0 and distill_temperature > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def backbone_of(model: nn.Module) -> nn.Module:
    """The skippable network inside a policy pair or a gated network (``model.backbone``), else ``model``."""
    return getattr(model, "backbone", model)


#: The narrowest convolution (output channels) that trains faster in channels-last on CPUs.
CHANNELS_LAST_MIN_WIDTH = 16


def training_memory_format(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The layout ``model`` trains in: ``cfg.channels_last`` where set; else channels-last on CUDA,
    and on CPUs when the backbone's narrowest convolution has at least ``CHANNELS_LAST_MIN_WIDTH``
    output channels. Measured on a Xeon with AVX-512 (one process, SGD steps, docs/results.md):
    channels-last trains CIFAR ResNets of width 16 1.16-1.19x faster than NCHW, but width 8
    1.27x and width 7 1.9x slower (oneDNN's NHWC kernels want channel counts that fill a vector),
    which the quickstart's width-8 backbone and its width-7 static network pay in every epoch."""
    if cfg.channels_last is not None:
        return torch.channels_last if cfg.channels_last else torch.contiguous_format
    convs = [m.out_channels for m in backbone_of(model).modules() if isinstance(m, nn.Conv2d)]
    wide = device.type == "cuda" or (bool(convs) and min(convs) >= CHANNELS_LAST_MIN_WIDTH)
    return torch.channels_last if wide else torch.contiguous_format


def distillation_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``backbone_of(model)`` in eval mode: the teacher of ``TrainConfig.distill``,
    run without a mask."""
    teacher = copy.deepcopy(backbone_of(model)).eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(logits / T)), mean over the batch (T² keeps the
    gradient's scale independent of T)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                    reduction="batchmean", log_target=True) * t * t


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


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the random choices of one epoch's steps (stochastic-depth masks).

    ``train`` keeps it on the CPU on every device: masks drawn on the host need no copy back
    from the GPU in the masked forward (no sync per step), and are the same on every device.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


def stochastic_depth_sampler(
    num_blocks: int, drop_last: float, schedule: str = "linear", rank: int = 0, world_size: int = 1
) -> MaskSampler:
    """Mask sampler for stochastic depth: block ``i`` kept with probability ``1 - d_i``.

    ``rank``, ``world_size``: data-parallel training; the draws are made for the global batch
    (``world_size`` times the rows given) and this rank keeps its rows, so the masks of all ranks
    together are those of one process.
    """
    if schedule == "linear":
        drop = [drop_last * (i + 1) / num_blocks for i in range(num_blocks)]
    else:
        drop = [drop_last] * num_blocks
    keep_prob = 1.0 - torch.tensor(drop)

    def sample(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rows = images.shape[0]
        u = torch.rand(rows * world_size, num_blocks, generator=gen, device=gen.device)
        return (u < keep_prob.to(u.device))[rank * rows : (rank + 1) * rows]

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


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``: bf16 on GPUs that run it natively, fp16 on
    older ones (training then scales the loss, see :func:`grad_scaler`); None: no autocast (CPU)."""
    if not enabled or device.type != "cuda":
        return None
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch releases without the argument report native support only
        native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    dtype = amp_dtype(device, enabled)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler for fp16 autocast (fp16 gradients underflow without one); disabled, it is a
    pass-through, so bf16, fp32 and CPU runs take the same code path unchanged."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, enabled) == torch.float16)


def use_deterministic_training() -> None:
    """Deterministic kernels where torch has them, so that a CUDA run repeats bit for bit on the
    same GPU and software (``DYNDEPTH_DETERMINISTIC=1`` makes ``train`` call this).

    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it starts, so call this before the first CUDA
    matmul. Ops without a deterministic kernel warn (``warn_only``) rather than fail: such a
    run then repeats only to a tolerance. CPU runs are deterministic already.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
