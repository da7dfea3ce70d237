"""Accuracy-vs-FLOPs curves and the comparison at matched compute.

Every method of a study is a curve over its own knob (λ, FLOPs budget, subset size, keep rate,
depth/width): a list of points ``{"flops_ratio", "accuracy", "train_time_s", "knob"}``.
:func:`accuracy_at` reads a curve at a FLOPs budget (linear interpolation between the points
that bracket it; a point within ``TOLERANCE`` below the budget counts as at it; a method may
always spend less than the budget, never more),
and :func:`headline` gives every method's accuracy at each budget and the winner.
"""

from __future__ import annotations

import statistics

#: A point this little above a budget (relative) counts as at it: "within 3% of the target FLOPs".
TOLERANCE = 0.03


def point(flops_ratio: float, accuracy: float, train_time_s: float | None = None, **knob) -> dict:
    return {"flops_ratio": float(flops_ratio), "accuracy": float(accuracy), "train_time_s": train_time_s, "knob": knob}


def accuracy_at(points: list[dict], budget: float, tolerance: float = TOLERANCE) -> float | None:
    """The curve's accuracy at ``budget`` (a FLOPs ratio), or None when the curve does not reach it.

    The curve is the upper envelope of its points sorted by FLOPs (a method can always fall back
    to a cheaper point of its own, so accuracy never needs to drop as FLOPs grow); between two
    points it is linear (a mixture of the two operating points realises it).
    """
    best_at: dict[float, float] = {}  # two points at one FLOPs (e.g. two masks of k blocks): the better one
    for p in points:
        best_at[p["flops_ratio"]] = max(p["accuracy"], best_at.get(p["flops_ratio"], float("-inf")))
    if not best_at:
        return None
    envelope, best = [], float("-inf")
    for f, a in sorted(best_at.items()):
        best = max(best, a)
        envelope.append((f, best))
    if budget < envelope[0][0]:  # the cheapest point costs more than the budget
        return envelope[0][1] if envelope[0][0] <= budget * (1 + tolerance) else None
    for (f0, a0), (f1, a1) in zip(envelope, envelope[1:]):
        if f0 <= budget <= f1:
            return a0 if f1 == f0 else a0 + (a1 - a0) * (budget - f0) / (f1 - f0)
    return envelope[-1][1]  # every point is cheaper than the budget: the best of them


def train_time_at(points: list[dict], budget: float, tolerance: float = TOLERANCE) -> float | None:
    """Training time of the points a reading at ``budget`` uses (the larger of the two bracketing)."""
    pts = sorted(points, key=lambda p: p["flops_ratio"])
    times = [p["train_time_s"] for p in pts if abs(p["flops_ratio"] - budget) <= tolerance * budget]
    for lo, hi in zip(pts, pts[1:]):
        if lo["flops_ratio"] <= budget <= hi["flops_ratio"]:
            times += [lo["train_time_s"], hi["train_time_s"]]
    if pts and budget > pts[-1]["flops_ratio"]:
        times += [p["train_time_s"] for p in pts]  # read as the best of the cheaper points
    times = [t for t in times if t is not None]
    return max(times) if times else None


def headline(curves: dict[str, list[dict]], budgets: list[float]) -> list[dict]:
    """Per budget: every method's accuracy at it (None where its curve does not reach it), its
    training time, and the winner."""
    rows = []
    for budget in budgets:
        accuracy = {name: accuracy_at(points, budget) for name, points in curves.items()}
        times = {name: train_time_at(points, budget) for name, points in curves.items()}
        reached = {k: v for k, v in accuracy.items() if v is not None}
        rows.append({"budget": budget, "accuracy": accuracy, "train_time_s": times,
                     "winner": max(reached, key=reached.get) if reached else None})
    return rows


def seed_summary(headlines: list[list[dict]]) -> list[dict]:
    """Mean ± std over seeds of every method's accuracy at every budget (seeds where the method
    reached the budget), and the winner by mean."""
    rows = []
    for per_seed in zip(*headlines):
        budget = per_seed[0]["budget"]
        methods = sorted({m for row in per_seed for m in row["accuracy"]})
        stats = {}
        for m in methods:
            values = [row["accuracy"][m] for row in per_seed if row["accuracy"].get(m) is not None]
            if values:
                stats[m] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "seeds": len(values)}
        rows.append({"budget": budget, "methods": stats,
                     "winner": max(stats, key=lambda m: stats[m]["mean"]) if stats else None})
    return rows


def bracketing(flops_ratios: list[float], budget: float) -> set[int]:
    """Indices of the cheapest point at or above ``budget`` and the dearest one at or below it."""
    below = [i for i, f in enumerate(flops_ratios) if f <= budget]
    above = [i for i, f in enumerate(flops_ratios) if f >= budget]
    picked = set()
    if below:
        picked.add(max(below, key=lambda i: flops_ratios[i]))
    if above:
        picked.add(min(above, key=lambda i: flops_ratios[i]))
    return picked
