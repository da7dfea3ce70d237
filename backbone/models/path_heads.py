"""One linear classifier per path: what a backbone shared by a ladder policy's rungs keeps per rung.

A ladder policy routes each image through one of a few fixed masks (its rungs). Jointly
fine-tuned, one backbone serves all of them, and every rung ends in the same classifier although
the features it pools differ from rung to rung: the 7-block path of a ResNet-32 pools features a
head trained on the 9-block path reads less well. Measured on akamaster's ResNet-32 (docs/
results.md, session 7), a linear head refitted per rung on the distilled pair's backbone lifts
the 7-block rung from 78.4 to 80.1% and the pair from 82.97 to 83.82%, while the same refit gives
a fixed subset fine-tuned alone only 0.2-0.4 points: the shared head is part of what the pair's
paths pay for sharing one backbone.

``PathHeads`` holds K heads (weight K×C×F, bias K×C) and the K masks they belong to; a row whose
keep mask equals mask k is classified by head k, any other row (the full network with no mask,
a mask that is no rung) by the backbone's own ``fc``. The heads add K·(C·F + C) parameters (for
CIFAR ResNets a few thousand) and no FLOPs: each row still runs one linear layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PathHeads(nn.Module):
    """K linear classifiers, one per keep mask in ``masks``, called with the pooled features and
    each row's mask (``SkippableResNet.classify``)."""

    def __init__(self, masks: torch.Tensor | int, fc: nn.Linear, num_blocks: int):
        """``masks``: the K distinct paths (K, num_blocks); an int K: K placeholders that a
        checkpoint's state dict then fills (``weights.model_from_arch``)."""
        super().__init__()
        if isinstance(masks, int):
            masks = torch.zeros(masks, num_blocks, dtype=torch.bool)
        else:
            masks = torch.as_tensor(masks).bool()
            if masks.dim() != 2 or masks.shape[0] < 1 or masks.shape[1] != num_blocks:
                raise ValueError(f"path heads need masks of {num_blocks} blocks, (K, {num_blocks}) with K >= 1; "
                                 f"got shape {tuple(masks.shape)}")
            if len({tuple(m) for m in masks.tolist()}) != len(masks):
                raise ValueError("path heads need distinct masks: two heads for one path could never both be used")
        self.register_buffer("masks", masks.clone())
        # Every head starts as the shared classifier, so attaching them changes no prediction.
        self.weight = nn.Parameter(fc.weight.detach().clone().unsqueeze(0).repeat(len(masks), 1, 1))
        self.bias = nn.Parameter(fc.bias.detach().clone().unsqueeze(0).repeat(len(masks), 1))

    def path_index(self, keep_mask: torch.Tensor) -> list[int]:
        """The head of each row of ``keep_mask`` (B, L), or −1 where no head's mask matches.
        Matched on the host: at batch 1 a few tensor ops would cost more than the head itself."""
        paths = {tuple(m): k for k, m in enumerate(self.masks.tolist())}
        return [paths.get(tuple(row), -1) for row in keep_mask.bool().tolist()]

    def forward(self, features: torch.Tensor, keep_mask: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        """Logits of pooled ``features`` (B, F), each row by the head of its path (``fc`` for none)."""
        index = self.path_index(keep_mask)
        paths = sorted(set(index))
        if len(paths) == 1:  # batch 1, or one path for all: one plain linear layer, no index work
            k = paths[0]
            return fc(features) if k < 0 else F.linear(features, self.weight[k], self.bias[k])
        index = torch.tensor(index, device=features.device)
        parts = []
        for k in paths:
            rows = (index == k).nonzero().squeeze(1)
            x = features.index_select(0, rows)
            parts.append((rows, fc(x) if k < 0 else F.linear(x, self.weight[k], self.bias[k])))
        # In the heads' output dtype (under autocast it may differ from the features').
        logits = parts[0][1].new_empty(features.shape[0], parts[0][1].shape[1])
        for rows, part in parts:
            logits = logits.index_copy(0, rows, part)
        return logits
