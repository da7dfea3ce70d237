"""Confidence cascades (agents.cascade): FLOPs and accuracy arithmetic, choices made on held-out
images alone, and the bad inputs of experiments.cascade."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

from backbone.errors import ConfigError
from agents.cascade import (
    CascadeModel,
    ScoredNetwork,
    cascade_decisions,
    cascade_latency,
    cascade_for_budget,
    focused_loss,
    gain_standard_error,
    run_cascade,
    split_test_for_selection,
    static_envelope_at,
    threshold_for_share,
)

ROOT = Path(__file__).resolve().parents[1]


def logits_for(labels: torch.Tensor, right: torch.Tensor, sure: torch.Tensor, classes: int = 4) -> torch.Tensor:
    """Logits that predict ``labels`` where ``right`` (else the next class), with a top softmax
    probability near 1 where ``sure`` and near 1/2 elsewhere."""
    predicted = torch.where(right, labels, (labels + 1) % classes)
    out = torch.zeros(len(labels), classes)
    unsure = 0.5 + 0.05 * torch.rand(len(labels))  # distinct confidences: a share of them is a share of images
    out[torch.arange(len(labels)), predicted] = torch.where(sure, torch.tensor(8.0), unsure)
    out[torch.arange(len(labels)), (predicted + 2) % classes] = torch.where(sure, torch.tensor(0.0), torch.tensor(0.4))
    return out


def network(name, flops, blocks, held_out, test) -> ScoredNetwork:
    return ScoredNetwork(name, flops, torch.arange(4) < blocks, held_out, test)


def test_the_unsure_images_go_on_and_the_flops_add_up():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (200,))
    hard = torch.arange(200) % 5 == 0  # 20% of the images: the small network is wrong and unsure there
    small = network("small", 0.4, 2, logits_for(labels, ~hard, ~hard), logits_for(labels, ~hard, ~hard))
    large = network("large", 1.0, 4, logits_for(labels, torch.ones(200, dtype=torch.bool), hard),
                    logits_for(labels, torch.ones(200, dtype=torch.bool), hard))
    groups = hard.long()  # group 1 = the hard images
    result = cascade_for_budget([small], large, 0.6, labels, labels, groups, ["easy", "hard"])
    assert result["small"] == "small" and result["sent_on"] == pytest.approx(0.2)
    assert result["flops_ratio"] == pytest.approx(0.4 + 0.2 * 1.0)
    assert result["accuracy"] == 1.0  # the large network answers exactly the small one's mistakes
    adaptivity = result["adaptivity"]
    assert adaptivity["by_difficulty"]["easy"]["blocks_used"] == 2 and adaptivity["by_difficulty"]["hard"]["blocks_used"] == 6
    assert adaptivity["hard_minus_easy_blocks"] == 4 and adaptivity["distinct_masks"] == 2
    # Static networks at the cascade's FLOPs: the small one alone (80%), or a random third of the
    # images to the large one (0.4 + 0.6 / 3 = 0.6 FLOPs): 86.7%, still 13 points below the cascade.
    static = static_envelope_at([small, large], labels, result["flops_ratio"])
    assert static["single"]["name"] == "small" and static["single"]["accuracy"] == pytest.approx(0.8)
    assert static["mixture"]["of"] == ["small", "large"] and static["mixture"]["share_of_larger"] == pytest.approx(0.2 / 0.6)
    assert static["mixture"]["accuracy"] == pytest.approx(0.8 + 0.2 * 0.2 / 0.6)
    assert static_envelope_at([small, large], labels, 0.3) is None
    # A threshold nobody is under sends nothing on; one everybody is under sends everything.
    assert run_cascade([small, large], [float("-inf")], labels)["flops_ratio"] == pytest.approx(0.4)
    everything = run_cascade([small, large], [float("inf")], labels)
    assert everything["flops_ratio"] == pytest.approx(1.4) and everything["sent_on"] == 1.0


def test_a_three_network_cascade_passes_each_image_on_until_one_is_sure():
    torch.manual_seed(2)
    labels = torch.randint(0, 4, (300,))
    kind = torch.arange(300) % 10  # 0-5: easy, 6-7: medium, 8-9: hard
    easy, medium = kind < 6, (kind >= 6) & (kind < 8)
    every = torch.ones(300, dtype=torch.bool)
    small = network("small", 0.1, 1, *[logits_for(labels, easy, easy)] * 2)
    middle = network("middle", 0.35, 2, *[logits_for(labels, easy | medium, easy | medium)] * 2)
    large = network("large", 1.0, 4, *[logits_for(labels, every, every)] * 2)
    # Budget 0.1 + 0.4 · 0.35 + 0.2 · 1.0 = 0.44: every image answered by the cheapest network that
    # gets it right. Two networks cannot: small > large sends on 34% (of small's 40% mistakes),
    # middle > large 9% (of middle's 20%).
    two = cascade_for_budget([small, middle], large, 0.44, labels, labels, max_stages=2)
    three = cascade_for_budget([small, middle], large, 0.44, labels, labels, kind // 6 + (kind >= 8),
                               ["easy", "medium", "hard"], max_stages=3)
    assert two["chain"] == ["small", "large"] and two["accuracy"] == pytest.approx(0.94)
    assert three["chain"] == ["small", "middle", "large"] and three["accuracy"] == 1.0
    assert three["answered_by"] == pytest.approx([0.6, 0.2, 0.2]) and three["flops_ratio"] == pytest.approx(0.44)
    blocks = {name: g["blocks_used"] for name, g in three["adaptivity"]["by_difficulty"].items()}
    assert blocks == {"easy": 1, "medium": 3, "hard": 7}


def test_the_small_network_and_threshold_are_chosen_on_held_out_images_only():
    torch.manual_seed(1)
    labels = torch.randint(0, 4, (100,))
    every, none = torch.ones(100, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)
    # On held-out images a is right and b wrong; on the test images the other way round.
    a = network("a", 0.3, 1, logits_for(labels, every, every), logits_for(labels, none, every))
    b = network("b", 0.3, 1, logits_for(labels, none, every), logits_for(labels, every, every))
    large = network("large", 1.0, 4, logits_for(labels, every, every), logits_for(labels, every, every))
    chosen = cascade_for_budget([a, b], large, 0.3, labels, labels)
    assert chosen["small"] == "a" and chosen["held_out_accuracy"] == 1.0 and chosen["accuracy"] == 0.0
    assert cascade_for_budget([a, b], large, 0.2, labels, labels) is None  # no small network fits


def test_the_gains_standard_error_is_paired_over_the_test_images():
    torch.manual_seed(2)
    labels = torch.randint(0, 4, (400,))
    right_a, right_b = torch.rand(400) < 0.7, torch.rand(400) < 0.9
    a = network("a", 0.4, 1, logits_for(labels, right_a, right_a), logits_for(labels, right_a, right_a))
    b = network("b", 1.0, 4, logits_for(labels, right_b, right_b), logits_for(labels, right_b, right_b))
    static = static_envelope_at([a, b], labels, 0.7)
    w = static["mixture"]["share_of_larger"]
    assert static["mixture"]["of"] == ["a", "b"] and w == pytest.approx(0.5)
    # A cascade that is right where b is, and on 20 more images: its gain and the spread of the
    # per-image differences from the mixture's expected correctness.
    correct = right_b.clone()
    correct[(~right_b).nonzero()[:20, 0]] = True
    d = correct.double() - (0.5 * right_a.double() + 0.5 * right_b.double())
    se = gain_standard_error(correct, static, {"a": a, "b": b}, labels)
    assert d.mean().item() == pytest.approx(correct.double().mean().item() - static["mixture"]["accuracy"])
    assert se == pytest.approx(d.std().item() / 20)
    # Paired: below the error of two independent accuracies on 400 images each.
    p, q = correct.double().mean().item(), static["mixture"]["accuracy"]
    assert se < 0.7 * ((p * (1 - p) + q * (1 - q)) / 400) ** 0.5
    # A single network as the envelope (nothing cheaper to mix with): the difference from it alone.
    only_b = {"mixture": {"accuracy": 0.9, "of": ["b"]}}
    assert gain_standard_error(right_b, only_b, {"b": b}, labels) == 0.0


class FixedFirstStage(torch.nn.Module):
    """A first stage whose logits are stored per image (the image's first pixel is its index);
    it records the keep masks it was called with."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)
        self.masks = []

    def forward(self, images, keep_mask):
        self.masks.append(keep_mask)
        return self.logits[images[:, 0, 0, 0].long()]


def test_focused_loss_weights_each_image_by_how_unsure_the_first_stage_is():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (6,))
    sure = torch.tensor([True, True, False, False, True, False])
    first = FixedFirstStage(logits_for(labels, torch.ones(6, dtype=torch.bool), sure))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4))
    images = torch.rand(6, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(6).float()
    mask = torch.tensor([True, False, True])
    loss, logits = focused_loss(model, first, mask)(images, labels, None)
    unsure = 1 - first.logits.detach().softmax(1).max(1).values
    per_image = F.cross_entropy(model(images), labels, reduction="none")
    assert torch.equal(logits, model(images))
    assert loss.item() == pytest.approx((per_image * unsure / unsure.mean()).mean().item(), rel=1e-5)
    squared = focused_loss(model, first, mask, power=2.0)(images, labels, None)[0]
    assert squared.item() == pytest.approx((per_image * unsure ** 2 / (unsure ** 2).mean()).mean().item(), rel=1e-5)
    # The images the first stage is sure of (top probability ~1) add almost nothing; the loss
    # trains the model only, and the first stage runs its own mask, frozen and in eval mode.
    assert (unsure[sure] < 2e-3).all() and (unsure[~sure] > 0.4).all()
    loss.backward()
    assert model[1].weight.grad is not None and first.logits.grad is None and not first.training
    assert torch.equal(first.masks[-1], mask.expand(6, -1))


def test_the_deployable_cascade_answers_each_image_with_the_stage_a_held_out_search_would_pick():
    from backbone import build_resnet

    torch.manual_seed(0)
    small, middle, large = (build_resnet("resnet20", num_classes=4, width=4).eval() for _ in range(3))
    masks = [torch.tensor([True, False, True, False, False, True, True, False, True]),
             torch.tensor([True, True, True, False, True, True, True, True, True]), torch.ones(9, dtype=torch.bool)]
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = [net(images, m.expand(40, -1)) for net, m in zip((small, middle, large), masks)]
    scored = [ScoredNetwork(str(i), 0.3 * (i + 1), m, lg, lg) for i, (m, lg) in enumerate(zip(masks, logits))]
    thresholds = [threshold_for_share(scored[0].test[0], 0.5), threshold_for_share(scored[1].test[0], 0.4)]
    prediction, stage = cascade_decisions(scored, thresholds)
    cascade = CascadeModel([small, middle, large], masks, thresholds)
    out, answered_by = cascade.answer(images)
    assert torch.equal(answered_by, stage) and torch.equal(out.argmax(1), prediction)
    assert set(stage.tolist()) == {0, 1, 2}  # every stage answers some images here
    for i in range(3):  # each image's logits are those of the network that answered it
        assert torch.allclose(out[stage == i], logits[i][stage == i], atol=1e-5)
    # One image at a time (a stream), the same answers; not for an image whose confidence is a
    # threshold (a quantile of these very images), where batch-1 rounding may flip the decision.
    borderline = torch.stack([(net.test[0] - t).abs() < 1e-4 for net, t in zip(scored, thresholds)]).any(0)
    for row in [r for r in range(0, 40, 3) if not borderline[r]]:
        one, by = cascade.answer(images[row:row + 1])
        assert by.tolist() == [stage[row].item()] and torch.allclose(one, logits[by.item()][row:row + 1], atol=1e-5)
        assert torch.equal(cascade(images[row:row + 1]), one)
    rows = cascade_latency(cascade, large, images, [0.3, 0.6, 0.9], batch=16, stream=4, repeats=1,
                           device=torch.device("cpu"), warmup=0)
    assert [r["batch"] for r in rows] == [1, 16] and rows[1]["images"] == 16
    flops = 0.3 + 0.6 * (stage[:16] >= 1).double().mean().item() + 0.9 * (stage[:16] >= 2).double().mean().item()
    assert rows[1]["flops_ratio"] == pytest.approx(1 / flops)
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["time_ratio"] / rows[1]["flops_ratio"])
    with pytest.raises(ValueError, match="2 or more networks"):
        CascadeModel([small], masks[:1], [])


def test_a_choice_on_test_images_splits_them_once_for_every_network_and_scores_on_the_rest():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (50,))
    networks = [ScoredNetwork(f"n{i}", 0.3 * (i + 1), torch.ones(4, dtype=torch.bool), torch.randn(7, 3),
                              torch.randn(50, 3)) for i in range(3)]
    split, chosen_labels, scored_labels, scored = split_test_for_selection(networks, labels, 0.4, seed=5)
    assert [(n.name, n.flops_ratio) for n in split] == [(n.name, n.flops_ratio) for n in networks]
    assert len(chosen_labels) == 20 and len(scored_labels) == 30 and torch.equal(scored_labels, labels[scored])
    for before, after in zip(networks, split):
        assert torch.equal(after.test_logits, before.test_logits[scored])
        # The held-out side is the other 20 test images, the same ones for every network.
        rest = torch.tensor([i for i in range(50) if i not in set(scored.tolist())])
        assert torch.equal(after.held_out_logits, before.test_logits[rest])
    again = split_test_for_selection(networks, labels, 0.4, seed=5)[3]
    assert torch.equal(again, scored) and not torch.equal(split_test_for_selection(networks, labels, 0.4, seed=6)[3], scored)
    with pytest.raises(ValueError, match="leaves no images"):
        split_test_for_selection(networks, labels, 0.001, seed=5)


def test_an_averaged_last_stage_answers_with_both_stages_probabilities():
    from backbone import build_resnet

    torch.manual_seed(3)
    small, large = (build_resnet("resnet20", num_classes=4, width=4).eval() for _ in range(2))
    masks = [torch.tensor([True, False, True, False, False, True, True, False, True]), torch.ones(9, dtype=torch.bool)]
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = [net(images, m.expand(40, -1)) for net, m in zip((small, large), masks)]
    scored = [ScoredNetwork(str(i), 0.4 + 0.6 * i, m, lg, lg) for i, (m, lg) in enumerate(zip(masks, logits))]
    thresholds = [threshold_for_share(scored[0].test[0], 0.5)]
    prediction, stage = cascade_decisions(scored, thresholds, average=True)
    both = (logits[0].softmax(1) + logits[1].softmax(1)) / 2
    sent = stage == 1
    assert sent.any() and (~sent).any()
    assert torch.equal(prediction[sent], both[sent].argmax(1)) and torch.equal(prediction[~sent], logits[0][~sent].argmax(1))
    cascade = CascadeModel([small, large], masks, thresholds, average_last=True)
    out, answered_by = cascade.answer(images)
    assert torch.equal(answered_by, stage)
    assert torch.allclose(out[sent], both[sent].log(), atol=1e-5) and torch.allclose(out[~sent], logits[0][~sent], atol=1e-5)
    row = int(sent.nonzero()[0])
    assert torch.allclose(cascade(images[row:row + 1]), both[row:row + 1].log(), atol=1e-5)  # batch 1 too
    # The held-out search takes the averaged answer where it scores better there, and says so.
    plain = cascade_decisions(scored, thresholds)[0]
    labels = both.argmax(1)  # the averaged answers are right by construction
    assert (plain != labels).any()
    chosen = cascade_for_budget(scored[:1], scored[1], 0.7, labels, labels, average=True)
    assert chosen["averaged"] is True and chosen["accuracy"] == 1.0
    assert cascade_for_budget(scored[:1], scored[1], 0.7, labels, labels)["averaged"] is False


def test_threshold_for_share_splits_the_held_out_images():
    confidence = torch.linspace(0, 1, 101)
    for share in (0.1, 0.25, 0.5, 0.9):
        assert (confidence < threshold_for_share(confidence, share)).double().mean().item() == pytest.approx(share, abs=0.011)


def test_the_cascade_benchmark_refuses_a_run_without_cascades(tmp_path, capsys):
    from experiments import benchmark

    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--bench", "cascade", "--run", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "holds no cascades: run python -m experiments.cascade" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--bench", "cascade"])
    assert "--bench cascade needs --run DIR" in capsys.readouterr().err


def test_cascade_cli_refuses_a_run_without_fine_tuned_subsets(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    done = subprocess.run([sys.executable, "-m", "experiments.cascade", "--run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds no fine-tuned fixed subsets: run experiments.compare first" in done.stderr
    done = subprocess.run([sys.executable, "-m", "experiments.cascade", "--run", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a run directory" in done.stderr
    done = subprocess.run([sys.executable, "-m", "experiments.cascade", "--run", str(tmp_path), "--budgets", "0.5", "1.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--budgets must be FLOPs ratios in (0, 1]" in done.stderr


def test_fine_tuned_subsets_lists_the_focused_copies_with_their_subsets_masks(tmp_path):
    from experiments.cascade import fine_tuned_subsets

    (tmp_path / "baselines").mkdir()
    (tmp_path / "ladder.json").write_text('{"masks": ["000", "100", "110", "111"]}')
    for stem in ("subset_k1", "subset_k2", "subset_k2_focused_on_subset_k1", "subset_kx", "full_focused_on_subset_k1"):
        (tmp_path / "baselines" / f"{stem}.pt").write_bytes(b"")
    found = {name: mask.tolist() for name, _, mask in fine_tuned_subsets(tmp_path)}
    assert found == {"subset_k1": [True, False, False], "subset_k2": [True, True, False],
                     "subset_k2_focused_on_subset_k1": [True, True, False]}
    assert [name for name, _, _ in fine_tuned_subsets(tmp_path, focused=False)] == ["subset_k1", "subset_k2"]
    (tmp_path / "baselines" / "subset_nested_k3.pt").write_bytes(b"")  # its masks are in a file the run lacks
    with pytest.raises(ConfigError, match="ladder_nested.json is missing"):
        fine_tuned_subsets(tmp_path)


def test_the_envelope_names_the_bracketing_subsets_the_run_never_fine_tuned(tmp_path):
    from experiments.cascade import missing_envelope_subsets

    class Cost:  # each block a fifth of the FLOPs
        full_flops = 5.0

        @staticmethod
        def mask_flops(mask):
            return mask.double().sum()

    (tmp_path / "baselines").mkdir()
    (tmp_path / "ladder.json").write_text('{"masks": ["00000", "10000", "10100", "10110", "11110", "11111"]}')
    (tmp_path / "ladder_nested.json").write_text('{"masks": ["00000", "01000", "10110", "11110", "11111", "11111"]}')
    for stem in ("subset_k1", "subset_nested_k2"):  # the nested rung k2 has the blocks of k3
        (tmp_path / "baselines" / f"{stem}.pt").write_bytes(b"")
    names = lambda ratios: [name for name, _ in missing_envelope_subsets(tmp_path, Cost, ratios)]  # noqa: E731
    assert names([0.2]) == []  # k1 itself
    assert names([0.5]) == ["subset_k2"]  # between k2 (0.4) and k3 (0.6, fine-tuned as the nested rung)
    assert names([0.7, 0.3]) == ["subset_k2", "subset_k4"]  # k4 below 0.7 and the full network above it
    mask = missing_envelope_subsets(tmp_path, Cost, [0.7])[0][1]
    assert mask.tolist() == [True, True, True, True, False]
    (tmp_path / "ladder.json").unlink()  # a run without a searched ladder: nothing to name
    assert names([0.5]) == []
