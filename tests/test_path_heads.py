"""Per-path classifiers: one head per ladder rung, saved, reloaded, refitted (finetune.refit_heads)."""

import pytest
import torch

from agents.joint import FinetuneConfig, joint_finetune
from agents.rl import PolicyConfig, build_model, make_dynamic_model, make_vec_env
from backbone import build_resnet
from backbone.data.datasets import make_synthetic, split_train_val
from backbone.errors import CheckpointError, ConfigError
from backbone.training.refit import pooled_features, refit_heads, refit_images
from backbone.models.torchvision_resnet import build_torchvision_resnet
from backbone.models.weights import load_model, load_weights, save_checkpoint
from envs.block_skip import SkipTask
from envs.rewards import RewardConfig

LADDER = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def _masks_and_images(n: int = 12):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    # Rows take rung 0, 1 or 2, or a mask that is no rung (0, 1, 0).
    masks = torch.cat([LADDER, torch.tensor([[0, 1, 0]], dtype=torch.bool)]).repeat(n // 4, 1)
    return images, masks


@pytest.mark.parametrize("sorted_rows", [False, True])
def test_each_row_is_classified_by_its_paths_head(sorted_rows):
    model = build_resnet(8, num_classes=5, width=4).eval()
    images, masks = _masks_and_images()
    with torch.no_grad():
        before = model(images, masks)
        model.attach_path_heads(LADDER)
        assert torch.equal(model(images, masks), before)  # every head starts as the shared one
        model.path_heads.bias[1] += 10.0  # only rung 1's head changes
        model.path_heads.bias[1, 3] += 100.0
        with torch.set_grad_enabled(not sorted_rows):  # without autograd forward() sorts rows by mask
            after = model(images, masks).detach()
    rung1 = (masks == LADDER[1]).all(1)
    assert (after[rung1].argmax(1) == 3).all()
    torch.testing.assert_close(after[~rung1], before[~rung1])
    # No mask (the full network, the distillation teacher): the shared classifier.
    with torch.no_grad():
        torch.testing.assert_close(model(images), build_resnet_like(model)(images))


def build_resnet_like(model):
    plain = build_resnet(8, num_classes=5, width=4).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("path_heads.")})
    return plain


def test_gradients_reach_only_the_heads_of_the_paths_used():
    model = build_resnet(8, num_classes=5, width=4).attach_path_heads(LADDER).train()
    images, masks = _masks_and_images()
    rows = ~(masks == LADDER[2]).all(1)  # nobody takes rung 2
    model(images[rows], masks[rows]).logsumexp(1).sum().backward()
    grad_w = model.path_heads.weight.grad
    assert grad_w[0].abs().sum() > 0 and grad_w[1].abs().sum() > 0 and grad_w[2].abs().sum() == 0
    assert model.fc.weight.grad.abs().sum() > 0  # the (0, 1, 0) rows: no rung, the shared head


@pytest.mark.parametrize("family", ["cifar", "torchvision"])
def test_path_heads_survive_save_and_load_model(tmp_path, family):
    if family == "cifar":
        model, size, ladder = build_resnet(8, num_classes=5, width=4), 32, LADDER
    else:
        model, size = build_torchvision_resnet("resnet18", num_classes=5), 64
        ladder = torch.eye(8, dtype=torch.bool)[:3] | torch.tensor([True] + [False] * 7)
    model.attach_path_heads(ladder).eval()
    with torch.no_grad():
        model.path_heads.weight.normal_()
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt").eval()
    assert loaded.arch["path_heads"] == 3 and torch.equal(loaded.path_heads.masks, ladder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ladder), model(images, ladder))
    if family == "cifar":  # into a network built without them: one clear message, not key lists
        with pytest.raises(CheckpointError, match="3 per-path classifiers.*load_model"):
            load_weights(build_resnet(8, num_classes=5, width=4), tmp_path / "m.pt")


def test_bad_path_head_masks_are_refused():
    model = build_resnet(8, num_classes=5, width=4)
    with pytest.raises(ValueError, match="distinct"):
        model.attach_path_heads(torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="3 blocks"):
        model.attach_path_heads(torch.eye(4, dtype=torch.bool)[:2])


def _ladder_pair():
    torch.manual_seed(0)
    backbone = build_resnet(8, num_classes=4, width=4)
    with torch.no_grad():  # blocks that are not the identity (as zero-initialised ones are): paths differ
        for block in backbone.blocks:
            block.bn2.weight.fill_(1.0)
    data = make_synthetic(192, num_classes=4, seed=1)
    train_set, policy_set = split_train_val(data, 0.5, seed=0)
    cfg = PolicyConfig(action="ladder", observation="stem", num_envs=8, n_steps=4)
    task = SkipTask(backbone, policy_set, RewardConfig(lam=0.05), observation="stem", ladder=LADDER)
    pair = make_dynamic_model(cfg, backbone, build_model(cfg, make_vec_env(task, cfg), seed=0, device="cpu"), LADDER)
    return pair, train_set, policy_set


def _training_loss(model, dataset, mask):
    with torch.no_grad():
        masks = mask.reshape(1, -1).expand(len(dataset), -1)
        return torch.nn.functional.cross_entropy(model.eval()(dataset.images, masks), dataset.labels).item()


def test_a_refit_lowers_the_loss_of_the_path_it_is_fitted_on():
    torch.manual_seed(0)
    model = build_resnet(8, num_classes=4, width=4).eval()
    data = make_synthetic(256, num_classes=4, seed=1)
    mask = torch.tensor([1, 0, 1], dtype=torch.bool)
    with torch.no_grad():
        model.fc.weight.normal_(0, 3)  # a classifier that reads the features badly
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    before = _training_loss(model, data, mask)
    seconds = refit_heads(model, data, lambda images: mask.reshape(1, -1).expand(len(images), -1))
    refitted = _training_loss(model, data, mask)
    assert seconds > 0 and refitted < 0.5 * before, (before, refitted)
    # What many steps of plain gradient descent on the same features reach: the refit is as good.
    features = pooled_features(model, data.images, lambda images: mask.reshape(1, -1).expand(len(images), -1))
    head = torch.nn.Linear(features.shape[1], 4)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(1000):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), data.labels)
        loss.backward()
        optimizer.step()
    assert refitted <= loss.item() + 0.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())  # only the classifier moved


def test_joint_finetuning_refits_a_head_per_rung(tmp_path):
    pair, train_set, policy_set = _ladder_pair()
    cfg = FinetuneConfig(epochs=1, batch_size=32, policy_batch_size=32, refit_heads=64)
    before = {k: _training_loss(pair.backbone, train_set, m) for k, m in enumerate(LADDER)}
    result = joint_finetune(pair, train_set, policy_set, None, RewardConfig(lam=0.05), cfg, checkpoint_dir=tmp_path)
    heads = pair.backbone.path_heads
    assert heads is not None and torch.equal(heads.masks, LADDER) and result["refit_time_s"] > 0
    # The rungs the policy sends some of the refit images to (the same seeded images) are refitted,
    # each away from the shared head and from the others, and fit their path's features better.
    images = refit_images(train_set, 64, seed=0).images
    used = set(heads.path_index(pair.decide(images, deterministic=True)))
    assert len(used) >= 2
    fc_w = pair.backbone.fc.weight.detach()
    moved = {k for k in range(3) if (heads.weight[k] - fc_w).abs().max() > 1e-3}
    assert moved == used
    assert all((heads.weight[k] - heads.weight[j]).abs().max() > 1e-3 for k in used for j in used if j < k)
    after = {k: _training_loss(pair.backbone, train_set, m) for k, m in enumerate(LADDER)}
    assert all(after[k] < before[k] for k in used), (before, after)
    with pytest.raises(ConfigError, match="refit_heads"):
        FinetuneConfig(refit_heads=-1)
