"""The single-image Gymnasium envs (one-shot and sequential), the SkipTask and the rewards."""

import warnings

import gymnasium
import gymnasium.utils.env_checker
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbone.data.datasets import make_synthetic
from backbone.errors import ConfigError
from backbone.models.resnet import build_resnet
from backbone.models.weights import save_checkpoint
from envs import BlockSkipEnv, BlockSkipSeqEnv, RewardConfig, SkipTask, block_cost, episode_reward  # registers the ids

DATA = {"name": "synthetic", "train_size": 64, "test_size": 32, "num_classes": 4}


def make_backbone(depth: int = 14) -> torch.nn.Module:
    """A tiny random ResNet whose blocks change its predictions (zero-init bn2 would make every
    block an identity, and the default classifier predicts one class for everything)."""
    torch.manual_seed(1)
    model = build_resnet(depth, num_classes=4, width=4)
    for block in model.blocks:
        torch.nn.init.normal_(block.bn2.weight, 0.0, 1.0)
    torch.nn.init.normal_(model.fc.weight, 0.0, 1.0)
    return model.eval()




@pytest.fixture(scope="module")
def task() -> SkipTask:
    return SkipTask(make_backbone(), make_synthetic(64, num_classes=4), RewardConfig(lam=0.05))


def one_shot(task: SkipTask, index: int, mask: np.ndarray) -> tuple[float, dict]:
    env = BlockSkipEnv(task=task)
    env.reset(options={"index": index})
    _, reward, terminated, truncated, info = env.step(mask)
    assert terminated and not truncated
    return reward, info


def sequential(task: SkipTask, index: int, mask: np.ndarray) -> tuple[float, int, dict]:
    env = BlockSkipSeqEnv(task=task)
    env.reset(options={"index": index})
    ret, steps, terminated = 0.0, 0, False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(int(mask[steps]))
        assert obs.shape == env.observation_space.shape and not truncated
        ret, steps = ret + reward, steps + 1
    return ret, steps, info


@pytest.mark.parametrize("env_class", [BlockSkipEnv, BlockSkipSeqEnv])
def test_env_checkers_pass(task, env_class):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = env_class(task=task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite Box bounds, small images, no spec: expected
        gymnasium.utils.env_checker.check_env(env.unwrapped)
        sb3_check_env(env)


def test_make_from_checkpoint_and_data_config(tmp_path):
    path = save_checkpoint(tmp_path / "backbone.pt", make_backbone())
    for env_id in ("dyndepth/BlockSkip-v0", "dyndepth/BlockSkipSeq-v0"):
        env = gymnasium.make(env_id, backbone=str(path), data=DATA, split="val", reward={"lam": 0.02})
        obs, info = env.reset(seed=0)
        assert env.observation_space.contains(obs) and set(info) == {"index", "label"}
        assert env.unwrapped.task.reward.lam == 0.02
        assert 0 < env.unwrapped.task.num_images < 64  # the held-out val part of the 64 images
        env.step(env.action_space.sample())
    with pytest.raises(ConfigError):
        BlockSkipEnv(backbone=str(path), data=DATA, split="holdout")
    with pytest.raises(ConfigError):
        BlockSkipEnv(backbone=str(path))


def test_reward_arithmetic():
    correct = torch.tensor([True, False, True, False])
    used = torch.tensor([2, 0, 6, 3])
    linear = episode_reward(RewardConfig(lam=0.1), correct, used, 6)
    assert linear.dtype == torch.float32
    assert torch.allclose(linear, torch.tensor([0.8, 0.0, 0.4, -0.3]))
    normalized = episode_reward(RewardConfig(lam=0.6, normalize=True), correct, used, 6)
    assert torch.allclose(normalized, torch.tensor([0.8, 0.0, 0.4, -0.3]))
    blockdrop = episode_reward(RewardConfig(kind="blockdrop", penalty=0.5), correct, used, 6)
    assert torch.allclose(blockdrop, torch.tensor([1 - 1 / 9, -0.5, 0.0, -0.5]))
    assert block_cost(RewardConfig(lam=0.1), 6) == 0.1
    assert block_cost(RewardConfig(lam=0.6, normalize=True), 6) == pytest.approx(0.1)
    assert block_cost(RewardConfig(kind="blockdrop"), 6) is None


@pytest.mark.parametrize("bad", [{"kind": "quadratic"}, {"lam": -0.1}, {"penalty": -1.0}, {"lam": "a"},
                                 {"lam": float("nan")}, {"normalize": "yes"}, {"gamma": 1.0}])
def test_bad_reward_config(task, bad):
    with pytest.raises(ConfigError, match="policy.reward."):
        RewardConfig.from_any(bad)
    with pytest.raises(ConfigError):
        SkipTask(task.backbone, task.dataset, reward=bad)


def test_prediction_matches_backbone_with_that_mask(task):
    rng = np.random.default_rng(0)
    for index in rng.integers(task.num_images, size=8):
        mask = rng.integers(0, 2, size=task.num_blocks).astype(np.int8)
        reward, info = one_shot(task, int(index), mask)
        with torch.no_grad():
            logits = task.backbone(task.dataset.images[[index]], torch.as_tensor(mask).bool()[None])
        assert info["prediction"] == int(logits.argmax(1)) and info["index"] == index
        assert info["correct"] == (info["prediction"] == int(task.dataset.labels[index]) == info["label"])
        assert np.array_equal(info["keep_mask"], mask.astype(bool)) and info["blocks_used"] == mask.sum()
        assert info["flops"] == float(task.cost.mask_flops(torch.as_tensor(mask)[None])[0])
        assert reward == pytest.approx(float(info["correct"]) - 0.05 * mask.sum(), abs=1e-6)
        assert info["difficulty"] == int(task.dataset.difficulty[index])


def test_masks_change_predictions(task):
    """Guards the fixture: with identity-like blocks every other test would pass vacuously."""
    idx = torch.arange(task.num_images)
    full = task.play(idx, torch.ones(task.num_images, task.num_blocks))["prediction"]
    none = task.play(idx, torch.zeros(task.num_images, task.num_blocks))["prediction"]
    assert (full != none).any()


def test_all_ones_and_all_zeros(task):
    _, info = one_shot(task, 3, np.ones(task.num_blocks, dtype=np.int8))
    assert info["blocks_used"] == task.num_blocks and info["flops_ratio"] == 1.0
    assert info["flops"] == task.cost.full_flops
    _, info = one_shot(task, 3, np.zeros(task.num_blocks, dtype=np.int8))
    assert info["blocks_used"] == 0 and info["flops"] == task.cost.min_flops and info["flops_ratio"] < 1


def test_curriculum_forces_early_blocks(task):
    env = BlockSkipEnv(task=task)
    try:
        for k in range(task.num_blocks + 1):
            env.num_decided = k
            assert task.num_decided == k
            _, info = one_shot(task, 5, np.zeros(task.num_blocks, dtype=np.int8))
            forced = task.num_blocks - k
            assert info["keep_mask"][:forced].all() and not info["keep_mask"][forced:].any()
            seq_return, _, seq_info = sequential(task, 5, np.zeros(task.num_blocks, dtype=np.int8))
            assert np.array_equal(seq_info["keep_mask"], info["keep_mask"])
            assert seq_return == pytest.approx(float(seq_info["correct"]) - 0.05 * forced, abs=1e-6)
        for bad in (-1, task.num_blocks + 1, 1.5):
            with pytest.raises(ValueError):
                env.num_decided = bad
    finally:
        task.num_decided = task.num_blocks


@pytest.mark.parametrize("reward", [RewardConfig(lam=0.05), RewardConfig(lam=0.3, normalize=True),
                                    RewardConfig(kind="blockdrop", penalty=0.7)])
def test_sequential_equals_one_shot(task, reward):
    task = SkipTask(task.backbone, task.dataset, reward)
    rng = np.random.default_rng(1)
    for index in rng.integers(task.num_images, size=6):
        mask = rng.integers(0, 2, size=task.num_blocks).astype(np.int8)
        reward_one, info_one = one_shot(task, int(index), mask)
        seq_return, steps, info_seq = sequential(task, int(index), mask)
        assert steps == task.num_blocks
        assert seq_return == pytest.approx(reward_one, abs=1e-5)
        for key in ("prediction", "correct", "blocks_used", "flops", "flops_ratio", "label", "index"):
            assert info_seq[key] == info_one[key], key
        assert np.array_equal(info_seq["keep_mask"], info_one["keep_mask"])


def test_sequential_observation_layout(task):
    env = BlockSkipSeqEnv(task=task)
    obs, _ = env.reset(seed=0)
    width, blocks = task.backbone.arch["width"], task.num_blocks
    stats = 2 * 4 * width  # channel means, then channel stds, each padded to the last stage's width
    assert obs.shape == (stats + blocks + 1,) and obs.dtype == np.float32
    assert obs[stats] == 1 and obs[-1] == 0  # block 0 next, nothing used yet
    assert not obs[width:4 * width].any() and not obs[5 * width:stats].any()  # first-stage padding
    with torch.no_grad():
        h = task.backbone.stem(task.dataset.images[env.index:env.index + 1])
    np.testing.assert_allclose(obs[:width], h.mean(dim=(2, 3))[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(obs[4 * width:5 * width], h.flatten(2).std(2, unbiased=False)[0].numpy(), rtol=1e-4, atol=1e-5)
    obs, reward, *_ = env.step(1)
    assert obs[stats + 1] == 1 and obs[-1] == pytest.approx(1 / blocks)
    assert reward == pytest.approx(-0.05)


def test_reset_and_step_rules(task):
    env = BlockSkipEnv(task=task)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(task.num_blocks))
    first, info = env.reset(seed=7)
    assert np.array_equal(env.reset(seed=7)[0], first)
    assert np.array_equal(first, task.dataset.images[info["index"]].numpy())
    env.step(np.ones(task.num_blocks))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(task.num_blocks))  # the episode is over
    env.reset()
    with pytest.raises(ValueError):
        env.step(np.ones(task.num_blocks + 1))
    with pytest.raises(ValueError):
        env.reset(options={"index": task.num_images})
    with pytest.raises(ValueError, match="task"):
        BlockSkipEnv(task=task, reward={"lam": 0.5})  # the task already has its reward


def test_obs_size_downsamples(task):
    small = SkipTask(task.backbone, task.dataset, obs_size=16)
    env = BlockSkipEnv(task=small)
    obs, info = env.reset(seed=0)
    expected = F.interpolate(task.dataset.images[[info["index"]]].float(), size=(16, 16), mode="area")
    assert obs.shape == (3, 16, 16) and env.observation_space.shape == (3, 16, 16)
    assert np.array_equal(obs, expected.round().to(torch.uint8)[0].numpy())
    _, _, _, _, step_info = env.step(np.ones(task.num_blocks))  # the backbone still sees 32x32
    assert step_info["flops_ratio"] == 1.0
