"""Differentiable-gate baseline: a tiny gate per residual block, trained with the backbone by SGD.

Gate ``i`` looks at the global-average-pooled input of block ``i`` and outputs a logit; the block
runs iff ``sigmoid(logit) > 0.5``. The hard decision has no gradient, so training uses a
straight-through estimator ``g_st = g + p - p.detach()`` (optionally Gumbel-sigmoid noise on the
logit) and minimises ``CE + λ · mean_batch(Σ_i g_st_i)``: λ per executed block, the same price as
the RL reward ``correct − λ·blocks_used``. With ``target`` set it minimises instead
``CE + w · (mean_batch(FLOPs(g_st)) / full − target)²``, a FLOPs-budget loss in the spirit of
ConvNet-AIG's target-rate loss, but over the whole network (each block weighted by its FLOPs),
so the gates decide where to spend and can be put at any operating point.

Training runs every block densely (``block(h, gate=g_st)``) so that every gate gets a gradient;
evaluation really skips (``run_block_masked`` on the rows whose gate is open).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.models.cost import count_flops, measure_backbone_cost
from backbone.data.datasets import ImageDataset
from backbone.data.streaming import ImageFiles, image_size_of, make_loader
from backbone.errors import ConfigError
from backbone.models.masked import check_keep_mask, run_block_masked
from backbone.models.resnet import BackboneWrapper, SkippableResNet
from backbone.training.loop import TrainConfig, train
from backbone.models.weights import load_checkpoint, model_from_arch

ESTIMATORS = ("straight_through", "gumbel")


@dataclass
class GateConfig:
    """The gates and their compute penalty.

    ``lam``: loss per executed block (as λ in the RL reward). ``estimator``: "straight_through"
    (deterministic hard gate) or "gumbel" (logistic noise with ``temperature`` while training).
    ``hidden``: width of each gate's MLP. ``init_bias``: initial logit; 1 opens every gate
    (sigmoid(1) ≈ 0.73 > 0.5), so training starts from the full backbone.
    """

    lam: float = 0.01
    target: float | None = None  # FLOPs ratio to aim for (budget loss); None: the λ-per-block loss
    budget_weight: float = 10.0  # w of the budget loss
    estimator: str = "straight_through"
    temperature: float = 1.0
    hidden: int = 16
    init_bias: float = 1.0  # gates start open (sigmoid(1) = 0.73 > 0.5); at 3.0 the bias gradient λ·p(1−p) is 4x smaller

    def __post_init__(self) -> None:
        checks = [
            (self.lam >= 0, "gates.lam must be >= 0"),
            (self.target is None or 0 < self.target <= 1, "gates.target must be a FLOPs ratio in (0, 1] (or null)"),
            (self.budget_weight > 0, "gates.budget_weight must be > 0"),
            (self.estimator in ESTIMATORS, f"gates.estimator must be one of {ESTIMATORS}, got {self.estimator!r}"),
            (self.temperature > 0, "gates.temperature must be > 0"),
            (isinstance(self.hidden, int) and self.hidden >= 1, "gates.hidden must be an integer >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class Gate(nn.Module):
    """Pooled block input (B, C, H, W) → Linear(C, hidden) → ReLU → Linear(hidden, 1) → logit (B,)."""

    def __init__(self, in_channels: int, hidden: int, init_bias: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # Small output weights: every gate starts at init_bias whatever the image (the full
        # backbone), yet the hidden layer gets a gradient from the first step (zeros would block it).
        nn.init.normal_(self.mlp[2].weight, std=0.01)
        nn.init.constant_(self.mlp[2].bias, init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h.mean(dim=(2, 3))).squeeze(1)


class GatedResNet(BackboneWrapper):
    """A skippable backbone (submodule ``backbone``) with one gate per residual block.

    After each forward, ``last_keep_mask`` holds the (B, L) bool decisions and ``last_gates`` the
    (B, L) gate values the penalty uses (straight-through values while training).
    """

    def __init__(self, backbone: SkippableResNet, cfg: GateConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.gates = nn.ModuleList(Gate(b.conv1.in_channels, cfg.hidden, cfg.init_bias) for b in backbone.blocks)
        # With a conv+BN shortcut (option B, torchvision) a skipped downsampling block can output
        # negative values, where block(h, gate=0) = relu(shortcut(h)) differs from the real skip
        # shortcut(h); the dense training pass corrects for it (see forward). For option A the
        # correction is zero (a subsampled ReLU output is never negative), at one cheap call.
        self._exact_skip = any(b.downsamples for b in backbone.blocks)
        self.last_keep_mask: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        # FLOPs of the budget loss: cost = base + Σ_i g_i·delta_i, as fractions of the full network.
        cost = measure_backbone_cost(backbone)
        self.register_buffer("flops_delta", torch.tensor(
            [(k - s) / cost.full_flops for k, s in zip(cost.block_flops, cost.skip_flops)]), persistent=False)
        self.flops_base = cost.min_flops / cost.full_flops

    @property
    def arch(self) -> dict:
        return {**self.backbone.arch, "gates": asdict(self.cfg)}

    def _gate(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard decision g (0/1 float) and straight-through value g_st of gate ``i`` on ``h``."""
        logit = self.gates[i](h).float()
        if not self.training:
            g = (logit > 0).float()
            return g, g
        if self.cfg.estimator == "gumbel":
            u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
            logit = (logit + torch.log(u) - torch.log1p(-u)) / self.cfg.temperature
        p = torch.sigmoid(logit)
        g = (p > 0.5).float()
        return g, g + p - p.detach()

    def forward(self, x: torch.Tensor, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for images ``x``; ``keep_mask`` (B, L), if given, replaces the gates' decisions."""
        if keep_mask is not None:
            self.last_keep_mask = check_keep_mask(keep_mask, x.shape[0], self.num_blocks).to(x.device)
            self.last_gates = self.last_keep_mask.float()
            return self.backbone(x, keep_mask)
        h = self.backbone.stem(x)
        decisions, values = [], []
        for i, block in enumerate(self.backbone.blocks):
            g, g_st = self._gate(i, h)
            if self.training:
                # Dense: every row runs the block, so closed gates still get d(loss)/d(gate)
                # and can reopen. BatchNorm then normalises with statistics of all rows, in the
                # batch and in the running averages alike; a kept row gets the same affine map
                # in training and at inference (where only kept rows reach the block), so the
                # rows a block skips at inference shape its normalisation consistently.
                out = block(h, g_st)
                if self._exact_skip:
                    skipped = block.skip(h)
                    out = out + (1 - g).view(-1, 1, 1, 1).to(out.dtype) * (skipped - F.relu(skipped))
                h = out
            else:
                keep = g.bool()
                keep_rows, skip_rows = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
                h = run_block_masked(block, h, keep_rows, skip_rows)
            decisions.append(g)
            values.append(g_st)
        self.last_keep_mask = torch.stack(decisions, 1).bool()
        self.last_gates = torch.stack(values, 1)
        return self.backbone.head(h)

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, keep_mask: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``CE + λ · mean_batch(Σ_i g_i)`` (or the budget loss, see the module docstring) and the
        logits: the ``LossFn`` of ``backbone.training.loop.train``."""
        logits = self(images, keep_mask)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        gates = self.last_gates.float()
        if self.cfg.target is None:
            return ce + self.cfg.lam * gates.sum(1).mean(), logits
        flops_ratio = self.flops_base + (gates @ self.flops_delta.to(gates.device)).mean()
        return ce + self.cfg.budget_weight * (flops_ratio - self.cfg.target) ** 2, logits

    def gate_flops(self, image_size: int = 32) -> int:
        """FLOPs of all gates for one image (they count against the saving)."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()  # a training-mode pass would feed the zero image into the BN running stats
        with torch.no_grad():
            h, inputs = self.backbone.stem(torch.zeros(1, 3, image_size, image_size, device=device)), []
            for block in self.backbone.blocks:
                inputs.append(h)
                h = block(h)
        self.train(was_training)
        return count_flops(lambda: [gate(h_i) for gate, h_i in zip(self.gates, inputs)])


def load_gated(source: str | os.PathLike | dict) -> GatedResNet:
    """Rebuild a ``GatedResNet`` (on the CPU) from a checkpoint file or an already loaded one."""
    checkpoint = source if isinstance(source, dict) else load_checkpoint(Path(source))
    arch = checkpoint.get("arch") or {}
    if "gates" not in arch:
        raise ConfigError("checkpoint has no gate config (arch['gates']): it is not a GatedResNet checkpoint")
    backbone = model_from_arch({k: v for k, v in arch.items() if k != "gates"})
    gated = GatedResNet(backbone, GateConfig(**arch["gates"]))
    gated.load_state_dict(checkpoint["model"])
    return gated


def train_gates(
    backbone: SkippableResNet,
    train_set: ImageDataset | ImageFiles,
    val_set: ImageDataset | ImageFiles | None,
    gate_cfg: GateConfig,
    train_cfg: TrainConfig,
    checkpoint_dir: str | os.PathLike | None = None,
    writer=None,
    resume: bool = False,
    seed: int = 0,
) -> tuple[GatedResNet, dict]:
    """Wrap ``backbone`` (trained in place, on its device) with gates and train both jointly.

    Uses ``backbone.training.loop.train`` with the gate loss; checkpoints, resume and TensorBoard work as
    there. Returns the model and train's history, plus ``val_metrics`` (``evaluate_gates`` on
    ``val_set``) when a validation set is given.
    """
    device = next(backbone.parameters()).device
    gated = GatedResNet(backbone, gate_cfg).to(device)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, keep_mask: torch.Tensor | None):
        return gated.loss(images, labels, keep_mask, label_smoothing=train_cfg.label_smoothing)

    history = train(gated, train_set, val_set, train_cfg, checkpoint_dir, writer, resume,
                    loss_fn=loss_fn, seed=seed, desc="gates")
    if val_set is not None and len(val_set) > 0:
        history["val_metrics"] = evaluate_gates(gated, val_set, train_cfg.eval_batch_size)
        if writer is not None:
            for key in ("accuracy", "blocks_used", "flops_ratio"):
                writer.add_scalar(f"eval/{key}", history["val_metrics"][key], train_cfg.epochs)
            writer.flush()
    return gated, history


@torch.no_grad()
def evaluate_gates(gated: GatedResNet, dataset: ImageDataset | ImageFiles, batch_size: int = 512, amp: bool = True) -> dict:
    """The gated model (eval mode, real skipping) on every image of ``dataset`` (in memory or streamed).

    Same keys as ``agents.evaluation.evaluate_policy_on``; ``flops`` includes the gates' own FLOPs and
    ``reward`` is the RL reward ``correct − λ·blocks_used`` at the gates' λ.
    """
    device = next(gated.parameters()).device
    was_training = gated.training
    gated.eval()
    correct, keep = [], []
    for images, labels in make_loader(dataset, batch_size, shuffle=False, device=device).epoch_batches(0):
        # bf16 on CUDA, as backbone.training.evaluation.evaluate does, so decisions match the val accuracy logged in training.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = gated(images)
        correct.append((logits.argmax(1) == labels).cpu())
        keep.append(gated.last_keep_mask.cpu())
    gated.train(was_training)
    correct_f = torch.cat(correct).float() if correct else torch.zeros(0)
    keep_mask = torch.cat(keep) if keep else torch.zeros(0, gated.num_blocks, dtype=torch.bool)
    blocks = keep_mask.sum(1).double()
    image_size = image_size_of(dataset)  # FLOPs at the size the images have
    cost = measure_backbone_cost(gated.backbone, image_size)
    gate_flops = gated.gate_flops(image_size)
    flops = cost.mask_flops(keep_mask) + gate_flops
    metrics = {
        "num_images": len(dataset),
        "accuracy": correct_f.mean().item(),
        "blocks_used": blocks.mean().item(),
        "blocks_used_std": blocks.std(unbiased=False).item(),
        "flops": flops.mean().item(),
        "flops_ratio": (flops / cost.full_flops).mean().item(),
        "reward": (correct_f.double() - gated.cfg.lam * blocks).mean().item(),
        "target": gated.cfg.target,
        "keep_rate_per_block": keep_mask.float().mean(0).tolist(),
        "gate_flops": gate_flops,
    }
    if dataset.difficulty is not None:
        levels = dataset.difficulty.cpu()
        metrics["by_difficulty"] = {
            str(int(d)): {"accuracy": correct_f[levels == d].mean().item(), "blocks_used": blocks[levels == d].mean().item()}
            for d in levels.unique()
        }
    return metrics
