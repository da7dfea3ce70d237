import copy

import pytest
import torch
import torch.nn as nn

from agents.gates import GateConfig, GatedResNet, evaluate_gates, load_gated, train_gates
from backbone import build_resnet
from backbone.models.cost import measure_backbone_cost
from backbone.data.datasets import make_synthetic
from backbone.errors import ConfigError
from backbone.training.loop import TrainConfig
from backbone.models.weights import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def data():
    return make_synthetic(128, num_classes=4)


def _backbone(depth: int = 8, shortcut: str = "A"):
    """A tiny backbone whose blocks are not the identity (the zero-init of bn2 would make
    skipping a no-op and every equality below vacuous)."""
    torch.manual_seed(0)
    model = build_resnet(depth, num_classes=4, width=4, shortcut=shortcut)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def _input_dependent(gated: GatedResNet) -> GatedResNet:
    """Gates whose decisions differ between images (the default init opens every gate)."""
    torch.manual_seed(1)
    for gate in gated.gates:
        nn.init.normal_(gate.mlp[2].weight, std=3.0)
        nn.init.zeros_(gate.mlp[2].bias)
    return gated


def _force(gate: nn.Module, open_rows: torch.Tensor):
    """Make ``gate`` output +100 for ``open_rows`` and -100 for the others (a forward hook)."""
    return gate.register_forward_hook(lambda mod, inp, out: torch.where(open_rows, 100.0, -100.0).to(out))


def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.2, warmup_epochs=0, augment=False, eval_batch_size=64)
    base.update(kw)
    return TrainConfig(**base)


def test_gradients_reach_every_gate_and_the_backbone(data):
    gated = GatedResNet(_backbone(14), GateConfig(lam=0.1)).train()
    loss, logits = gated.loss(data.images[:32], data.labels[:32])
    loss.backward()
    assert logits.shape == (32, 4) and gated.last_gates.shape == (32, gated.num_blocks)
    for name, p in gated.gates.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert gated.backbone.conv1.weight.grad.abs().sum() > 0
    assert gated.backbone.blocks[-1].conv2.weight.grad.abs().sum() > 0


def test_eval_really_skips_blocks(data):
    gated = GatedResNet(_backbone(8), GateConfig()).eval()
    rows = {}
    for i, block in enumerate(gated.backbone.blocks):
        block.conv1.register_forward_hook(lambda mod, inp, out, i=i: rows.setdefault(i, []).append(inp[0].shape[0]))
    nn.init.constant_(gated.gates[1].mlp[2].bias, -100.0)  # block 1: never run
    even = torch.arange(32) % 2 == 0
    _force(gated.gates[2], even)  # block 2: only the even rows
    gated(data.images[:32])
    assert rows == {0: [32], 2: [16]}
    assert gated.last_keep_mask.tolist() == [[True, False, bool(e)] for e in even]


def test_eval_equals_backbone_with_the_gates_decisions(data):
    gated = _input_dependent(GatedResNet(_backbone(14), GateConfig())).eval()
    x = data.images[:64]
    with torch.no_grad():
        out = gated(x)
        keep = gated.last_keep_mask
        assert 0 < keep.float().mean() < 1  # some gates open, some shut
        torch.testing.assert_close(out, gated.backbone(x, keep))
        # An explicit keep_mask overrides the gates.
        torch.testing.assert_close(gated(x, ~keep), gated.backbone(x, ~keep))
        assert torch.equal(gated.last_keep_mask, ~keep)


def test_gates_start_open(data):
    gated = GatedResNet(_backbone(14), GateConfig(init_bias=3.0)).eval()
    x = data.images[:64]
    with torch.no_grad():
        torch.testing.assert_close(gated(x), gated.backbone(x))
    assert gated.last_keep_mask.all()


def test_dense_training_pass_matches_real_skipping_with_option_b_shortcuts(data):
    # Training runs blocks densely; a shut gate must give exactly the real skip (shortcut alone),
    # also for conv+BN shortcuts whose output can be negative. BN in eval mode to compare.
    gated = GatedResNet(_backbone(8, shortcut="B"), GateConfig()).train()
    for m in gated.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x, rows = data.images[:32], torch.arange(32)
    masks = torch.stack([rows % 2 == 0, rows % 3 == 0, rows % 4 != 1], 1)
    for i, gate in enumerate(gated.gates):
        _force(gate, masks[:, i])
    out = gated(x)
    assert torch.equal(gated.last_keep_mask, masks)
    with torch.no_grad():
        torch.testing.assert_close(out, gated.backbone(x, masks))


def test_a_large_lambda_uses_fewer_blocks(data):
    backbone = _backbone(8).train()
    used, accuracy = {}, {}
    for lam in (0.0, 0.5):
        gated, result = train_gates(copy.deepcopy(backbone), data, None, GateConfig(lam=lam, init_bias=1.0), _cfg())
        metrics = evaluate_gates(gated, data)
        used[lam], accuracy[lam] = metrics["blocks_used"], metrics["accuracy"]
        assert len(result["history"]) == 3
    assert used[0.5] < used[0.0]
    assert used[0.0] == 3.0


def test_gumbel_estimator_trains(data):
    gated = GatedResNet(_backbone(8), GateConfig(lam=0.1, estimator="gumbel", temperature=0.5)).train()
    loss, _ = gated.loss(data.images[:32], data.labels[:32])
    loss.backward()
    assert all(p.grad is not None for p in gated.gates.parameters())
    gated, _ = train_gates(_backbone(8).train(), data, None, GateConfig(lam=0.5, init_bias=1.0, estimator="gumbel"), _cfg())
    assert evaluate_gates(gated, data)["blocks_used"] < 3.0


def test_evaluate_gates_agrees_with_a_hand_computation(data):
    gated = _input_dependent(GatedResNet(_backbone(14), GateConfig(lam=0.02, hidden=8))).train()
    state = copy.deepcopy(gated.state_dict())
    metrics = evaluate_gates(gated, data, batch_size=50)  # several batches, a short last one
    assert gated.training  # mode restored, and nothing (BN running stats) changed
    assert all(torch.equal(state[k], v) for k, v in gated.state_dict().items())
    gated.eval()
    with torch.no_grad():
        logits = gated(data.images)
    keep = gated.last_keep_mask
    correct = (logits.argmax(1) == data.labels).double()
    blocks = keep.sum(1).double()
    cost = measure_backbone_cost(gated.backbone)
    # Each gate: Linear(c_in, 8) and Linear(8, 1), 2 FLOPs per multiply-add.
    gate_flops = sum(2 * (b.conv1.in_channels * 8 + 8) for b in gated.backbone.blocks)
    assert gated.gate_flops() == gate_flops == metrics["gate_flops"]
    flops = cost.mask_flops(keep) + gate_flops
    assert metrics["num_images"] == 128
    assert metrics["accuracy"] == pytest.approx(correct.mean().item())
    assert metrics["blocks_used"] == pytest.approx(blocks.mean().item())
    assert metrics["blocks_used_std"] == pytest.approx(blocks.std(unbiased=False).item())
    assert metrics["flops"] == pytest.approx(flops.mean().item())
    assert metrics["flops_ratio"] == pytest.approx((flops / cost.full_flops).mean().item())
    assert metrics["reward"] == pytest.approx((correct - 0.02 * blocks).mean().item())
    assert metrics["keep_rate_per_block"] == pytest.approx(keep.float().mean(0).tolist())
    for level, entry in metrics["by_difficulty"].items():
        rows = data.difficulty == int(level)
        assert entry["accuracy"] == pytest.approx(correct[rows].mean().item())
        assert entry["blocks_used"] == pytest.approx(blocks[rows].mean().item())


def test_checkpoint_round_trip(tmp_path, data):
    gated = _input_dependent(GatedResNet(_backbone(8), GateConfig(hidden=8, lam=0.3))).eval()
    path = save_checkpoint(tmp_path / "gated.pt", gated)
    checkpoint = load_checkpoint(path)
    assert checkpoint["arch"]["gates"]["hidden"] == 8
    fresh = GatedResNet(build_resnet(8, num_classes=4, width=4), GateConfig(hidden=8)).eval()
    fresh.load_state_dict(checkpoint["model"])
    rebuilt = load_gated(path).eval()
    assert rebuilt.cfg == gated.cfg
    with torch.no_grad():
        expected = gated(data.images)
        torch.testing.assert_close(fresh(data.images), expected, rtol=0, atol=0)
        torch.testing.assert_close(rebuilt(data.images), expected, rtol=0, atol=0)


def test_train_gates_resumes(tmp_path, data):
    backbone = _backbone(8).train()
    cfg = GateConfig(lam=0.2, init_bias=1.0)
    _, first = train_gates(copy.deepcopy(backbone), data, data, cfg, _cfg(epochs=1), checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pt").exists() and load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    gated, resumed = train_gates(copy.deepcopy(backbone), data, data, cfg, _cfg(epochs=2), checkpoint_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == first["history"][0]  # epoch 1 came from the checkpoint
    assert set(resumed["val_metrics"]) >= {"accuracy", "blocks_used", "flops_ratio", "keep_rate_per_block"}
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2
    for key, value in gated.state_dict().items():
        assert torch.equal(state["model"][key], value), key


@pytest.mark.parametrize(
    "kwargs, field",
    [({"lam": -0.1}, "gates.lam"), ({"estimator": "reinforce"}, "gates.estimator"),
     ({"temperature": 0.0}, "gates.temperature"), ({"hidden": 0}, "gates.hidden")],
)
def test_bad_gate_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GateConfig(**kwargs)


def test_a_refit_of_the_gated_models_classifier_fits_its_own_decisions():
    """finetune.refit_heads for the gates (experiments.compare): the backbone's classifier is
    refitted on the features of the paths the gates choose, image by image."""
    from backbone.training.refit import refit_heads

    gated = _input_dependent(GatedResNet(_backbone(14), GateConfig())).eval()
    data = make_synthetic(256, num_classes=4, seed=1)
    with torch.no_grad():
        gated.backbone.fc.weight.normal_(0, 3)  # a classifier that reads the features badly
        before = torch.nn.functional.cross_entropy(gated(data.images), data.labels).item()
        masks_before = gated.last_keep_mask.clone()
    assert 0 < masks_before.sum(1).float().std()  # the gates' paths differ between images
    refit_heads(gated.backbone, data, lambda images: (gated(images), gated.last_keep_mask)[1])
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(gated(data.images), data.labels).item()
    assert torch.equal(gated.last_keep_mask, masks_before)  # the gates decide as before
    assert after < 0.5 * before, (before, after)
