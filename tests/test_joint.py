"""Joint fine-tuning of backbone and policy."""

import copy

import pytest
import torch

from agents.joint import FinetuneConfig, PolicyBackbone, PolicyGradientStep, joint_finetune
from agents.rl import PolicyConfig, build_model, make_vec_env
from backbone import build_resnet
from backbone.data.datasets import make_synthetic, split_train_val
from backbone.errors import ConfigError
from backbone.training.interrupt import Interrupted, clear_stop, request_stop
from backbone.models.weights import load_checkpoint
from envs.block_skip import SkipTask
from envs.rewards import RewardConfig


@pytest.fixture()
def setup():
    return _setup()


def _setup():
    torch.manual_seed(0)
    backbone = build_resnet(8, num_classes=4, width=4)
    data = make_synthetic(192, num_classes=4, seed=1)
    train_set, policy_set = split_train_val(data, 0.5, seed=0)
    reward = RewardConfig(lam=0.05)
    task = SkipTask(backbone, policy_set, reward)
    model = build_model(PolicyConfig(num_envs=8, n_steps=4, extractor_width=4), make_vec_env(task, PolicyConfig(num_envs=8)), seed=0, device="cpu")
    return backbone, model, train_set, policy_set, reward


def _cfg(**kw):
    return FinetuneConfig(**{"epochs": 2, "batch_size": 32, "policy_batch_size": 32, "policy_lr": 1e-3, **kw})


def test_both_backbone_and_policy_weights_change(setup):
    backbone, model, train_set, policy_set, reward = setup
    before_b = copy.deepcopy(backbone.state_dict())
    before_p = copy.deepcopy(model.policy.state_dict())
    pair, result = joint_finetune(backbone, model, train_set, policy_set, policy_set, reward, _cfg())
    changed_b = [k for k, v in backbone.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before_b[k])]
    changed_p = [k for k, v in model.policy.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before_p[k])]
    assert any("conv" in k for k in changed_b)
    assert any("action_net" in k for k in changed_p) and any("features_extractor" in k for k in changed_p)
    # The critic is not trained by the policy-gradient step (nor by the backbone's loss).
    assert all(torch.equal(v, before_p[k]) for k, v in model.policy.state_dict().items() if k.startswith("value_net"))
    assert result["policy_steps"] == 2 * (len(train_set) // 32)
    assert all("val_accuracy" in r for r in result["history"])


def test_pair_forward_uses_the_policy_masks(setup):
    backbone, model, *_ = setup
    pair = PolicyBackbone(backbone, model.policy).eval()
    x = make_synthetic(8, num_classes=4, seed=5).images
    masks = pair.decide(x)
    assert masks.shape == (8, backbone.num_blocks) and masks.dtype == torch.bool
    torch.testing.assert_close(pair(x), backbone(x, masks))


def test_pair_checkpoint_holds_both_and_resumes(setup, tmp_path):
    backbone, model, train_set, policy_set, reward = setup
    joint_finetune(backbone, model, train_set, policy_set, None, reward, _cfg(epochs=1), checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    assert any(k.startswith("backbone.") for k in state["model"]) and any(k.startswith("policy.") for k in state["model"])
    assert state["epoch"] == 1
    pair, result = joint_finetune(backbone, model, train_set, policy_set, None, reward, _cfg(epochs=2),
                                  checkpoint_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_stop_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch):
    backbone, model, train_set, policy_set, reward = _setup()
    reference, _ = joint_finetune(backbone, model, train_set, policy_set, None, reward, _cfg(), checkpoint_dir=tmp_path / "a")

    backbone, model, train_set, policy_set, reward = _setup()
    step = PolicyGradientStep.__call__
    calls = []

    def step_then_stop(self, *args):  # Ctrl-C arriving during the 5th step (policy data mid-epoch)
        step(self, *args)
        calls.append(1)
        if len(calls) == 5:
            request_stop("SIGTERM")

    monkeypatch.setattr(PolicyGradientStep, "__call__", step_then_stop)
    try:
        with pytest.raises(Interrupted, match="SIGTERM"):
            joint_finetune(backbone, model, train_set, policy_set, None, reward, _cfg(), checkpoint_dir=tmp_path / "b")
    finally:
        clear_stop()
    monkeypatch.setattr(PolicyGradientStep, "__call__", step)
    backbone, model, train_set, policy_set, reward = _setup()
    torch.manual_seed(99)  # the checkpoint restores the global RNG the policy samples from
    resumed, _ = joint_finetune(backbone, model, train_set, policy_set, None, reward, _cfg(),
                                checkpoint_dir=tmp_path / "b", resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_sequential_policy_is_rejected(setup):
    backbone, _, train_set, policy_set, reward = setup
    task = SkipTask(backbone, policy_set, reward)
    seq = PolicyConfig(env="sequential", num_envs=8)
    seq_model = build_model(seq, make_vec_env(task, seq), seed=0, device="cpu")
    with pytest.raises(ConfigError, match="oneshot"):
        joint_finetune(backbone, seq_model, train_set, policy_set, None, reward, _cfg())
    with pytest.raises(ConfigError, match="policy_lr"):
        _cfg(policy_lr=0)
