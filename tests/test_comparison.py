"""The comparison's machinery: exhaustive fixed subsets, the oracle, static networks of equal
FLOPs, and reading curves at matched FLOPs."""

import json

import pytest
import torch

from backbone import build_resnet
from backbone.baselines import (
    all_mask_correctness,
    beam_search_subsets,
    fixed_mask_accuracy,
    mask_table,
    oracle_curve,
    static_family_for_flops,
    subset_ladder,
)
from backbone.data.datasets import make_synthetic
from backbone.models.cost import measure_backbone_cost
from experiments.curves import accuracy_at, headline, point, seed_summary, train_time_at


def _random_bn(model):
    for block in model.blocks:
        torch.nn.init.uniform_(block.bn2.weight, 0.5, 1.5)
        torch.nn.init.normal_(block.bn2.bias, std=0.1)
    return model.eval()


def test_every_mask_scored_in_one_pass_equals_scoring_each_mask():
    torch.manual_seed(0)
    model, data = _random_bn(build_resnet(14, num_classes=4, width=4, shortcut="B")), make_synthetic(40, num_classes=4)
    correct = all_mask_correctness(model, data, batch_size=16)  # several batches
    table = mask_table(model.num_blocks)
    assert correct.shape == (64, 40) and table.shape == (64, 6)
    for m in (0, 5, 22, 63):
        with torch.no_grad():
            expected = model(data.images, table[m].expand(40, -1)).argmax(1) == data.labels
        assert torch.equal(correct[m], expected), m


def test_ladder_is_the_best_subset_of_every_size():
    torch.manual_seed(1)
    model, data = _random_bn(build_resnet(14, num_classes=4, width=4)), make_synthetic(48, num_classes=4, seed=3)
    ladder = subset_ladder(model, data)
    accuracy = all_mask_correctness(model, data).double().mean(1)
    sizes = mask_table(6).sum(1)
    assert ladder["search"] == "exhaustive" and ladder["masks"].shape == (7, 6)
    for k in range(7):
        assert int(ladder["masks"][k].sum()) == k
        assert ladder["held_out_accuracy"][k] == pytest.approx(accuracy[sizes == k].max().item())
    assert ladder["held_out_accuracy"][6] == pytest.approx(fixed_mask_accuracy(model, data, torch.ones(6, dtype=torch.bool)))


def test_beam_search_beyond_the_exhaustive_limit():
    torch.manual_seed(2)
    model = _random_bn(build_resnet(32, num_classes=4, width=2))  # 15 blocks: 32,768 masks
    data = make_synthetic(24, num_classes=4, seed=4)
    with pytest.raises(ValueError, match="beam_search"):
        all_mask_correctness(model, data)
    best = beam_search_subsets(model, data, beam=2)
    assert sorted(best) == list(range(16)) and all(int(best[k].sum()) == k for k in best)
    assert subset_ladder(model, data)["search"] == "beam"


def test_oracle_gives_each_image_its_cheapest_correct_mask():
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # 3 candidates x 4 images
    curve = oracle_curve(correct, torch.tensor([1.0, 2.0, 4.0]), full_flops=4.0)
    # Image 0 right at the cheapest mask, image 1 needs +1 FLOP, image 2 +3, image 3 never.
    assert curve["accuracy"] == [0.25, 0.5, 0.75] and curve["flops_ratio"] == pytest.approx([0.25, 0.3125, 0.5])
    assert curve["max_accuracy"] == 0.75 and curve["flops_ratio_at_max"] == pytest.approx(0.5)


@pytest.mark.parametrize("width,budget", [(8, 0.5), (16, 0.5), (16, 0.65)])
def test_a_static_network_within_3_percent_of_the_budget(width, budget):
    like = build_resnet(20, num_classes=10, width=width)
    full = measure_backbone_cost(like).full_flops
    depth, w, flops = static_family_for_flops(budget * full, like)
    assert abs(flops / full - budget) <= 0.03 * budget
    assert measure_backbone_cost(build_resnet(depth, 10, width=w)).full_flops == flops


def test_curves_are_read_at_the_budget_without_extrapolation():
    curve = [point(0.4, 0.70, 10), point(0.6, 0.80, 20), point(0.8, 0.79, 30)]
    assert accuracy_at(curve, 0.5) == pytest.approx(0.75)  # linear between the bracketing points
    assert accuracy_at(curve, 0.7) == pytest.approx(0.80)  # the envelope: a cheaper point is always allowed
    assert accuracy_at(curve, 0.9) == pytest.approx(0.80)  # spending less than the budget is allowed
    assert accuracy_at(curve, 0.3) is None  # no point is cheap enough: no extrapolation
    assert accuracy_at([point(0.51, 0.8)], 0.5) == 0.8 and accuracy_at([point(0.52, 0.8)], 0.5) is None  # 3%
    assert train_time_at(curve, 0.5) == 20
    # Two points at one FLOPs (two masks of the same size): the curve runs through the better one.
    two = [point(0.4, 0.70), point(0.6, 0.72), point(0.6, 0.80), point(0.4, 0.60)]
    assert accuracy_at(two, 0.5) == pytest.approx(0.75) and accuracy_at(two, 0.4) == pytest.approx(0.70)


def test_headline_names_the_winner_and_seeds_give_mean_and_std():
    curves = {"a": [point(0.4, 0.7), point(0.6, 0.8)], "b": [point(0.5, 0.78)], "full": [point(1.0, 0.9)]}
    rows = headline(curves, [0.5, 0.6])
    assert rows[0]["winner"] == "b" and rows[0]["accuracy"]["full"] is None
    assert rows[1]["winner"] == "a" and rows[1]["accuracy"]["a"] == pytest.approx(0.8)
    other = headline({"a": [point(0.4, 0.6), point(0.6, 0.7)], "b": [point(0.5, 0.70)]}, [0.5, 0.6])
    summary = seed_summary([rows, other])
    assert summary[0]["methods"]["a"]["mean"] == pytest.approx(0.7) and summary[0]["winner"] == "b"
    assert summary[0]["methods"]["b"]["std"] == pytest.approx(0.0566, abs=1e-4)


def test_shared_backbone_brings_its_static_networks(tmp_path):
    """study.share_backbone: a later seed gets the first seed's backbone, ladder and from-scratch
    static networks (nothing the seeds vary goes into them), not its fine-tuned baselines."""
    import json

    from experiments.run import share_backbone

    source, target = tmp_path / "seed0", tmp_path / "seed1"
    (source / "baselines").mkdir(parents=True)
    target.mkdir()
    for name in ("backbone.pt", "ladder.json", "baselines/static_d8_w4.pt", "baselines/subset_k2.pt"):
        (source / name).write_text(name)
    (source / "metrics.json").write_text(json.dumps({"pretrain": {"test_accuracy": 0.5}}))
    share_backbone(source, target)
    assert (target / "baselines" / "static_d8_w4.pt").read_text() == "baselines/static_d8_w4.pt"
    assert not (target / "baselines" / "subset_k2.pt").exists()  # fine-tuned per seed
    pretrain = json.loads((target / "metrics.json").read_text())["pretrain"]
    assert pretrain["shared_from"] == str(source) and pretrain["shared_statics"] == ["static_d8_w4"]


def test_seed_summary_says_what_the_seeds_shared(tmp_path):
    """Seeds run side by side (a sweep) get the backbone before the first seed trained its static
    networks: the summary must not claim those were shared too."""
    import json

    from experiments.config import ExperimentConfig
    from experiments.run import summarize_seeds

    rows = headline({"a": [point(0.5, 0.7)]}, [0.5])
    cfg = ExperimentConfig(name="s", output_dir=str(tmp_path))
    cfg.study.seeds, cfg.study.share_backbone = [0, 1], True
    for statics in (["static_d8_w4"], []):
        dirs = [tmp_path / "s" / f"seed{i}" for i in (0, 1)]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps({"pretrain": {"shared_statics": statics}, "compare": {"headline": rows}}))
        text = summarize_seeds(cfg, dirs).read_text()
        assert ("backbone and from-scratch static networks;" in text) == bool(statics), text
        assert json.loads((tmp_path / "s" / "summary.json").read_text())["shared_static_networks"] == bool(statics)


def test_the_rungs_a_nested_ladder_policy_routes_among_are_fine_tuned_too(monkeypatch, tmp_path):
    """With policy.ladder_search: nested the fixed-subset + fine-tuning curve also holds the
    nested rungs that bracket each budget, each fine-tuned on its own (the control for what the
    routing adds); a mask both ladders share is fine-tuned once, and the curve's envelope takes
    the better mask at a budget."""
    from backbone.data.datasets import Splits
    from experiments import compare
    from experiments.config import load_config

    cfg = load_config("quickstart", ["policy.ladder_search=nested", "study.budgets=[0.5]", f"output_dir={tmp_path}"])
    model = _random_bn(build_resnet(8, num_classes=4, width=4))  # 3 blocks
    cost = measure_backbone_cost(model, 32)
    data = make_synthetic(24, num_classes=4, seed=1)
    rows = {False: ["000", "001", "011", "111"], True: ["000", "100", "110", "111"]}  # best vs nested: 0 and 3 shared

    def ladder(cfg, backbone, splits, nested=False):
        masks = torch.tensor([[c == "1" for c in m] for m in rows[nested]])
        return {"masks": masks, "flops": [float(cost.mask_flops(m)) for m in masks], "search": "nested" if nested else "exhaustive",
                "images": 24, "search_s": 0.0, "held_out_accuracy": [0.0] * 4}

    tuned = []

    def finetune(cfg, backbone, name, sampler, splits, resume, loss_fn_for=None):
        tuned.append((name, compare.mask_string(sampler(torch.zeros(1), None)[0])))
        return backbone, 1.0

    import experiments.finetuned

    monkeypatch.setattr(compare, "run_ladder", ladder)
    monkeypatch.setattr(experiments.finetuned, "finetuned_on_masks", finetune)  # under finetuned_on_mask
    curves, _ = compare.fixed_subsets(cfg, model, cost, Splits(data, data, data), 0.0, False)
    ratios = [float(cost.flops_ratio(torch.tensor([[c == "1" for c in m] for m in rows[False]]))[k]) for k in range(4)]
    k_below, k_above = max(k for k in range(4) if ratios[k] <= 0.5), min(k for k in range(4) if ratios[k] >= 0.5)
    expected = {(f"subset_k{k}", rows[False][k]) for k in (k_below, k_above)}
    expected |= {(f"subset_nested_k{k}", rows[True][k]) for k in (k_below, k_above) if rows[True][k] not in rows[False][k_below:k_above + 1]}
    assert set(tuned) == expected and len(tuned) == len(expected)
    assert any(name.startswith("subset_nested_") for name, _ in tuned)
    points = curves["fixed subset + fine-tuning"]
    assert [p["flops_ratio"] for p in points] == sorted(p["flops_ratio"] for p in points)
    assert {p["knob"]["search"] for p in points} == {"exhaustive", "nested"}
    best = max(p["accuracy"] for p in points if p["flops_ratio"] <= 0.5 + 1e-9)
    assert accuracy_at(points, 0.5) >= best


def test_seed_summary_gives_mean_and_std_at_each_budget(tmp_path):
    from experiments.config import load_config
    from experiments.curves import headline, point
    from experiments.run import seed_configs, summarize_seeds

    cfg = load_config("quickstart", [f"output_dir={tmp_path}", "study.seeds=[0, 1]"])
    configs = seed_configs(cfg)
    assert [c.seed for c in configs] == [0, 1] and [c.run_dir.name for c in configs] == ["seed0", "seed1"]
    for c, accuracy in zip(configs, (0.8, 0.9)):
        c.run_dir.mkdir(parents=True)
        rows = headline({"static ResNet": [point(0.5, accuracy)], "RL policy": [point(0.4, 0.5), point(0.6, 0.7)]}, [0.5])
        (c.run_dir / "metrics.json").write_text(json.dumps({"compare": {"headline": rows}}))
    summary = summarize_seeds(cfg, [c.run_dir for c in configs])
    data = json.loads((summary.parent / "summary.json").read_text())["budgets"][0]
    assert data["methods"]["static ResNet"]["mean"] == pytest.approx(0.85)
    assert data["methods"]["static ResNet"]["std"] == pytest.approx(0.0707, abs=1e-4) and data["winner"] == "static ResNet"
    assert "85.00 ± 7.07" in summary.read_text()
    assert [c.seed for c in seed_configs(load_config("quickstart", ["seed=7"]))] == [7]
