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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from agents.adaptivity import difficulty_groups
from backbone.data.datasets import load_splits
from backbone.errors import ConfigError
from envs.observations import stem_features_of
from experiments.common import cli
from experiments.config import load_config
from experiments.pretrain import backbone_path, load_backbone
from experiments.train_policy import policy_images


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
    return {"groups": how, "train_images": len(train), "test_images": len(splits.test), "probes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with a pretrained backbone")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--debug", action="store_true")

    def run(args) -> None:
        result = probe_run(args.run)
        if args.json:
            json.dump(result, sys.stdout)
            print()
            return
        print(f"difficulty groups: {result['groups']}; probes fit on {result['train_images']} policy images, "
              f"scored on {result['test_images']} test images")
        for name, r in result["probes"].items():
            print(f"  {name:<16} ({r['features']:>4} features): group accuracy {r['group_accuracy']:.3f} "
                  f"(chance {r['chance']:.2f}), correlation {r['correlation']:.3f}")

    cli(run, parser)


if __name__ == "__main__":
    main()
