"""The cascade ``experiments.cascade`` chose for a budget, loaded from its run as one deployable model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agents.cascade import CascadeModel
from backbone.errors import ConfigError
from backbone.models.weights import load_model
from experiments.config import load_config

STAGE = "cascade"


def chosen_cascade(run_dir: Path, budget: float) -> tuple[dict, list[dict]]:
    """The result row of the cascade ``experiments.cascade`` chose for the budget nearest
    ``budget`` in ``run_dir``'s metrics, and its networks' records (name, mask, FLOPs, file);
    a ConfigError when the run has none."""
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    rows = metrics.get(STAGE, {}).get("cascades")
    if not rows:
        raise ConfigError(f"{metrics_path} holds no cascades: run python -m experiments.cascade --run {run_dir} first")
    networks = {n["name"]: n for n in metrics[STAGE]["networks"]}
    if any("file" not in n for n in networks.values()):  # written before the files were recorded
        raise ConfigError(f"the cascades in {metrics_path} do not name their networks' files: rerun "
                          f"python -m experiments.cascade --run {run_dir}")
    row = min(rows, key=lambda r: abs(r["budget"] - budget))
    return row, [networks[name] for name in row["chain"]]


def load_cascade(run_dir: Path, budget: float, device) -> tuple:
    """:func:`chosen_cascade` as a :class:`agents.cascade.CascadeModel` on ``device``: (its result
    row, the model, each network's FLOPs ratio, the run's config)."""
    row, chain = chosen_cascade(run_dir, budget)
    models = [load_model(run_dir / n["file"], map_location=device).to(device).eval() for n in chain]
    masks = [torch.tensor([c == "1" for c in n["mask"]]) for n in chain]
    cascade = CascadeModel(models, masks, row["thresholds"], average_last=row.get("averaged", False))
    return row, cascade, [n["flops_ratio"] for n in chain], load_config(run_dir / "config.yaml")
