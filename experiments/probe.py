"""What could a policy know about an image's difficulty? ``python -m experiments.probe --run DIR [--json]``.

A policy can only be input-adaptive if what it observes says how hard an image is for the
backbone. This fits a linear probe (multinomial logistic regression) from each candidate
observation to the image's difficulty group (``agents.adaptivity.difficulty_groups``: the
synthetic levels, or quartiles of the full backbone's true-class margin) on the policy's
training images, and scores it on the test split: the share of test images whose group it gets
right (chance: 1 / number of groups) and the correlation between its expected group and the true
one. Candidates: the raw pixels (8x8 average-pooled), the stem observation (``envs.observations``),
and the same statistics after the first stage of blocks (which a one-shot policy cannot see
without forcing those blocks on).

Then the **learnable bound** of a per-image policy that picks one mask of the run's fixed-subset
ladder per image (``policy.action: ladder``): for each observation, a logistic probe per rung
predicts whether that rung classifies the image correctly (fit on the policy's images), and the
policy runs the rung with the best predicted correctness minus μ·FLOPs, over a range of μ. Its
accuracy-vs-FLOPs curve, read at ``study.budgets`` beside the fixed subsets themselves, a policy
that knows each image's difficulty group (an oracle: on real data the groups come from the full
backbone's margin) and the per-image oracle, says how much any policy with that observation can
gain over the best fixed subset on this backbone, before fine-tuning. RL that lands on the
probe's curve has learned what the observation allows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from agents.adaptivity import difficulty_groups
from backbone.baselines import mask_string, oracle_curve
from backbone.data.datasets import load_splits
from backbone.errors import ConfigError
from backbone.models.cost import measure_backbone_cost
from envs.observations import stem_features_of
from experiments.common import cli, print_report, report_parser
from experiments.compare import predict_correct
from experiments.config import load_config
from experiments.curves import accuracy_at, point
from experiments.pretrain import backbone_path, load_backbone
from experiments.train_policy import policy_images, run_ladder


@torch.no_grad()
def candidate_features(backbone, images: torch.Tensor, grid: int = 4, chunk: int = 500) -> dict[str, torch.Tensor]:
    """(N, D) features per candidate observation of uint8 ``images``."""
    out: dict[str, list[torch.Tensor]] = {"pixels (8x8)": [], "stem": [], "after stage 1": []}
    first_stage = backbone.num_blocks // 3
    for s in range(0, len(images), chunk):
        x = images[s:s + chunk]
        h = backbone.stem(x)
        out["pixels (8x8)"].append(F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1))
        out["stem"].append(stem_features_of(h, grid))
        for block in backbone.blocks[:first_stage]:
            h = block(h)
        out["after stage 1"].append(stem_features_of(h, grid))
    return {k: torch.cat(v) for k, v in out.items()}


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              groups: int, steps: int = 500, seed: int = 0) -> dict:
    """Standardised features → logistic regression (Adam, weight decay) → test scores."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], groups)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = probe(x_test)
        expected = (logits.softmax(1) * torch.arange(groups)).sum(1)
        corr = torch.corrcoef(torch.stack([expected, y_test.float()]))[0, 1].item()
    return {"group_accuracy": (logits.argmax(1) == y_test).float().mean().item(), "correlation": corr,
            "chance": 1 / groups, "features": int(x_train.shape[1])}


def fit_rung_predictor(x_train: torch.Tensor, correct_train: torch.Tensor, x_test: torch.Tensor,
                       steps: int = 500, seed: int = 0) -> torch.Tensor:
    """Per image and rung, the predicted probability that the rung classifies the test image
    correctly: standardised features → one logistic unit per rung (Adam, weight decay)."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], correct_train.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3, weight_decay=1e-3)
    target = correct_train.float()
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe(x_train), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.sigmoid(probe(x_test))


def decision_curve(score: torch.Tensor, correct: torch.Tensor, flops_ratio: torch.Tensor, steps: int = 61) -> list[dict]:
    """Accuracy-vs-FLOPs points of the policy that gives image n the rung maximising
    ``score[n, k] − μ·flops_ratio[k]``, for μ from 0 to 3 (``score``: (N, K), or (1, K) for one
    choice for all images)."""
    rows = torch.arange(correct.shape[0])
    points = []
    for mu in torch.linspace(0, 3, steps).tolist():
        choice = (score - mu * flops_ratio).argmax(1).expand(correct.shape[0])
        points.append(point(flops_ratio[choice].mean().item(), correct[rows, choice].float().mean().item(), mu=round(mu, 3)))
    return points


@torch.no_grad()
def rung_correctness(backbone, dataset, ladder: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: image n is classified correctly when every image runs rung k's mask."""
    return torch.stack([predict_correct(backbone, dataset, mask) for mask in ladder], 1)


def policy_bound(cfg, backbone, splits, train, f_train: dict, f_test: dict, groups: tuple) -> dict:
    """The learnable bound of a ladder policy (see the module docstring), read at ``study.budgets``."""
    ladder = run_ladder(cfg, backbone, splits)
    masks, flops = ladder["masks"], torch.tensor(ladder["flops"], dtype=torch.float64)
    full = measure_backbone_cost(backbone, splits.test.images.shape[-1]).full_flops
    ratio = (flops / full).float()
    c_train, c_test = rung_correctness(backbone, train, masks), rung_correctness(backbone, splits.test, masks)
    (g_train, g_test) = groups
    by_group = torch.stack([c_train[g_train == g].float().mean(0) for g in range(int(g_train.max()) + 1)])
    curves = {
        "fixed subset": decision_curve(c_train.float().mean(0, keepdim=True), c_test, ratio),
        "knows the difficulty group (oracle)": decision_curve(by_group[g_test], c_test, ratio),
    }
    for name in f_train:
        curves[f"probe policy on {name}"] = decision_curve(fit_rung_predictor(f_train[name], c_train, f_test[name]), c_test, ratio)
    oracle = oracle_curve(c_test.t(), flops, full)
    curves["oracle (per image)"] = [point(f, a) for f, a in zip(oracle["flops_ratio"], oracle["accuracy"])]
    budgets = list(cfg.study.budgets)
    return {"budgets": budgets, "ladder": [mask_string(m) for m in masks],
            "at_budgets": {name: [accuracy_at(pts, b) for b in budgets] for name, pts in curves.items()},
            "curves": curves, "reward_optimum": [reward_optimum(c_test, masks, g_test, lam) for lam in sorted(cfg.lambdas)]}


def reward_optimum(correct: torch.Tensor, ladder: torch.Tensor, groups: torch.Tensor, lam: float) -> dict:
    """Blocks per difficulty group of the best possible ladder policy for the linear reward
    ``correct − λ·blocks``: image n gets the rung maximising it (the cheapest on ties). An image no
    rung classifies correctly is best served by the cheapest rung, so whether hard images *should*
    get more blocks depends on how many of them are hopeless."""
    blocks = ladder.sum(1).to(torch.float64)
    choice = (correct.to(torch.float64) - lam * blocks).argmax(1)  # first maximum: rungs run cheapest first
    used, right = blocks[choice], correct[torch.arange(len(choice)), choice].float()
    by_group = [{"blocks_used": used[groups == g].mean().item(), "accuracy": right[groups == g].mean().item(),
                 "hopeless": (~correct[groups == g].any(1)).float().mean().item()}
                for g in range(int(groups.max()) + 1)]
    return {"lam": lam, "accuracy": right.mean().item(), "blocks_used": used.mean().item(), "by_group": by_group,
            "hard_minus_easy_blocks": by_group[-1]["blocks_used"] - by_group[0]["blocks_used"]}


def probe_run(run_dir: Path) -> dict:
    if not (run_dir / "config.yaml").exists() or not backbone_path(run_dir).exists():
        raise ConfigError(f"{run_dir} is not a run directory with a backbone (config.yaml, backbone.pt)")
    cfg = load_config(run_dir / "config.yaml")
    backbone = load_backbone(run_dir).eval()
    splits = load_splits(cfg.data)
    train = policy_images(cfg, splits)[0]
    (y_train, names, how), (y_test, _, _) = difficulty_groups(backbone, train), difficulty_groups(backbone, splits.test)
    f_train, f_test = candidate_features(backbone, train.images), candidate_features(backbone, splits.test.images)
    results = {name: fit_probe(f_train[name], y_train, f_test[name], y_test, len(names)) for name in f_train}
    bound = policy_bound(cfg, backbone, splits, train, f_train, f_test, (y_train, y_test))
    return {"groups": how, "train_images": len(train), "test_images": len(splits.test), "probes": results,
            "policy_bound": bound}


def main() -> None:
    parser = report_parser(__doc__.splitlines()[0], "a run directory with a pretrained backbone")

    def print_text(result: dict) -> None:
        print(f"difficulty groups: {result['groups']}; probes fit on {result['train_images']} policy images, "
              f"scored on {result['test_images']} test images")
        for name, r in result["probes"].items():
            print(f"  {name:<16} ({r['features']:>4} features): group accuracy {r['group_accuracy']:.3f} "
                  f"(chance {r['chance']:.2f}), correlation {r['correlation']:.3f}")
        bound = result["policy_bound"]
        print("\nlearnable bound of a ladder policy (test top-1 at each FLOPs budget, before fine-tuning):")
        print("  " + " " * 44 + "".join(f"{100 * b:>8.0f}%" for b in bound["budgets"]))
        for name, values in bound["at_budgets"].items():
            print(f"  {name:<44}" + "".join("        -" if v is None else f"{100 * v:>8.2f}%" for v in values))
        print("\nthe reward's own optimum per image (linear reward, best rung per test image): blocks per group, "
              "easiest → hardest (share of images no rung gets right)")
        for opt in bound["reward_optimum"]:
            groups = " → ".join(f"{g['blocks_used']:.2f} ({100 * g['hopeless']:.0f}%)" for g in opt["by_group"])
            print(f"  λ {opt['lam']:<6} top-1 {100 * opt['accuracy']:.2f}%, {opt['blocks_used']:.2f} blocks: {groups}; "
                  f"hardest − easiest {opt['hard_minus_easy_blocks']:+.2f}")

    cli(lambda args: print_report(probe_run(args.run), args.json, print_text), parser)


if __name__ == "__main__":
    main()
