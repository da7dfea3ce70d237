"""Does per-image compute pay on this backbone? ``python -m experiments.cascade --run DIR [--budgets B ...] [--train-missing] [--with-run DIR2 [--every-other-last]] [--average] [--select-on-test SHARE] [--json]``.

Confidence cascades (``agents.cascade``) built from a finished comparison's own static networks:
each fine-tuned fixed subset (``baselines/subset_*.pt``, written by ``experiments.compare``) as
a small network, the full backbone as the last one: fine-tuned with the run's budget focused on
the images the cheapest subset is unsure of (``baselines/full_focused_on_<subset>.pt``,
:func:`agents.cascade.focused_loss`), or where the run has none, fine-tuned plainly
(``baselines/full.pt``, the comparison's "full backbone + fine-tuning") or as it is. Every other
subset is there fine-tuned both ways too (``baselines/<subset>_focused_on_<first>.pt``): the
focus is a better recipe for static networks as well, so the envelope holds both.
``--train-missing`` first trains the focused networks a run lacks, and the ladder's subsets that
bracket a budget but were never fine-tuned (the comparison fine-tunes those around its study
budgets only); ``experiments.compare`` always trains the focused ones. For every
FLOPs budget the chain and its thresholds are chosen on the held-out split, then the cascade is
scored on the test split beside what static networks reach at its FLOPs (every network above,
all three full backbones included, counts as one): the best single one of at most that
cost, and the best random mixture of two (the upper hull of the static points: its accuracy is
what the cascade's per-image choice must beat), with its adaptivity (blocks per image, blocks
per difficulty quartile of the full backbone's margin).
Training budget: the fine-tuning of the networks it chains (each the same as a static network's);
the full backbone as it is is every method's starting point. Stored in ``metrics.json`` (section
``cascade``). ``--with-run DIR2``: a second run on the same data (another backbone) lends its last
stage as a candidate and all its networks to the envelope; ``--average``: the last stage may
answer with its probabilities averaged with the sender's (both chosen on the held-out images).
``--select-on-test SHARE``: choose on that share of the test images and score on the rest, for
backbones that were trained on the held-out images too (public checkpoints). The chosen cascade
loads as one model with ``experiments.deployed_cascade.load_cascade``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from agents.adaptivity import difficulty_groups
from agents.cascade import (ScoredNetwork, cascade_decisions, cascade_for_budget, focused_loss,
                            gain_standard_error, split_test_for_selection, static_envelope_at)
from backbone.baselines import mask_string
from backbone.data.datasets import load_splits
from backbone.data.streaming import image_size_of
from backbone.errors import ConfigError
from backbone.models.cost import measure_backbone_cost
from backbone.models.weights import load_checkpoint, load_model
from backbone.training.loop import predict, resolve_device
from experiments.common import cli, owning, print_report, report_parser, update_metrics
from experiments.config import load_config
from experiments.curves import bracketing
from experiments.deployed_cascade import STAGE
from experiments.finetuned import finetuned_on_mask, finetuned_on_masks
from experiments.pretrain import load_backbone

FULL, FULL_FT = "full backbone", "full backbone + fine-tuning"
DEFAULT_BUDGETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
#: baselines/<prefix>k<blocks>.pt -> the ladder file whose masks they were trained with (experiments.compare).
LADDERS = {"subset_k": "ladder.json", "subset_nested_k": "ladder_nested.json"}
SUBSET_FILE = re.compile(r"(?P<prefix>subset_(?:nested_)?k)(?P<k>\d+)(?P<focus>_focused_on_\w+)?")


def fine_tuned_subsets(run_dir: Path, focused: bool = True) -> list[tuple[str, Path, torch.Tensor]]:
    """(name, model file, keep mask) of every fixed subset the run's comparison fine-tuned (at
    least one, else a ConfigError): ``baselines/subset_[nested_]k<blocks>.pt``, and with
    ``focused`` their copies fine-tuned on the first stage's unsure images
    (``..._focused_on_<first>.pt``, :func:`focused_subsets`), which share their masks."""
    found = []
    for path in sorted((run_dir / "baselines").glob("subset_*.pt")):
        match = SUBSET_FILE.fullmatch(path.stem)
        if match is None or (match["focus"] and not focused):
            continue
        ladder_file = run_dir / LADDERS[match["prefix"]]
        if not ladder_file.exists():
            raise ConfigError(f"{ladder_file} is missing: the masks of {path.name} are in it")
        masks = json.loads(ladder_file.read_text())["masks"]
        found.append((path.stem, path, torch.tensor([c == "1" for c in masks[int(match["k"])]])))
    if not found:
        raise ConfigError(f"{run_dir / 'baselines'} holds no fine-tuned fixed subsets: run experiments.compare first "
                          f"(with fixed_subsets in the study)")
    return found


def missing_envelope_subsets(run_dir: Path, cost, flops_ratios: list[float]) -> list[tuple[str, torch.Tensor]]:
    """(name, keep mask) of the subsets of the run's ladder (``ladder.json``) that bracket any of
    ``flops_ratios`` and have no fine-tuned file (by mask: a nested rung with the same blocks
    counts). The comparison fine-tunes the subsets around its study budgets only; a cascade
    scored at another budget would otherwise meet a static envelope that mixes distant networks,
    a weaker bound than the fine-tuned subsets of its size (ResNet-20 at 0.60-0.80 before session 12)."""
    path = run_dir / LADDERS["subset_k"]
    if not path.exists():
        return []
    masks = [torch.tensor([c == "1" for c in bits]) for bits in json.loads(path.read_text())["masks"]]
    ratios = [cost.mask_flops(m).item() / cost.full_flops for m in masks]
    have = {mask_string(mask) for _, _, mask in fine_tuned_subsets(run_dir, focused=False)}
    # Neither the empty rung nor the full one: the full backbone is fine-tuned as a last stage.
    wanted = set().union(*(bracketing(ratios, f) for f in flops_ratios)) - {0, len(masks) - 1}
    return [(f"subset_k{k}", masks[k]) for k in sorted(wanted) if mask_string(masks[k]) not in have]


def envelope_subsets(cfg, backbone, cost, splits, budgets: list[float]) -> None:
    """Fine-tune (plainly, the comparison's recipe) the subsets :func:`missing_envelope_subsets`
    names for ``budgets``, so the static envelope holds a fine-tuned subset on each side of every
    cascade; :func:`focused_subsets` then gives each its focused copy."""
    for name, mask in missing_envelope_subsets(cfg.run_dir, cost, budgets):
        finetuned_on_mask(cfg, backbone, name, mask, splits, resume=True)


def first_stage(run_dir: Path, cost) -> tuple[str, Path, torch.Tensor]:
    """The cheapest plainly fine-tuned subset by FLOPs: the cascades' usual first stage, whose
    unsure images the focused networks are trained on."""
    return min(fine_tuned_subsets(run_dir, focused=False), key=lambda s: cost.mask_flops(s[2]).item())


def focus_on(cfg, first: tuple[str, Path, torch.Tensor], device):
    """``loss_fn_for`` of :func:`experiments.finetuned.finetuned_on_masks`: the focused loss on
    the images ``first`` (:func:`first_stage`) is unsure of (the judge is loaded only for a
    network that is trained, not for one loaded from its file)."""
    _, path, mask = first
    return lambda trained: focused_loss(trained, load_model(path, map_location=device).to(device), mask,
                                        cfg.finetune.label_smoothing)


def focused_subsets(cfg, backbone, cost, splits, resume: bool) -> list[tuple]:
    """(name, model, fine-tuning seconds, keep mask) of every plainly fine-tuned subset but the
    first stage, fine-tuned again from ``backbone`` with the same budget and mask but
    :func:`agents.cascade.focused_loss` (``baselines/<subset>_focused_on_<first>.pt``; with
    ``resume`` the files the run has are loaded). Why: the focus is a better recipe for static
    subsets too (docs/results.md), so without these the cascades' focused stages would be scored
    against weaker static networks."""
    device = next(backbone.parameters()).device
    first = first_stage(cfg.run_dir, cost)
    focus, found = focus_on(cfg, first, device), []
    for name, _, mask in fine_tuned_subsets(cfg.run_dir, focused=False):
        if name == first[0]:
            continue
        focused = f"{name}_focused_on_{first[0]}"
        model, seconds = finetuned_on_mask(cfg, backbone, focused, mask, splits, resume, loss_fn_for=focus)
        found.append((focused, model.eval(), seconds, mask))
    return found


def last_stages(cfg, backbone, cost, splits, resume: bool, train_missing: bool, fine_tuned=None) -> list[tuple]:
    """(name, model, fine-tuning seconds, file in the run) of the full backbone as it is; fine-tuned
    with the run's budget (``baselines/full.pt``, the comparison's "full backbone + fine-tuning":
    the control); and fine-tuned with that budget and :func:`agents.cascade.focused_loss` on the
    images the first stage (:func:`first_stage`) is unsure of: the cascade's last stage is the
    last of these the run has, and each is a static network of the envelope. With
    ``train_missing`` the two fine-tuned ones are trained where the run has none (``fine_tuned``:
    the first, already trained by the caller), else only the existing files are used."""
    device = next(backbone.parameters()).device
    lasts = [(FULL, backbone, 0.0, "backbone.pt")]
    first = first_stage(cfg.run_dir, cost)
    files = {FULL_FT: "full", f"full backbone, focused on {first[0]}": f"full_focused_on_{first[0]}"}
    for label, name in files.items():
        path = cfg.run_dir / "baselines" / f"{name}.pt"
        file = f"baselines/{name}.pt"
        if label == FULL_FT and fine_tuned is not None:
            lasts.append((label, *fine_tuned, file))
        elif path.exists() and (resume or not train_missing):
            lasts.append((label, load_model(path, map_location=device).to(device).eval(), load_checkpoint(path)["train_time_s"],
                          file))
        elif train_missing:
            focus = None if name == "full" else focus_on(cfg, first, device)
            model, seconds = finetuned_on_masks(cfg, backbone, name, None, splits, resume, loss_fn_for=focus)
            lasts.append((label, model.eval(), seconds, file))
    return lasts


#: Most networks in a chain by default. With a focused last stage and a dozen subsets, the
#: held-out choice among three-network chains (on 5,000 images) overfits: the nine times it picked
#: one in session 12 it lost to the best two-network chain on test, by 0.05-0.55 points of gain
#: (docs/results.md, "A complete envelope").
DEFAULT_STAGES = 2


def scored_networks(run_dir: Path, lasts: list[tuple], subsets: list[tuple], cost, full_flops: float, splits, device,
                    prefix: str = "") -> tuple[list, list, dict, dict]:
    """(last stages, subsets) of a run as :class:`agents.cascade.ScoredNetwork` (logits on the
    held-out and test images, FLOPs over ``full_flops``), each one's fine-tuning seconds and file
    (relative to ``run_dir``) by name; names get ``prefix``."""
    def scored(name: str, model, mask: torch.Tensor) -> ScoredNetwork:
        keep = mask.to(device)
        run = lambda images: keep.expand(images.shape[0], -1)  # noqa: E731
        return ScoredNetwork(prefix + name, cost.mask_flops(mask).item() / full_flops, mask,
                             predict(model, splits.val, keep_mask_fn=run), predict(model, splits.test, keep_mask_fn=run))

    every_block = torch.ones(lasts[0][1].num_blocks, dtype=torch.bool)
    larges = [scored(name, model, every_block) for name, model, _, _ in lasts]
    train_time = {prefix + name: seconds for name, _, seconds, _ in lasts}
    files = {prefix + name: file for name, _, _, file in lasts}
    smalls = []
    for name, path, mask in subsets:
        smalls.append(scored(name, load_model(path, map_location=device).to(device).eval(), mask))
        train_time[prefix + name] = load_checkpoint(path).get("train_time_s")
        files[prefix + name] = os.path.relpath(path, run_dir)
    return larges, smalls, train_time, files


def other_run_networks(other: Path, run_dir: Path, splits, full_flops: float, device) -> tuple[list, list, dict, dict]:
    """The static networks of ``other``, a finished run on the same data as ``run_dir`` (e.g. a
    deeper backbone's): its fine-tuned subsets and full backbones, named ``"<run>: <network>"``,
    FLOPs over this run's full backbone (``full_flops``), files relative to ``run_dir``. They all
    join the static envelope, and its last stage is a candidate last stage of every cascade: two
    backbones share fewer of their errors than a backbone and its own subsets (docs/results.md,
    session 13)."""
    if not (other / "config.yaml").exists():
        raise ConfigError(f"--with-run {other} is not a run directory (no config.yaml)")
    # Where the run is now, whatever output_dir it was written with (it is only read here).
    other_cfg = load_config(other / "config.yaml", [f"output_dir={other.parent}", f"name={other.name}"])
    if other_cfg.data != load_config(run_dir / "config.yaml").data:
        raise ConfigError(f"--with-run {other} was trained on other data than {run_dir}: its networks cannot share "
                          f"a cascade's images (compare the data sections of their config.yaml)")
    backbone = load_backbone(other, device).eval()
    cost = measure_backbone_cost(backbone, image_size_of(splits.test))
    lasts = [(name, model, seconds, os.path.relpath(other / file, run_dir))
             for name, model, seconds, file in last_stages(other_cfg, backbone, cost, splits, resume=True, train_missing=False)]
    larges, smalls, train_time, files = scored_networks(run_dir, lasts, fine_tuned_subsets(other), cost, full_flops, splits,
                                                        device, prefix=f"{other.name}: ")
    return [*smalls, *larges], larges, train_time, files


@torch.no_grad()
def cascades_of_run(run_dir: Path, lasts: list[tuple], cost, splits, budgets: list[float], device,
                    max_stages: int = DEFAULT_STAGES, with_run: Path | None = None, average: bool = False,
                    every_other_last: bool = False, select_on_test: float = 0.0, seed: int = 0) -> dict:
    """The cascades of the fixed subsets ``run_dir``'s comparison fine-tuned into the last network
    of ``lasts`` (:func:`last_stages`: the one trained for the images it gets, where the run has
    it), at each budget (chain and thresholds chosen on the held-out images), beside the static
    envelope of all these networks (see the module's docstring). The last stage is not chosen
    per budget: on 5,000 held-out images that choice among full backbones 0.3 points apart on
    test was noise (docs/results.md). ``with_run``: another run on the same data, whose networks
    join the envelope and whose last stage is a second candidate, chosen per budget on the held-out
    images (:func:`other_run_networks`), or with ``every_other_last`` each of its networks;
    ``average``: see :func:`agents.cascade.cascade_for_budget`; ``select_on_test``: choose on that
    share of the test images (drawn with ``seed``) instead of the held-out ones and score on the
    rest (:func:`agents.cascade.split_test_for_selection`)."""
    subsets = fine_tuned_subsets(run_dir)
    if len(splits.val) == 0:
        raise ConfigError("the cascade's thresholds are chosen on the held-out split: set data.val_fraction > 0")

    backbone = lasts[0][1]
    larges, smalls, train_time, files = scored_networks(run_dir, lasts, subsets, cost, cost.full_flops, splits, device)
    others, other_larges = [], []
    if with_run is not None:
        others, other_larges, other_times, other_files = other_run_networks(with_run, run_dir, splits, cost.full_flops, device)
        train_time.update(other_times)
        files.update(other_files)
    groups, names, how = difficulty_groups(backbone, splits.test)
    val_labels, labels = splits.val.labels.cpu(), splits.test.labels.cpu()
    statics = [*smalls, *larges, *others]
    other_lasts = others if every_other_last else other_larges[-1:]
    if select_on_test:
        statics, val_labels, labels, scored = split_test_for_selection(statics, labels, select_on_test, seed)
        groups = groups[scored]
    by_name = {n.name: n for n in statics}
    smalls, larges, other_lasts = ([by_name[n.name] for n in group] for group in (smalls, larges, other_lasts))
    rows = []
    for budget in budgets:
        found = [cascade_for_budget(smalls, last, budget, val_labels, labels, groups, names, max_stages, average)
                 for last in [larges[-1], *other_lasts]]
        found = [c for c in found if c is not None]
        if not found:
            continue
        cascade = max(found, key=lambda c: c["held_out_accuracy"])  # the last stage, chosen on held-out images
        static = static_envelope_at(statics, labels, cascade["flops_ratio"])
        tuned = sum(train_time.get(name) or 0.0 for name in cascade["chain"])  # the full backbone's is every method's
        correct = cascade_decisions([by_name[name] for name in cascade["chain"]], cascade["thresholds"],
                                    average=cascade["averaged"])[0] == labels
        rows.append({**cascade, "fine_tuning_time_s": tuned, "static": static,
                     "gain_over_static": None if static is None else cascade["accuracy"] - static["mixture"]["accuracy"],
                     "gain_standard_error": None if static is None else gain_standard_error(correct, static, by_name, labels),
                     "gain_over_single": None if static is None else cascade["accuracy"] - static["single"]["accuracy"],
                     "envelope_lacks": [name for name, _ in missing_envelope_subsets(run_dir, cost, [cascade["flops_ratio"]])]})
    networks = [{"name": n.name, "mask": mask_string(n.mask), "flops_ratio": n.flops_ratio, "file": files[n.name],
                 "accuracy": (n.test_logits.argmax(1) == labels).double().mean().item()} for n in statics]
    return {"networks": networks, "cascades": rows, "difficulty_groups": how,
            "selected_on": "test" if select_on_test else "held-out", "held_out_images": len(val_labels),
            "test_images": len(labels)}


def cascade_study(run_dir: Path, budgets: list[float], max_stages: int = DEFAULT_STAGES, train_missing: bool = False,
                  with_run: Path | None = None, average: bool = False, every_other_last: bool = False,
                  select_on_test: float = 0.0) -> dict:
    """:func:`cascades_of_run` of a finished run, stored in its ``metrics.json`` (``cascade``);
    ``train_missing``: first fine-tune the focused networks the run lacks (:func:`focused_subsets`,
    :func:`last_stages`); the rest: see :func:`cascades_of_run` (the test images drawn with the
    run's data split seed)."""
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    if max_stages not in (2, 3):
        raise ConfigError(f"--stages must be 2 or 3, got {max_stages}")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ConfigError(f"--budgets must be FLOPs ratios in (0, 1], got {budgets}")
    if not 0 <= select_on_test < 1:
        raise ConfigError(f"--select-on-test must be a share of the test images in (0, 1), got {select_on_test}")
    if every_other_last and with_run is None:
        raise ConfigError("--every-other-last offers --with-run's networks as last stages: give --with-run DIR")
    fine_tuned_subsets(run_dir)  # fails before the data are loaded
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data)
    backbone = load_backbone(run_dir, device).eval()
    with owning(run_dir):
        cost = measure_backbone_cost(backbone, image_size_of(splits.test))
        if train_missing:
            envelope_subsets(cfg, backbone, cost, splits, budgets)
            focused_subsets(cfg, backbone, cost, splits, resume=True)
        lasts = last_stages(cfg, backbone, cost, splits, resume=True, train_missing=train_missing)
        result = cascades_of_run(run_dir, lasts, cost, splits, budgets, device, max_stages, with_run, average,
                                 every_other_last, select_on_test, cfg.data.split_seed + 4)
        update_metrics(run_dir, STAGE, result)
    return result


def print_text(result: dict) -> None:
    scored_on = "the other" if result.get("selected_on") == "test" else "all"
    print(f"static networks (test top-1 on {scored_on} {result['test_images']} test images):")
    width = max(len(n["name"]) for n in result["networks"]) + 2  # another run's names are longer
    for n in result["networks"]:
        print(f"  {n['name']:<{width}}{n['mask']:>22}  FLOPs {n['flops_ratio']:.3f}  {100 * n['accuracy']:.2f}%")
    print(f"cascades into the full backbone, as it is or fine-tuned (plainly, or focused on the images the cheapest "
          f"subset is unsure of), or into --with-run's (avg: answers averaged with the sender's); networks and "
          f"thresholds chosen on {result['held_out_images']} {chosen_on(result)} images; "
          f"static: the best single network of at most the cascade's FLOPs, and the best random mixture of two at "
          f"equal FLOPs (the gain is over the mixture, with its standard error paired over the test images):")
    print(f"{'budget':>7}{'networks':>60}{'sent on':>9}{'FLOPs':>7}{'top-1':>8}{'single':>25}{'mixture':>9}{'gain ± s.e.':>14}"
          f"{'blocks std':>11}{'hard-easy':>10}")
    for r in result["cascades"]:
        s, a = r["static"], r["adaptivity"]
        single = "-" if s is None else f"{short(s['single']['name'])} {100 * s['single']['accuracy']:.2f}%"
        mixture = "-" if s is None else f"{100 * s['mixture']['accuracy']:.2f}%"
        gain = "" if r["gain_over_static"] is None else f"{100 * r['gain_over_static']:+.2f}"
        if r.get("gain_standard_error") is not None:  # absent in metrics written before session 12
            gain += f" ± {100 * r['gain_standard_error']:.2f}"
        chain = " > ".join(short(name) for name in r["chain"]) + (" (avg)" if r.get("averaged") else "")
        print(f"{r['budget']:>7.2f}{chain:>60}{r['sent_on']:>9.3f}{r['flops_ratio']:>7.3f}{100 * r['accuracy']:>7.2f}%"
              f"{single:>25}{mixture:>9}{gain:>14}{a['blocks_used_std']:>11.2f}{a.get('hard_minus_easy_blocks', 0):>10.2f}")
    for r in result["cascades"]:
        if r.get("envelope_lacks"):
            print(f"note: at {r['flops_ratio']:.3f} of the FLOPs the static envelope lacks the fine-tuned "
                  f"{', '.join(r['envelope_lacks'])} (a weaker bound; --train-missing fine-tunes them)")


def chosen_on(result: dict) -> str:
    """Which images the cascades were chosen on ("held-out" in metrics written before session 14)."""
    return "test" if result.get("selected_on") == "test" else "held-out"


def short(name: str) -> str:
    """A network's name for the table: "k10 focused" for "subset_k10_focused_on_subset_k7"."""
    name = re.sub(r"_focused_on_\w+|, focused on \w+", " focused", name)
    return name.replace("subset_", "").replace("full backbone + fine-tuning", "full ft").replace("full backbone", "full")


def main() -> None:
    parser = report_parser(__doc__.splitlines()[0], "a run directory whose comparison fine-tuned fixed subsets")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                        help="FLOPs ratios (of the full backbone) to build a cascade for")
    parser.add_argument("--stages", type=int, default=DEFAULT_STAGES,
                        help="most networks in a cascade: 2 (default) or 3 (the last is the full backbone; the held-out "
                             "choice among three-network chains overfits where a run has many subsets)")
    parser.add_argument("--train-missing", "--train-last", action="store_true", dest="train_missing",
                        help="first fine-tune the networks the run has no file of yet: the ladder's subsets on each side "
                             "of every budget, the full backbone plainly (the control), and it and every subset but the "
                             "cheapest focused on the images the cheapest subset is unsure of (one fine-tuning budget each)")
    parser.add_argument("--with-run", type=Path, default=None, metavar="DIR",
                        help="another finished run on the same data (e.g. a deeper backbone's): its networks join the "
                             "static envelope, and its last stage is a second candidate last stage, chosen per budget "
                             "on the held-out images (FLOPs stay ratios of this run's full backbone)")
    parser.add_argument("--average", action="store_true",
                        help="the last stage may answer with its probabilities averaged with those of the stage that "
                             "sent the image on (both are computed), where that scores better on the held-out images")
    parser.add_argument("--every-other-last", action="store_true",
                        help="with --with-run: every network of that run is a candidate last stage, not its full one")
    parser.add_argument("--select-on-test", type=float, default=0.0, metavar="SHARE",
                        help="choose chains and thresholds on this share of the test images (a fixed random draw) and "
                             "score on the rest, instead of choosing on the held-out images: for backbones that were "
                             "trained on the held-out images (public checkpoints trained on the whole training set)")
    cli(lambda args: print_report(cascade_study(args.run, args.budgets, args.stages, args.train_missing, args.with_run,
                                                args.average, args.every_other_last, args.select_on_test),
                                  args.json, print_text), parser)


if __name__ == "__main__":
    main()
