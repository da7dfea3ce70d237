"""Does per-image compute pay on this backbone? ``python -m experiments.cascade --run DIR [--budgets B ...] [--json]``.

Confidence cascades (``agents.cascade``) built from a finished comparison's own static networks:
each fine-tuned fixed subset (``baselines/subset_*.pt``, written by ``experiments.compare``) as
the small network, the full backbone as the large one. For every FLOPs budget the small network
and its threshold are chosen on the held-out split, then the cascade is scored on the test split
beside what static networks reach at its FLOPs: the best single one of at most that cost, and
the best random mixture of two (the upper hull of the static points: its accuracy is what the
cascade's per-image choice must beat), with its adaptivity (blocks per image, blocks per
difficulty quartile of the full backbone's margin).
Training budget: the small network's fine-tuning, the same as that static network's; the full
backbone is every method's starting point. Stored in ``metrics.json`` (section ``cascade``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agents.adaptivity import difficulty_groups
from agents.cascade import ScoredNetwork, cascade_for_budget, static_envelope_at
from backbone.baselines import mask_string
from backbone.data.datasets import load_splits
from backbone.data.streaming import image_size_of
from backbone.errors import ConfigError
from backbone.models.cost import measure_backbone_cost
from backbone.models.weights import load_checkpoint, load_model
from backbone.training.loop import predict, resolve_device
from experiments.common import cli, owning, print_report, report_parser, update_metrics
from experiments.config import load_config
from experiments.pretrain import load_backbone

STAGE = "cascade"
DEFAULT_BUDGETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
#: baselines/<prefix>k<blocks>.pt -> the ladder file whose masks they were trained with (experiments.compare).
LADDERS = {"subset_k": "ladder.json", "subset_nested_k": "ladder_nested.json"}


def fine_tuned_subsets(run_dir: Path) -> list[tuple[str, Path, torch.Tensor]]:
    """(name, model file, keep mask) of every fixed subset the run's comparison fine-tuned (at
    least one, else a ConfigError)."""
    found = []
    for prefix, ladder_file in LADDERS.items():
        files = sorted((run_dir / "baselines").glob(f"{prefix}[0-9]*.pt"))
        if not files:
            continue
        if not (run_dir / ladder_file).exists():
            raise ConfigError(f"{run_dir / ladder_file} is missing: the masks of {files[0].name} are in it")
        masks = json.loads((run_dir / ladder_file).read_text())["masks"]
        for f in files:
            k = int(f.stem[len(prefix):])
            found.append((f.stem, f, torch.tensor([c == "1" for c in masks[k]])))
    if not found:
        raise ConfigError(f"{run_dir / 'baselines'} holds no fine-tuned fixed subsets: run experiments.compare first "
                          f"(with fixed_subsets in the study)")
    return found


@torch.no_grad()
def cascades_of_run(run_dir: Path, backbone, cost, splits, budgets: list[float], device, max_stages: int = 3) -> dict:
    """The cascades of the fixed subsets ``run_dir``'s comparison fine-tuned (into ``backbone``,
    the full network) at each budget, beside the static envelope (see the module's docstring)."""
    subsets = fine_tuned_subsets(run_dir)
    if len(splits.val) == 0:
        raise ConfigError("the cascade's thresholds are chosen on the held-out split: set data.val_fraction > 0")

    def scored(name: str, model, mask: torch.Tensor) -> ScoredNetwork:
        keep = mask.to(device)
        run = lambda images: keep.expand(images.shape[0], -1)  # noqa: E731
        return ScoredNetwork(name, cost.mask_flops(mask).item() / cost.full_flops, mask,
                             predict(model, splits.val, keep_mask_fn=run), predict(model, splits.test, keep_mask_fn=run))

    full = scored("full backbone", backbone, torch.ones(backbone.num_blocks, dtype=torch.bool))
    smalls, train_time = [], {}
    for name, path, mask in subsets:
        smalls.append(scored(name, load_model(path, map_location=device).to(device).eval(), mask))
        train_time[name] = load_checkpoint(path).get("train_time_s")
    groups, names, how = difficulty_groups(backbone, splits.test)
    val_labels, labels = splits.val.labels.cpu(), splits.test.labels.cpu()
    rows = []
    for budget in budgets:
        cascade = cascade_for_budget(smalls, full, budget, val_labels, labels, groups, names, max_stages)
        if cascade is None:
            continue
        static = static_envelope_at([*smalls, full], labels, cascade["flops_ratio"])
        tuned = sum(train_time.get(name) or 0.0 for name in cascade["chain"])  # the full backbone's is every method's
        rows.append({**cascade, "fine_tuning_time_s": tuned, "static": static,
                     "gain_over_static": None if static is None else cascade["accuracy"] - static["mixture"]["accuracy"],
                     "gain_over_single": None if static is None else cascade["accuracy"] - static["single"]["accuracy"]})
    networks = [{"name": n.name, "mask": mask_string(n.mask), "flops_ratio": n.flops_ratio,
                 "accuracy": (n.test_logits.argmax(1) == labels).double().mean().item()} for n in [*smalls, full]]
    return {"networks": networks, "cascades": rows, "difficulty_groups": how,
            "held_out_images": len(splits.val), "test_images": len(splits.test)}


def cascade_study(run_dir: Path, budgets: list[float], max_stages: int = 3) -> dict:
    """:func:`cascades_of_run` of a finished run, stored in its ``metrics.json`` (``cascade``)."""
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    if max_stages not in (2, 3):
        raise ConfigError(f"--stages must be 2 or 3, got {max_stages}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ConfigError(f"--budgets must be FLOPs ratios in (0, 1], got {budgets}")
    fine_tuned_subsets(run_dir)  # fails before the data are loaded
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data)
    backbone = load_backbone(run_dir, device).eval()
    result = cascades_of_run(run_dir, backbone, measure_backbone_cost(backbone, image_size_of(splits.test)), splits,
                             budgets, device, max_stages)
    with owning(run_dir):
        update_metrics(run_dir, STAGE, result)
    return result


def print_text(result: dict) -> None:
    print(f"static networks (test top-1 on {result['test_images']} images):")
    for n in result["networks"]:
        print(f"  {n['name']:<22}{n['mask']:>20}  FLOPs {n['flops_ratio']:.3f}  {100 * n['accuracy']:.2f}%")
    print(f"cascades into the full backbone (small network and threshold chosen on {result['held_out_images']} "
          f"held-out images); static: the best single network of at most the cascade's FLOPs, and the best random "
          f"mixture of two at equal FLOPs (the gain is over the mixture):")
    print(f"{'budget':>7}{'networks':>32}{'sent on':>9}{'FLOPs':>7}{'top-1':>8}{'single':>25}{'mixture':>9}{'gain':>7}"
          f"{'blocks std':>11}{'hard-easy':>10}")
    for r in result["cascades"]:
        s, a = r["static"], r["adaptivity"]
        single = "-" if s is None else f"{s['single']['name']} {100 * s['single']['accuracy']:.2f}%"
        mixture = "-" if s is None else f"{100 * s['mixture']['accuracy']:.2f}%"
        gain = "" if r["gain_over_static"] is None else f"{100 * r['gain_over_static']:+.2f}"
        chain = " > ".join(name.replace("subset_", "") for name in r["chain"]).replace("full backbone", "full")
        print(f"{r['budget']:>7.2f}{chain:>32}{r['sent_on']:>9.3f}{r['flops_ratio']:>7.3f}{100 * r['accuracy']:>7.2f}%"
              f"{single:>25}{mixture:>9}{gain:>7}{a['blocks_used_std']:>11.2f}{a.get('hard_minus_easy_blocks', 0):>10.2f}")


def main() -> None:
    parser = report_parser(__doc__.splitlines()[0], "a run directory whose comparison fine-tuned fixed subsets")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                        help="FLOPs ratios (of the full backbone) to build a cascade for")
    parser.add_argument("--stages", type=int, default=3, help="most networks in a cascade: 2 or 3 (the last is the full backbone)")
    cli(lambda args: print_report(cascade_study(args.run, args.budgets, args.stages), args.json, print_text), parser)


if __name__ == "__main__":
    main()
