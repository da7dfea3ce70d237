"""Turn a run's ``metrics.json`` into ``report.md`` and PNG plots (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(value, spec: str = ".4f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def sweep_points(metrics: dict) -> list[dict]:
    """Every trained policy of the run (default tag and λ-sweep tags), sorted by FLOPs."""
    points = [
        {"tag": k, "lam": v["reward"]["lam"], **{x: v["test"][x] for x in ("accuracy", "flops_ratio", "blocks_used")}}
        for k, v in metrics.items()
        if isinstance(v, dict) and "tag" in v and "test" in v
    ]
    return sorted(points, key=lambda p: p["flops_ratio"])


def plot_accuracy_vs_flops(metrics: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = sweep_points(metrics)
    if points:
        ax.plot([p["flops_ratio"] for p in points], [100 * p["accuracy"] for p in points], "o-", color="tab:blue",
                label="RL policy (λ sweep)")
        for p in points:
            ax.annotate(f"λ={p['lam']:g}", (p["flops_ratio"], 100 * p["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="tab:blue")
    markers = "s^vDPX*h"
    for i, m in enumerate(metrics.get("compare", {}).get("methods", [])):
        if m["method"] == "RL policy":
            continue
        ax.plot(m["flops_ratio"], 100 * m["accuracy"], markers[i % len(markers)], markersize=8, label=m["method"])
    ax.set_xlabel("FLOPs relative to the full backbone (policy included)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs compute")
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


def markdown(metrics: dict, cfg) -> str:
    lines = [f"# dyndepth report: {cfg.name}", ""]
    pre = metrics.get("pretrain", {})
    lines += [f"Dataset `{cfg.data.name}`, backbone {cfg.model.arch} (width {cfg.model.width}, {pre.get('num_blocks', '?')} blocks), "
              f"policy {cfg.policy.algo} on the {cfg.policy.env} env, reward {cfg.policy.reward.kind} with λ = {cfg.policy.reward.lam}, "
              f"seed {cfg.seed}, device {pre.get('device', '?')}.", ""]
    methods = metrics.get("compare", {}).get("methods", [])
    if methods:
        lines += ["## Comparison (test split)", "", "| method | top-1 | blocks | MFLOPs | FLOPs ratio | training (s) |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            lines.append(f"| {m['method']} | {100 * m['accuracy']:.2f}% | {_fmt(m['blocks_used'], '.2f')} | "
                         f"{m['flops'] / 1e6:.2f} | {m['flops_ratio']:.3f} | {_fmt(m['train_time_s'], '.0f')} |")
        lines += ["", "FLOPs include the policy or gates. ![accuracy vs FLOPs](accuracy_vs_flops.png)", ""]
    points = sweep_points(metrics)
    if len(points) > 1:
        lines += ["## λ sweep (RL policy, no fine-tuning)", "", "| λ | top-1 | blocks | FLOPs ratio |", "|---|---|---|---|"]
        lines += [f"| {p['lam']:g} | {100 * p['accuracy']:.2f}% | {p['blocks_used']:.2f} | {p['flops_ratio']:.3f} |" for p in points]
        lines.append("")
    ev = metrics.get("evaluation")
    if ev:
        lines += [f"## Evaluation of the final model ({ev['model']}, {ev['split']} split)", "",
                  f"Top-1 {100 * ev['accuracy']:.2f}%, blocks {ev['blocks_used']:.2f} ± {ev['blocks_used_std']:.2f}, "
                  f"{ev['flops'] / 1e6:.2f} MFLOPs per image of which the policy {ev['policy_flops'] / 1e6:.3f}, "
                  f"FLOPs ratio {ev['flops_ratio']:.3f}.", ""]
        if ev.get("latency"):
            lines += ["| batch | full backbone (ms) | policy + masked backbone (ms) | speed-up | FLOPs reduction |", "|---|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['full_ms']:.2f} | {r['dynamic_ms']:.2f} | {r['time_ratio']:.2f}x | {r['flops_ratio']:.2f}x |"
                      for r in ev["latency"]]
            lines += ["", f"Measured on {ev['device']}: median of repeats after warm-up.", ""]
        if ev.get("by_difficulty"):
            lines += ["| difficulty | images | top-1 | blocks |", "|---|---|---|---|"]
            lines += [f"| {k} | {v['count']} | {100 * v['accuracy']:.2f}% | {v['blocks_used']:.2f} |" for k, v in ev["by_difficulty"].items()]
            lines.append("")
        lines += ["| class | top-1 | blocks |", "|---|---|---|"]
        lines += [f"| {k} | {100 * v['accuracy']:.2f}% | {v['blocks_used']:.2f} |" for k, v in list(ev["by_class"].items())[:20]]
        lines += ["", "Most frequent masks (1 = block executed):", "", "| mask | share | top-1 |", "|---|---|---|"]
        lines += [f"| `{m['mask']}` | {100 * m['share']:.1f}% | {100 * m['accuracy']:.2f}% |" for m in ev["top_masks"]]
        lines += ["", "Training time per stage (s): " + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in ev["train_time_s"].items()), "",
                  "![keep rates](keep_rates.png) ![blocks used](blocks_used.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, metrics: dict, cfg) -> Path:
    """Write ``report.md`` and the plots into ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    if "compare" in metrics or sweep_points(metrics):
        plot_accuracy_vs_flops(metrics, run_dir / "accuracy_vs_flops.png")
    if "evaluation" in metrics:
        plot_keep_rates(metrics["evaluation"], run_dir / "keep_rates.png")
        plot_blocks_histogram(metrics["evaluation"], run_dir / "blocks_used.png")
    path = run_dir / "report.md"
    path.write_text(markdown(metrics, cfg))
    return path
