"""What the policy sees and is paid: stem-feature observations, graded rewards with a per-image
baseline, bounded exploration, and the deployable backbone + policy pair."""

import numpy as np
import pytest
import torch

from agents.pair import DynamicModel
from agents.policies import bound_logits
from agents.rl import PolicyConfig, build_model, make_dynamic_model, make_skip_task, make_vec_env
from backbone import build_resnet
from backbone.data.datasets import make_synthetic
from envs import BlockSkipVecEnv, RewardConfig, SkipTask
from envs.observations import stem_feature_dim, stem_features


def _backbone():
    torch.manual_seed(0)
    model = build_resnet(8, num_classes=4, width=4)
    for block in model.blocks:
        torch.nn.init.uniform_(block.bn2.weight, 0.5, 1.5)
    return model.eval()


def test_stem_observation_is_the_backbones_pooled_stem():
    backbone, data = _backbone(), make_synthetic(20, num_classes=4)
    task = SkipTask(backbone, data, observation="stem", stem_grid=2)
    assert task.obs_shape == (stem_feature_dim(4, 2),) == (20,)
    obs = task.observation(torch.arange(3))
    with torch.no_grad():
        h = backbone.stem(data.images[:3])
    torch.testing.assert_close(obs[:, :16], torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))
    torch.testing.assert_close(obs[:, 16:], h.flatten(2).std(2, unbiased=False))
    env = BlockSkipVecEnv(task, 4)
    assert env.observation_space.dtype == np.float32 and env.reset().shape == (4, 20)


def test_graded_score_and_per_image_baseline():
    backbone, data = _backbone(), make_synthetic(32, num_classes=4)
    plain = SkipTask(backbone, data, RewardConfig(lam=0.1))
    prob = SkipTask(backbone, data, RewardConfig(lam=0.1, signal="prob"))
    based = SkipTask(backbone, data, RewardConfig(lam=0.1, signal="prob", baseline="full"))
    idx, mask = torch.arange(32), torch.rand(32, 3) < 0.5
    r_plain, r_prob, r_based = (t.play(idx, mask) for t in (plain, prob, based))
    with torch.no_grad():
        p_true = backbone(data.images, mask).softmax(1).gather(1, data.labels.view(-1, 1)).squeeze(1)
        p_full = backbone(data.images).softmax(1).gather(1, data.labels.view(-1, 1)).squeeze(1)
    used = mask.sum(1).float()
    torch.testing.assert_close(r_plain["reward"], r_plain["correct"].float() - 0.1 * used)
    torch.testing.assert_close(r_prob["reward"], p_true - 0.1 * used)
    # The baseline is a per-image constant: the reward of every mask moves by the same amount.
    torch.testing.assert_close(r_based["reward"], p_true - p_full - 0.1 * used)
    full_mask = torch.ones(32, 3, dtype=torch.bool)
    torch.testing.assert_close(based.play(idx, full_mask)["reward"], torch.full((32,), -0.3))
    with pytest.raises(Exception, match="signal"):
        RewardConfig(signal="margin")
    with pytest.raises(Exception, match="linear reward only"):
        RewardConfig(kind="blockdrop", baseline="full")


def test_bounded_exploration_keeps_probabilities_inside_and_decisions_unchanged():
    logits = torch.tensor([[-30.0, -1.0, 0.0, 2.0, 30.0]])
    p = torch.sigmoid(bound_logits(logits, 0.8, binary=True))
    assert ((p >= 0.2 - 1e-6) & (p <= 0.8 + 1e-6)).all()
    assert torch.equal(p > 0.5, torch.sigmoid(logits) > 0.5)
    two_way = torch.softmax(bound_logits(torch.tensor([[3.0, -3.0]]), 0.8, binary=False), -1)
    torch.testing.assert_close(two_way, torch.tensor([[0.8, 0.2]]), atol=2e-3, rtol=0)


@pytest.mark.parametrize("env_kind,observation", [("oneshot", "stem"), ("oneshot", "pixels"), ("sequential", "pixels")])
def test_pair_forward_equals_the_backbone_with_the_greedy_masks(env_kind, observation):
    backbone, data = _backbone(), make_synthetic(24, num_classes=4)
    cfg = PolicyConfig(env=env_kind, observation=observation, num_envs=8, n_steps=4, extractor_width=4, hidden=8,
                       exploration_bound=0.8)
    task = make_skip_task(cfg, backbone, data)
    model = build_model(cfg, make_vec_env(task, cfg), seed=0, device="cpu")
    pair = make_dynamic_model(cfg, backbone, model).eval()
    masks = pair.decide(data.images)
    assert masks.shape == (24, 3) and masks.dtype == torch.bool
    with torch.no_grad():
        torch.testing.assert_close(pair(data.images), backbone(data.images, masks))
    roll = pair.rollout(data.images, deterministic=False)
    assert roll.log_prob.shape == (24,) and roll.log_prob.requires_grad and (roll.log_prob <= 0).all()
    assert ((roll.keep_prob >= 0.2 - 1e-5) & (roll.keep_prob <= 0.8 + 1e-5)).all()
    if env_kind == "oneshot":
        obs = task.observation(torch.arange(24))
        actions, _ = model.predict(obs.numpy(), deterministic=True)
        assert np.array_equal(actions.astype(bool), masks.numpy())  # what SB3 itself would decide


def test_pair_observes_like_the_env():
    backbone, data = _backbone(), make_synthetic(10, num_classes=4)
    pair = DynamicModel(backbone, torch.nn.Identity(), "oneshot", "stem", stem_grid=4)
    with torch.no_grad():
        obs = pair.observe(data.images, backbone.stem(data.images))
    torch.testing.assert_close(obs, stem_features(backbone, data.images, 4))
