"""What a block-skipping policy looks at.

- ``"pixels"``: the image itself (uint8, optionally area-downsampled to ``obs_size``), for an
  image network of its own (BlockDrop's setting).
- ``"stem"``: features the backbone computes anyway: its stem's output, average-pooled to a
  ``grid`` x ``grid`` map per channel plus each channel's standard deviation over the image
  (texture and noise energy), flattened to one float32 vector. The stem runs once; the policy
  adds only a small MLP. On the built-in synthetic data these features predict an image's
  difficulty level far better than the pixels do (docs/results.md, "What the policy observes").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBSERVATIONS = ("pixels", "stem")


def downsample_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Area-downsample uint8 images to size x size, rounded back to uint8 (in chunks: bounded memory)."""
    parts = [F.interpolate(images[s:s + chunk].float(), size=(size, size), mode="area").round_().clamp_(0, 255)
             for s in range(0, len(images), chunk)]
    return torch.cat(parts).to(torch.uint8)


def channel_moments(h: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, grid, grid) average-pooled map and (B, C) per-channel standard deviation of ``h``,
    both from pooling alone: E[x] and E[x²] pooled to the grid (exact for grids that divide the
    map, average pooling of equal cells otherwise), the std from their grid means. No reduction
    over a flattened view, which on a channels-last tensor would first copy it to NCHW."""
    h = h.detach().float()
    pooled = F.adaptive_avg_pool2d(h, grid)
    mean = pooled.mean(dim=(2, 3))
    square = F.adaptive_avg_pool2d(h * h, grid).mean(dim=(2, 3))
    return pooled, (square - mean * mean).clamp_(min=0).sqrt_()


def stem_features_of(h: torch.Tensor, grid: int) -> torch.Tensor:
    """float32 (B, C·grid² + C) from a stem output ``h`` (B, C, H, W): pooled map and channel stds."""
    pooled, std = channel_moments(h, grid)
    return torch.cat([pooled.flatten(1), std], 1)


def stem_feature_dim(channels: int, grid: int) -> int:
    return channels * (grid * grid + 1)


@torch.no_grad()
def stem_features(backbone, images: torch.Tensor, grid: int, chunk: int = 1024) -> torch.Tensor:
    """The ``"stem"`` observation of uint8 ``images`` (on the backbone's device), in chunks."""
    was_training = backbone.training
    backbone.eval()
    out = torch.cat([stem_features_of(backbone.stem(images[s:s + chunk]), grid) for s in range(0, len(images), chunk)])
    backbone.train(was_training)
    return out


def sequential_obs_dim(feature_dim: int, num_blocks: int) -> int:
    """D of the sequential env's observation: 2·F activation statistics, L one-hot, 1 budget."""
    return 2 * feature_dim + num_blocks + 1


def activation_statistics(h: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """float32 (B, 2F): channel means then channel stds of ``h``, each zero-padded to F channels
    (stages have different widths; F is the widest, the backbone's ``feature_dim``)."""
    pooled, std = channel_moments(h, 1)
    pad = (0, feature_dim - h.shape[1])
    return torch.cat([F.pad(pooled.flatten(1), pad), F.pad(std, pad)], 1)


def sequential_observation(h: torch.Tensor, i: int, blocks_used: torch.Tensor, num_blocks: int,
                           feature_dim: int) -> torch.Tensor:
    """float32 (B, D) before block ``i``: statistics of the running activation ``h``, the one-hot
    of ``i`` (all zero for the terminal i == num_blocks), ``blocks_used / num_blocks``."""
    one_hot = torch.zeros(h.shape[0], num_blocks, device=h.device)
    if i < num_blocks:
        one_hot[:, i] = 1.0
    used = blocks_used.to(device=h.device, dtype=torch.float32).view(-1, 1) / num_blocks
    return torch.cat([activation_statistics(h, feature_dim), one_hot, used], dim=1)


@torch.no_grad()
def sequential_feature_statistics(backbone, images: torch.Tensor, chunk: int = 1024) -> tuple[list, list]:
    """Per block position, the mean and std of :func:`activation_statistics` over ``images`` with
    every block run: (L, 2F) nested lists, for the sequential policy's standardiser (the
    activations of different stages live on very different scales)."""
    was_training = backbone.training
    backbone.eval()
    feature_dim, sums, squares, n = backbone.feature_dim, None, None, 0
    for s in range(0, len(images), chunk):
        h, rows = backbone.stem(images[s:s + chunk]), []
        for block in backbone.blocks:
            rows.append(activation_statistics(h, feature_dim).double())
            h = block(h)
        stats = torch.stack(rows)  # (L, B, 2F)
        sums = stats.sum(1) if sums is None else sums + stats.sum(1)
        squares = (stats ** 2).sum(1) if squares is None else squares + (stats ** 2).sum(1)
        n += stats.shape[1]
    backbone.train(was_training)
    mean = sums / n
    std = (squares / n - mean ** 2).clamp(min=0).sqrt()
    return mean.tolist(), std.tolist()
