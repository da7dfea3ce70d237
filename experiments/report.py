"""Turn a run's ``metrics.json`` into ``report.md`` and PNG plots (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

ORACLE = "oracle (per image, fixed-subset masks)"


def _fmt(value, spec: str = ".4f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def sweep_points(metrics: dict) -> list[dict]:
    """Every trained policy of the run (default tag and λ-sweep tags), sorted by FLOPs."""
    points = [
        {"tag": k, "lam": v["reward"]["lam"], **{x: v["test"][x] for x in ("accuracy", "flops_ratio", "blocks_used")}}
        for k, v in metrics.items()
        if isinstance(v, dict) and "tag" in v and "test" in v
    ]
    return sorted(points, key=lambda p: p["flops_ratio"])


def plot_curves(compare: dict, path: Path) -> None:
    """Every method's accuracy-vs-FLOPs curve on one plot, the oracle bound dashed, budgets marked."""
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    for i, (name, points) in enumerate(compare["curves"].items()):
        pts = sorted(points, key=lambda p: p["flops_ratio"])
        style = "o-" if len(pts) > 1 else "s"
        ax.plot([p["flops_ratio"] for p in pts], [100 * p["accuracy"] for p in pts], style, markersize=5,
                label=name, color=f"C{i % 10}")
    oracle = compare.get("oracle")
    if oracle:
        ax.plot(oracle["flops_ratio"], [100 * a for a in oracle["accuracy"]], "k--", linewidth=1, label=ORACLE)
    for b in compare.get("budgets", []):
        ax.axvline(b, color="grey", linewidth=0.8, alpha=0.5)
    ax.set_xlabel("FLOPs relative to the full backbone (policy / gates included)")
    ax.set_ylabel("top-1 accuracy on the test split (%)")
    ax.set_title("Accuracy vs compute: every method over its own knob")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bar_chart(values: list, path: Path, xlabel: str, ylabel: str, title: str, color: str, ylim=None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.bar(range(len(values)), values, color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_keep_rates(evaluation: dict, path: Path) -> None:
    _bar_chart(evaluation["keep_rate_per_block"], path, "residual block", "share of images that run it",
               "Per-block keep rate", "tab:green", ylim=(0, 1.05))


def plot_blocks_histogram(evaluation: dict, path: Path) -> None:
    _bar_chart(evaluation["blocks_histogram"], path, "blocks executed per image", "images", "Blocks used", "tab:orange")


def plot_examples(dataset, examples: list[dict], group_names: list[str], path: Path) -> None:
    """Easy and hard test images, each titled with the blocks the model ran on it (1 = run)."""
    groups = sorted({e["group"] for e in examples})
    per_row = max(sum(e["group"] == g for e in examples) for g in groups)
    fig, axes = plt.subplots(len(groups), per_row, figsize=(1.6 * per_row, 1.9 * len(groups)), squeeze=False)
    for r, g in enumerate(groups):
        row = [e for e in examples if e["group"] == g]
        for c in range(per_row):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                e = row[c]
                ax.imshow(dataset.images[e["index"]].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
                ax.set_title(f"{e['mask']}\n{e['mask'].count('1')} blocks", fontsize=7, family="monospace")
        name = group_names[g] if g < len(group_names) else str(g)
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("Who gets which blocks: easiest (top) vs hardest (bottom) test images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _comparison(compare: dict) -> list[str]:
    lines = ["## Accuracy at matched FLOPs (test split)", "",
             "Each method's curve read at the budget (linear between its two bracketing points; a point up to 3% above "
             "the budget counts as at it; a method may spend less than the budget, never more). FLOPs include the "
             "policy or the gates. Training time: all training the point needs, the backbone's included for methods "
             "that start from it.", ""]
    budgets = compare["headline"]
    lines += ["| method | " + " | ".join(f"top-1 at {100 * r['budget']:.0f}% FLOPs (training s)" for r in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for name in compare["curves"]:
        cells = []
        for r in budgets:
            acc, t = r["accuracy"].get(name), r["train_time_s"].get(name)
            text = "-" if acc is None else f"{_pct(acc)} ({_fmt(t, '.0f')})"
            cells.append(f"**{text}**" if r["winner"] == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Winner per budget: " + ", ".join(f"{100 * r['budget']:.0f}%: **{r['winner']}**" for r in budgets), ""]
    gap = compare.get("gap_closed", [])
    if gap:
        lines += ["Per-image oracle (each test image gets the cheapest fixed-subset mask that classifies it correctly; "
                  "a bound, not a method) and how much of its lead over the best fixed subset the RL policy takes "
                  "(same backbone, before fine-tuning):", "",
                  "| budget | fixed subset | RL policy | oracle | gap closed |", "|---|---|---|---|---|"]
        lines += [f"| {100 * g['budget']:.0f}% | {_pct(g['fixed_subset'])} | {_pct(g['policy'])} | {_pct(g['oracle'])} | "
                  f"{_fmt(g['gap_closed'], '.2f')} |" for g in gap]
        lines.append("")
    lines += ["![accuracy vs FLOPs](accuracy_vs_flops.png)", "", "### Every point", "",
              "| method | knob | top-1 | FLOPs ratio | training (s) |", "|---|---|---|---|---|"]
    for name, points in compare["curves"].items():
        for p in sorted(points, key=lambda q: q["flops_ratio"]):
            knob = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["knob"].items())
            lines.append(f"| {name} | {knob} | {_pct(p['accuracy'])} | {p['flops_ratio']:.3f} | {_fmt(p['train_time_s'], '.0f')} |")
    s = compare.get("static_recipe", {})
    ladder = compare.get("fixed_subset_search", {})
    budget = compare.get("finetune_budget", {})
    distilled = f", distilled from the full backbone (weight {budget['distill']:g})" if budget.get("distill") else ""
    if budget.get("refit_heads"):
        distilled += (f"; then the classifier refitted on {budget['refit_heads']} clean training images (a ladder "
                      "pair: one per rung)")
    lines += ["", f"Static networks: trained {s.get('from', 'from scratch')} for {s.get('epochs')} epochs with the backbone's "
              f"recipe minus stochastic depth. Fixed subsets: {ladder.get('search')} search on {ladder.get('search_images')} "
              f"held-out images. Fine-tuned methods: {budget.get('epochs')} epochs each (the joint fine-tuning's "
              f"budget){distilled}.", ""]
    return lines


def _adaptivity(metrics: dict) -> list[str]:
    rows = []
    for key, v in metrics.items():
        if isinstance(v, dict) and "test" in v and ("tag" in v or "policy_tag" in v):
            rows.append((key, v))
    if not rows:
        return []
    lines = ["## Adaptivity of every policy (test split)", "",
             "Distinct masks, masks that cover 90% of the images, spread of blocks per image, and blocks used in the "
             "easiest and the hardest difficulty group.", "",
             "| model | λ | top-1 | FLOPs ratio | distinct masks | masks for 90% | blocks (mean ± std) | easiest → hardest group blocks |",
             "|---|---|---|---|---|---|---|---|"]
    for key, v in sorted(rows, key=lambda kv: kv[1]["test"]["flops_ratio"]):
        t, a = v["test"], v["test"]["adaptivity"]
        groups = list(a.get("by_difficulty", {}).values())
        spread = f"{groups[0]['blocks_used']:.2f} → {groups[-1]['blocks_used']:.2f}" if groups else "-"
        lam = v.get("lam", v.get("reward", {}).get("lam"))
        lines.append(f"| {key} | {_fmt(lam, 'g')} | {_pct(t['accuracy'])} | {t['flops_ratio']:.3f} | {a['distinct_masks']} | "
                     f"{a['masks_covering_90pct']} | {a['blocks_used_mean']:.2f} ± {a['blocks_used_std']:.2f} | {spread} |")
    lines.append("")
    return lines


def _evaluation(ev: dict) -> list[str]:
    a = ev["adaptivity"]
    lines = [f"## The final model in detail ({ev['model']}, {ev['split']} split)", "",
             f"Top-1 {100 * ev['accuracy']:.2f}%, blocks {ev['blocks_used']:.2f} ± {ev['blocks_used_std']:.2f}, "
             f"{ev['flops'] / 1e6:.2f} MFLOPs per image of which the policy {ev['policy_flops'] / 1e6:.3f}, "
             f"FLOPs ratio {ev['flops_ratio']:.3f}. {a['distinct_masks']} distinct masks, {a['masks_covering_90pct']} "
             f"cover 90% of the images (the most frequent: {100 * a['top_mask_share']:.1f}%).", ""]
    if ev.get("latency"):
        lines += ["| batch | images | full backbone (ms per call) | policy + masked backbone (ms per call) | speed-up | FLOPs reduction | efficiency |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['images']} | {r['full_ms']:.2f} | {r['dynamic_ms']:.2f} | {r['time_ratio']:.2f}x | "
                  f"{r['flops_ratio']:.2f}x | {r['efficiency']:.2f} |" for r in ev["latency"]]
        lines += ["", f"Measured on {ev['device']} in {ev['latency'][0].get('dtype', 'float32')}: median of repeats after "
                  "warm-up; batch 1 is a stream of different test images, each with its own mask.", ""]
    if a.get("by_difficulty"):
        lines += [f"Difficulty groups: {ev.get('difficulty_groups', '')}.", "",
                  "| group | images | top-1 | blocks (mean ± std) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['count']} | {_pct(v['accuracy'])} | {v['blocks_used']:.2f} ± {v['blocks_used_std']:.2f} |"
                  for k, v in a["by_difficulty"].items()]
        lines.append("")
    kp = a.get("keep_prob")
    if kp:
        lines += ["Per-image keep probabilities (before thresholding): mean per block "
                  + ", ".join(f"{p:.2f}" for p in kp["mean_per_block"]) + "; spread across images per block (std) "
                  + ", ".join(f"{p:.2f}" for p in kp["std_across_images_per_block"])
                  + f"; {100 * kp['undecided_share']:.1f}% of all probabilities lie in (0.1, 0.9).", ""]
    if ev.get("examples"):
        lines += ["![easy vs hard images with their masks](examples.png)", ""]
    lines += ["Most frequent masks (1 = block executed):", "", "| mask | share | top-1 |", "|---|---|---|"]
    lines += [f"| `{m['mask']}` | {100 * m['share']:.1f}% | {100 * m['accuracy']:.2f}% |" for m in ev["top_masks"]]
    lines += ["", "| class | top-1 | blocks |", "|---|---|---|"]
    lines += [f"| {k} | {_pct(v['accuracy'])} | {v['blocks_used']:.2f} |" for k, v in list(ev["by_class"].items())[:20]]
    lines += ["", "Training time per stage (s): " + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in ev["train_time_s"].items()), "",
              "![keep rates](keep_rates.png) ![blocks used](blocks_used.png)", ""]
    return lines


def markdown(metrics: dict, cfg) -> str:
    pre = metrics.get("pretrain", {})
    p = cfg.policy
    observation = p.observation if p.env == "oneshot" else "activation statistics"
    lines = [f"# dyndepth report: {cfg.name}", "",
             f"Dataset `{cfg.data.name}`, backbone {cfg.model.arch} (width {cfg.model.width}, {pre.get('num_blocks', '?')} blocks"
             + (", imported" if cfg.model.init_checkpoint else "") + f"), policy {p.algo} on the {p.env} env observing "
             f"{observation}, reward {p.reward.kind} (signal {p.reward.signal}, baseline {p.reward.baseline}) with "
             f"λ = {p.reward.lam}, seed {cfg.seed}, device {pre.get('device', '?')}."
             + (f" Backbone{' (and its from-scratch static networks)' if pre.get('shared_statics') else ''} "
                f"shared from {pre['shared_from']}." if pre.get("shared_from") else ""), ""]
    if "compare" in metrics:
        lines += _comparison(metrics["compare"])
    lines += _adaptivity(metrics)
    if metrics.get("evaluation"):
        lines += _evaluation(metrics["evaluation"])
    return "\n".join(lines)


def write_report(run_dir: Path, metrics: dict, cfg) -> Path:
    """Write ``report.md`` and the plots into ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    if "compare" in metrics:
        plot_curves(metrics["compare"], run_dir / "accuracy_vs_flops.png")
    if "evaluation" in metrics:
        plot_keep_rates(metrics["evaluation"], run_dir / "keep_rates.png")
        plot_blocks_histogram(metrics["evaluation"], run_dir / "blocks_used.png")
    path = run_dir / "report.md"
    path.write_text(markdown(metrics, cfg))
    return path
