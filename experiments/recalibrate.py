"""How much of a skipped path's accuracy loss is BatchNorm statistics? ``python -m experiments.recalibrate --run DIR [--tag T] [--images N] [--json]``.

A backbone trained with every block (or with stochastic depth) normalises each block's input
with statistics of the full network; once blocks are skipped, the activations they see change.
For every mask of the run's fixed-subset ladder this re-estimates the BatchNorm statistics on
``--images`` training images run through that mask (``backbone.training.evaluation.
recalibrate_batchnorm``: no weights change) and scores the test split with the backbone's own
statistics and with the path's. Then the trained ladder policy ``--tag`` (before fine-tuning,
on the pretrained backbone) is scored both ways: each test image through the rung the policy
picks, with one set of statistics for all rungs or with its rung's own. The difference says
whether per-path statistics (switchable BatchNorm, as slimmable networks use per width) would
help the policy, and how much of a fixed subset's fine-tuning gain a pass of statistics alone
gives. Beside the policy: the same rungs in the same proportions with each image's rung drawn at
random (same FLOPs), so what the per-image choice itself adds is one number (``routing_gain``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from backbone.data.datasets import load_splits
from backbone.errors import ConfigError
from backbone.models.cost import measure_backbone_cost
from backbone.training.evaluation import recalibrate_batchnorm
from experiments.common import cli, print_report, report_parser
from experiments.compare import predict_correct
from experiments.evaluate import load_final_pair
from experiments.train_policy import policy_dir


@torch.no_grad()
def recalibration_study(run_dir: Path, tag: str = "policy", num_images: int = 2560, seed: int = 0,
                        finetuned: bool = False) -> dict:
    from agents.pair import greedy_decisions

    if num_images < 1:
        raise ConfigError(f"--images must be at least 1, got {num_images}")
    cfg, _, _, ladder, pair, device = load_final_pair(run_dir, tag, finetuned=finetuned)
    if ladder is None:
        raise ConfigError(f"{policy_dir(run_dir, tag)} holds no ladder policy (policy.zip and ladder.json): train one "
                          f"with experiments.train_policy and policy.action: ladder")
    splits = load_splits(cfg.data)
    if not hasattr(splits.train, "images"):
        raise ConfigError("experiments.recalibrate needs an in-memory dataset (not a streamed one)")
    pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:num_images]
    backbone, calibration, test = pair.backbone, splits.train.images[pick].to(device), splits.test
    # A ladder policy's greedy action is the index of its rung.
    rungs = torch.cat([greedy_decisions(pair.policy, pair.observe(x, backbone.stem(x)))
                       for x in test.images.to(device).split(500)]).cpu()
    cost = measure_backbone_cost(backbone)
    rows, correct_own, correct_path = [], 0, 0
    for r, mask in enumerate(ladder):
        own = predict_correct(backbone, test, mask)
        path = predict_correct(recalibrate_batchnorm(backbone, calibration, mask), test, mask)
        routed = rungs == r
        correct_own, correct_path = correct_own + int(own[routed].sum()), correct_path + int(path[routed].sum())
        rows.append({"rung": r, "blocks": int(mask.sum()), "flops_ratio": cost.mask_flops(mask).item() / cost.full_flops,
                     "accuracy": own.float().mean().item(), "accuracy_recalibrated": path.float().mean().item(),
                     "policy_images": int(routed.sum())})
    policy_flops = sum(row["flops_ratio"] * row["policy_images"] for row in rows) / len(rungs)
    # What the per-image choice is worth: the same rungs in the same proportions, each image given
    # a rung at random (expected accuracy), costs the same FLOPs; the difference is the routing's.
    same_rungs_at_random = sum(row["accuracy"] * row["policy_images"] for row in rows) / len(rungs)
    return {"run": str(run_dir), "tag": tag, "finetuned": finetuned, "calibration_images": len(calibration), "test_images": len(rungs),
            "rungs": rows, "policy": {"flops_ratio": policy_flops, "accuracy": correct_own / len(rungs),
                                      "accuracy_per_rung_statistics": correct_path / len(rungs),
                                      "same_rungs_at_random": same_rungs_at_random,
                                      "routing_gain": correct_own / len(rungs) - same_rungs_at_random}}


def main() -> None:
    parser = report_parser(__doc__.splitlines()[0], "a run directory with a trained ladder policy")
    parser.add_argument("--tag", default="policy", help="which of the run's policies (e.g. lam0.055)")
    parser.add_argument("--images", type=int, default=2560, help="training images per path for the statistics")
    parser.add_argument("--finetuned", action="store_true",
                        help="the jointly fine-tuned pair (its backbone, policy and ladder) instead of the policy before")

    def print_text(result: dict) -> None:
        print(f"BatchNorm statistics per path ({result['calibration_images']} training images each), "
              f"test top-1 on {result['test_images']} images:")
        print(f"{'rung':>5}{'blocks':>8}{'FLOPs':>8}{'own stats':>11}{'path stats':>12}{'policy images':>15}")
        for r in result["rungs"]:
            print(f"{r['rung']:>5}{r['blocks']:>8}{r['flops_ratio']:>8.3f}{100 * r['accuracy']:>10.2f}%"
                  f"{100 * r['accuracy_recalibrated']:>11.2f}%{r['policy_images']:>15}")
        p = result["policy"]
        print(f"policy {result['tag']} at {p['flops_ratio']:.3f} of the FLOPs: {100 * p['accuracy']:.2f}% with the "
              f"backbone's statistics, {100 * p['accuracy_per_rung_statistics']:.2f}% with each rung's own")
        print(f"the same rungs in the same proportions, each image's rung drawn at random: {100 * p['same_rungs_at_random']:.2f}% "
              f"(what the policy's per-image choice adds: {100 * p['routing_gain']:+.2f} points)")

    cli(lambda args: print_report(recalibration_study(args.run, args.tag, args.images, finetuned=args.finetuned), args.json, print_text), parser)


if __name__ == "__main__":
    main()
