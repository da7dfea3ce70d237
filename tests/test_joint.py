"""Joint fine-tuning of backbone and policy."""

import copy

import pytest
import torch

from agents.joint import FinetuneConfig, PolicyGradientStep, joint_finetune
from agents.rl import PolicyConfig, build_model, make_dynamic_model, make_vec_env
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


def _setup(env: str = "oneshot", observation: str = "pixels"):
    """A pair (backbone + freshly built policy), its data and reward."""
    torch.manual_seed(0)
    backbone = build_resnet(8, num_classes=4, width=4)
    data = make_synthetic(192, num_classes=4, seed=1)
    train_set, policy_set = split_train_val(data, 0.5, seed=0)
    reward = RewardConfig(lam=0.05)
    cfg = PolicyConfig(env=env, observation=observation, num_envs=8, n_steps=4, extractor_width=4)
    task = SkipTask(backbone, policy_set, reward, observation=observation if env == "oneshot" else "pixels")
    model = build_model(cfg, make_vec_env(task, cfg), seed=0, device="cpu")
    return make_dynamic_model(cfg, backbone, model), model, train_set, policy_set, reward


def _cfg(**kw):
    return FinetuneConfig(**{"epochs": 2, "batch_size": 32, "policy_batch_size": 32, "policy_lr": 1e-3, **kw})


@pytest.mark.parametrize("env,observation", [("oneshot", "pixels"), ("oneshot", "stem"), ("sequential", "pixels")])
def test_both_backbone_and_policy_weights_change(env, observation):
    pair, model, train_set, policy_set, reward = _setup(env, observation)
    backbone = pair.backbone
    before_b = copy.deepcopy(backbone.state_dict())
    before_p = copy.deepcopy(model.policy.state_dict())
    result = joint_finetune(pair, train_set, policy_set, policy_set, reward, _cfg())
    changed_b = [k for k, v in backbone.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before_b[k])]
    changed_p = [k for k, v in model.policy.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before_p[k])]
    assert any("conv" in k for k in changed_b)
    assert any("action_net" in k for k in changed_p) and any("mlp_extractor.policy_net" in k for k in changed_p)
    # The critic is not trained by the policy-gradient step (nor by the backbone's loss).
    assert all(torch.equal(v, before_p[k]) for k, v in model.policy.state_dict().items() if k.startswith("value_net"))
    assert result["policy_steps"] == 2 * (len(train_set) // 32)
    assert all("val_accuracy" in r for r in result["history"])


def test_greedy_backbone_masks_are_the_pairs_own(monkeypatch):
    pair, model, train_set, policy_set, reward = _setup()
    seen = []
    decide = type(pair).decide

    def spy(self, images, deterministic=True):
        seen.append(deterministic)
        return decide(self, images, deterministic)

    monkeypatch.setattr(type(pair), "decide", spy)
    joint_finetune(pair, train_set, policy_set, None, reward, _cfg(epochs=1, backbone_masks="greedy"))
    assert seen and all(seen)
    with pytest.raises(ConfigError, match="backbone_masks"):
        _cfg(backbone_masks="random")


def test_rungs_backbone_masks_train_every_rung_of_the_ladder(monkeypatch):
    """backbone_masks: rungs draws one of the ladder's masks per image, uniformly, whatever the
    policy would choose: every rung's path is fine-tuned (slimmable-style)."""
    import agents.joint as joint

    torch.manual_seed(0)
    backbone = build_resnet(8, num_classes=4, width=4)
    data = make_synthetic(192, num_classes=4, seed=1)
    train_set, policy_set = split_train_val(data, 0.5, seed=0)
    ladder = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    cfg = PolicyConfig(action="ladder", observation="stem", num_envs=8, n_steps=4)
    task = SkipTask(backbone, policy_set, RewardConfig(lam=0.05), observation="stem", ladder=ladder)
    pair = make_dynamic_model(cfg, backbone, build_model(cfg, make_vec_env(task, cfg), seed=0, device="cpu"), ladder)
    drawn = []
    train = joint.train

    def spy(*args, mask_sampler, **kwargs):
        def sampler(images, labels, gen):
            masks = mask_sampler(images, labels, gen)
            drawn.append(masks)
            return masks
        return train(*args, mask_sampler=sampler, **kwargs)

    monkeypatch.setattr(joint, "train", spy)
    joint_finetune(pair, train_set, policy_set, None, RewardConfig(lam=0.05), _cfg(epochs=1, backbone_masks="rungs"))
    masks = torch.cat(drawn)
    assert len(masks) == len(train_set) // 32 * 32
    rung = (masks[:, None, :] == ladder[None]).all(2)  # which rung each mask is
    assert rung.any(1).all()  # only the ladder's masks
    counts = rung.sum(0).float()
    assert (counts > 0.6 * len(masks) / 4).all(), counts  # every rung, about a quarter each
    pair_without_ladder = _setup()[0]
    with pytest.raises(ConfigError, match="ladder"):
        joint_finetune(pair_without_ladder, train_set, policy_set, None, RewardConfig(lam=0.05), _cfg(backbone_masks="rungs"))


def test_pair_checkpoint_holds_both_and_resumes(setup, tmp_path):
    pair, model, train_set, policy_set, reward = setup
    joint_finetune(pair, train_set, policy_set, None, reward, _cfg(epochs=1), checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    assert any(k.startswith("backbone.") for k in state["model"]) and any(k.startswith("policy.") for k in state["model"])
    assert state["epoch"] == 1
    result = joint_finetune(pair, train_set, policy_set, None, reward, _cfg(epochs=2), checkpoint_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_stop_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch):
    reference, model, train_set, policy_set, reward = _setup()
    joint_finetune(reference, train_set, policy_set, None, reward, _cfg(), checkpoint_dir=tmp_path / "a")

    pair, model, train_set, policy_set, reward = _setup()
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
            joint_finetune(pair, train_set, policy_set, None, reward, _cfg(), checkpoint_dir=tmp_path / "b")
    finally:
        clear_stop()
    monkeypatch.setattr(PolicyGradientStep, "__call__", step)
    resumed, model, train_set, policy_set, reward = _setup()
    torch.manual_seed(99)  # the checkpoint restores the global RNG the policy samples from
    joint_finetune(resumed, train_set, policy_set, None, reward, _cfg(), checkpoint_dir=tmp_path / "b", resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_finetune_config_is_refused():
    with pytest.raises(ConfigError, match="policy_lr"):
        _cfg(policy_lr=0)
