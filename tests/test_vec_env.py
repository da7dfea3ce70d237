"""The batched SB3 VecEnvs: the VecEnv contract, seeding, and equality with DummyVecEnv."""

import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from backbone.data.datasets import make_synthetic
from backbone.models.resnet import build_resnet
from envs import BlockSkipEnv, BlockSkipSeqEnv, BlockSkipSeqVecEnv, BlockSkipVecEnv, RewardConfig, SkipTask

N = 6
INFO_KEYS = ("correct", "blocks_used", "prediction", "label", "index", "flops", "flops_ratio", "difficulty",
             "TimeLimit.truncated")




@pytest.fixture(scope="module")
def task() -> SkipTask:
    torch.manual_seed(1)
    model = build_resnet(14, num_classes=4, width=4)
    for block in model.blocks:  # zero-init bn2 would make every block an identity
        torch.nn.init.normal_(block.bn2.weight, 0.0, 1.0)
    torch.nn.init.normal_(model.fc.weight, 0.0, 1.0)  # else one class wins everywhere
    return SkipTask(model.eval(), make_synthetic(64, num_classes=4), RewardConfig(lam=0.05))


def dummy(task: SkipTask, env_class: type, n: int = N) -> DummyVecEnv:
    return DummyVecEnv([lambda: env_class(task=task)] * n)


def random_masks(rng: np.random.Generator, task: SkipTask, n: int = N) -> np.ndarray:
    return rng.integers(0, 2, size=(n, task.num_blocks)).astype(np.int8)


def assert_same_infos(infos_a: list, infos_b: list) -> None:
    assert len(infos_a) == len(infos_b)
    for a, b in zip(infos_a, infos_b):
        assert set(a) == set(b)
        for key in INFO_KEYS:
            if key in a:
                assert a[key] == b[key], key
        for key in ("keep_mask", "terminal_observation"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)


def test_vecenv_contract(task):
    venv = BlockSkipVecEnv(task, N)
    with pytest.raises(RuntimeError, match="reset"):
        venv.step(np.ones((N, task.num_blocks)))
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (N, 3, 32, 32) and obs.dtype == np.uint8
    assert len(venv.reset_infos) == N and set(venv.reset_infos[0]) == {"index", "label"}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3):
        masks = random_masks(rng, task)
        new_obs, rewards, dones, infos = venv.step(masks)
        assert rewards.shape == (N,) and rewards.dtype == np.float32 and dones.all() and len(infos) == N
        for i, info in enumerate(infos):
            assert np.array_equal(info["terminal_observation"], obs[i])  # the finished episode's image
            assert info["TimeLimit.truncated"] is False
            assert np.array_equal(info["keep_mask"], masks[i].astype(bool))
        # Auto-reset: the returned observations are the images the reset infos name.
        indices = [info["index"] for info in venv.reset_infos]
        assert np.array_equal(new_obs, task.dataset.images[indices].numpy())
        seen.update(indices)
        obs = new_obs
    assert len(seen) > N  # new images were drawn
    with pytest.raises(ValueError):
        venv.step(np.ones((N, task.num_blocks + 1)))
    assert venv.env_is_wrapped(VecMonitor) == [False] * N
    assert venv.get_attr("num_blocks", indices=[0, 2]) == [task.num_blocks] * 2
    venv.close()


def test_seeding(task):
    def first_obs(seed):
        venv = BlockSkipVecEnv(task, N)
        venv.seed(seed)
        return venv.reset()

    assert np.array_equal(first_obs(3), first_obs(3))
    assert not np.array_equal(first_obs(3), first_obs(4))
    assert not np.array_equal(first_obs(None), first_obs(None))  # unseeded: random (64^6 draws)
    venv = BlockSkipVecEnv(task, N)
    venv.set_options({"index": 5})  # forces the image, at the next reset only (like seeds)
    assert np.array_equal(venv.reset(), task.dataset.images[[5] * N].numpy())
    assert venv.reset_infos == [{"index": 5, "label": int(task.dataset.labels[5])}] * N
    venv.reset()
    assert [info["index"] for info in venv.reset_infos] != [5] * N


def test_equals_dummy_vec_env(task):
    batched, reference = BlockSkipVecEnv(task, N), dummy(task, BlockSkipEnv)
    assert batched.seed(11) == reference.seed(11)
    obs_b, obs_r = batched.reset(), reference.reset()
    assert np.array_equal(obs_b, obs_r) and batched.reset_infos == reference.reset_infos
    rng = np.random.default_rng(0)
    for _ in range(4):
        masks = random_masks(rng, task)
        obs_b, rew_b, done_b, infos_b = batched.step(masks)
        obs_r, rew_r, done_r, infos_r = reference.step(masks)
        assert np.array_equal(obs_b, obs_r) and np.array_equal(rew_b, rew_r) and np.array_equal(done_b, done_r)
        assert_same_infos(infos_b, infos_r)
        assert batched.reset_infos == reference.reset_infos


def test_set_attr_reaches_the_task(task):
    venv = BlockSkipVecEnv(task, N)
    try:
        venv.set_attr("num_decided", 2)
        assert task.num_decided == 2 and venv.get_attr("num_decided") == [2] * N
        venv.reset()
        _, _, _, infos = venv.step(np.zeros((N, task.num_blocks), dtype=np.int8))
        assert all(info["blocks_used"] == task.num_blocks - 2 for info in infos)
        assert venv.env_method("effective_mask", torch.zeros(1, task.num_blocks), indices=0)[0].sum() == 4
    finally:
        task.num_decided = task.num_blocks
    assert venv.get_attr("render_mode") == [None] * N and venv.has_attr("cost") and not venv.has_attr("nope")


def test_vec_monitor_and_evaluate_policy(task):
    class AllBlocks:  # any object with predict() is a policy for evaluate_policy
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.ones((len(obs), task.num_blocks), dtype=np.int8), state

    venv = VecMonitor(BlockSkipVecEnv(task, N))
    venv.seed(0)
    venv.reset()
    _, rewards, _, infos = venv.step(np.ones((N, task.num_blocks), dtype=np.int8))
    assert [info["episode"]["l"] for info in infos] == [1] * N
    assert np.allclose([info["episode"]["r"] for info in infos], rewards, atol=1e-6)
    returns, lengths = evaluate_policy(AllBlocks(), venv, n_eval_episodes=12, return_episode_rewards=True)
    assert len(returns) == 12 and set(lengths) == {1}
    right, wrong = 1 - 0.05 * task.num_blocks, -0.05 * task.num_blocks
    assert all(np.isclose(r, right, atol=1e-6) or np.isclose(r, wrong, atol=1e-6) for r in returns)


def test_sb3_trains_on_both_vec_envs(task):
    """SB3's own PPO runs on the batched envs and updates its weights (that it *learns* the task
    is checked in tests/test_rl.py and tests/test_learnability.py)."""
    from stable_baselines3 import PPO

    for venv in (BlockSkipVecEnv(task, 4), BlockSkipSeqVecEnv(task, 4)):
        model = PPO("MlpPolicy", venv, n_steps=6, batch_size=12, n_epochs=1, seed=0, device="cpu",
                    policy_kwargs={"net_arch": [8]})
        before = [p.detach().clone() for p in model.policy.parameters()]
        model.learn(24)
        assert model.num_timesteps >= 24
        assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))


def test_one_backbone_call_per_step(task):
    calls = []
    hook = task.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        venv = BlockSkipVecEnv(task, 16)
        venv.reset()
        rng = np.random.default_rng(0)
        for _ in range(3):
            venv.step(random_masks(rng, task, 16))
    finally:
        hook.remove()
    assert calls == [16, 16, 16]


def test_sequential_equals_dummy_vec_env(task):
    for reward in (RewardConfig(lam=0.05), RewardConfig(kind="blockdrop", penalty=0.5)):
        seq_task = SkipTask(task.backbone, task.dataset, reward)
        batched, reference = BlockSkipSeqVecEnv(seq_task, N), dummy(seq_task, BlockSkipSeqEnv)
        batched.seed(5), reference.seed(5)
        obs_b, obs_r = batched.reset(), reference.reset()
        np.testing.assert_allclose(obs_b, obs_r, atol=1e-5)
        rng = np.random.default_rng(0)
        returns = np.zeros(N)
        for step in range(2 * seq_task.num_blocks):  # two whole episodes
            actions = rng.integers(0, 2, size=N)
            obs_b, rew_b, done_b, infos_b = batched.step(actions)
            obs_r, rew_r, done_r, infos_r = reference.step(actions)
            np.testing.assert_allclose(obs_b, obs_r, atol=1e-5)
            np.testing.assert_allclose(rew_b, rew_r, atol=1e-6)
            assert done_b.all() == done_r.all() == ((step + 1) % seq_task.num_blocks == 0) == done_b.any()
            assert_same_infos(infos_b, infos_r)
            returns += rew_b
            if done_b.all():  # the return is the one-shot reward of the executed mask
                expected = seq_task.play(torch.tensor([i["index"] for i in infos_b]),
                                         torch.as_tensor(np.stack([i["keep_mask"] for i in infos_b])))["reward"]
                np.testing.assert_allclose(returns, expected.numpy(), atol=1e-5)
                assert batched.reset_infos == reference.reset_infos
                returns[:] = 0


def test_sequential_runs_each_block_once_per_step(task):
    calls = []
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
             for i, block in enumerate(task.backbone.blocks)]
    try:
        venv = BlockSkipSeqVecEnv(task, 8)
        venv.reset()
        for _ in range(task.num_blocks):
            venv.step(np.ones(8, dtype=np.int64))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == list(range(task.num_blocks))


@pytest.mark.parametrize("vec_class", [BlockSkipVecEnv, BlockSkipSeqVecEnv])
def test_saved_state_replays_the_same_steps(task, vec_class):
    """get_state/set_state (what a resumed PPO run restores) give back the same future steps."""
    import io

    vec = vec_class(task, N)
    vec.seed(3)
    vec.reset()
    rng = np.random.default_rng(0)
    shape = (N, task.num_blocks) if vec_class is BlockSkipVecEnv else (N,)
    actions = [rng.integers(0, 2, size=shape).astype(np.int8) for _ in range(task.num_blocks + 2)]
    vec.step(actions[0])  # mid-episode for the sequential env
    buffer = io.BytesIO()
    torch.save(vec.get_state(), buffer)  # must survive a weights_only round trip
    first = [vec.step(a) for a in actions[1:]]
    fresh = vec_class(task, N)
    buffer.seek(0)
    fresh.set_state(torch.load(buffer, weights_only=True))
    again = [fresh.step(a) for a in actions[1:]]
    for (obs_a, rew_a, done_a, _), (obs_b, rew_b, done_b, _) in zip(first, again):
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
        np.testing.assert_array_equal(done_a, done_b)
