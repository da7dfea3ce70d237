"""Policy training with SB3 on the batched environments."""

import json
import tempfile

import numpy as np
import pytest
import torch

from agents.callbacks import TaskMetricsCallback
from agents.evaluation import evaluate_policy_on, policy_flops
from agents.rl import PolicyConfig, build_model, make_vec_env, train_policy
from backbone import build_resnet
from backbone.data.datasets import ImageDataset, make_synthetic
from backbone.errors import ConfigError
from backbone.training.interrupt import Interrupted, clear_stop, request_stop
from envs.block_skip import SkipTask
from envs.rewards import RewardConfig

USELESS = (1, 3, 4)  # blocks whose residual branch is zero: skipping them changes nothing


def toy_task(lam=0.05, n=256, seed=0):
    """A backbone that is always right with all blocks (labels are its own predictions), in which
    blocks USELESS do nothing and the others change the prediction when skipped."""
    torch.manual_seed(seed)
    backbone = build_resnet(14, num_classes=4, width=8).eval()
    for i, block in enumerate(backbone.blocks):
        if i in USELESS:
            torch.nn.init.zeros_(block.bn2.weight)
            torch.nn.init.zeros_(block.bn2.bias)
        else:
            torch.nn.init.normal_(block.bn2.weight, std=2.0)
    images = make_synthetic(n, num_classes=4, seed=seed).images
    with torch.no_grad():
        labels = backbone(images).argmax(1)
    dataset = ImageDataset(images, labels, ["a", "b", "c", "d"])
    return SkipTask(backbone, dataset, RewardConfig(kind="linear", lam=lam))


def small_cfg(**kw):
    base = dict(num_envs=64, n_steps=4, batch_size=128, n_epochs=4, timesteps=256, learning_rate=3e-3,
                ent_coef=0.0, extractor_width=8, eval_every=10**6, checkpoint_every=10**6)
    base.update(kw)
    return PolicyConfig(**base)


def test_toy_backbone_punishes_skipping_useful_blocks():
    task = toy_task()
    idx = torch.arange(task.num_images)
    keep_all = torch.ones(task.num_images, task.num_blocks, dtype=torch.bool)
    assert task.play(idx, keep_all)["correct"].all()
    no_useless = keep_all.clone()
    no_useless[:, list(USELESS)] = False
    assert task.play(idx, no_useless)["correct"].all()
    for useful in (i for i in range(task.num_blocks) if i not in USELESS):
        mask = keep_all.clone()
        mask[:, useful] = False
        assert task.play(idx, mask)["correct"].float().mean() < 0.6


def test_ppo_learns_to_drop_useless_blocks(tmp_path):
    task = toy_task()
    cfg = small_cfg(timesteps=6000)
    untrained = build_model(cfg, make_vec_env(task, cfg), seed=0, device="cpu")
    before = evaluate_policy_on(untrained, task)
    model, progress = train_policy(cfg, task, tmp_path, seed=0)
    result = evaluate_policy_on(model, task)
    keep = np.array(result["keep_rate_per_block"])
    useful = [i for i in range(task.num_blocks) if i not in USELESS]
    assert keep[list(USELESS)].max() < 0.2, keep
    # Useful blocks still run where they matter. (Not always: a policy may skip one on images
    # whose prediction does not depend on it, which beats every input-independent mask.)
    assert keep[useful].mean() > keep[list(USELESS)].mean() + 0.3, keep
    assert result["accuracy"] > 0.85
    # Keeping every block earns 1 - 0.05 * 6 = 0.70; the learned policy earns clearly more.
    assert result["reward"] > 0.8 and result["reward"] > before["reward"]
    assert progress["timesteps"] >= 6000 and (tmp_path / "last.zip").exists()


@pytest.mark.parametrize("algo,env", [("ppo", "oneshot"), ("a2c", "oneshot"), ("ppo", "sequential")])
def test_training_runs_and_saved_policy_acts_the_same(tmp_path, monkeypatch, algo, env):
    task = toy_task(n=64)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model, progress = train_policy(small_cfg(algo=algo, env=env, timesteps=512), task, tmp_path, seed=1)
    assert list(scratch.iterdir()) == []  # no SB3 log folder left in the temporary directory
    assert progress["policy_flops"] > 0
    loaded = type(model).load(tmp_path / "last.zip", device="cpu")
    before, after = evaluate_policy_on(model, task, env), evaluate_policy_on(loaded, task, env)
    assert before == after
    obs = task.observation(torch.arange(8)).numpy() if env == "oneshot" else None
    if obs is not None:
        np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


def test_resume_continues_to_the_total_timesteps(tmp_path):
    task = toy_task(n=64)
    cfg = small_cfg(timesteps=512, checkpoint_every=256)
    train_policy(cfg, task, tmp_path, seed=2)
    first = json.loads((tmp_path / "progress.json").read_text())
    assert first["timesteps"] == 512
    more = small_cfg(timesteps=1024, checkpoint_every=256)
    model, progress = train_policy(more, task, tmp_path, seed=2, resume=True)
    assert model.num_timesteps == 1024 and progress["timesteps"] == 1024
    assert progress["train_time_s"] > first["train_time_s"]


@pytest.mark.parametrize("env", ["oneshot", "sequential"])
def test_stop_request_saves_and_resume_is_exact(tmp_path, monkeypatch, env):
    task = toy_task(n=64)
    cfg = small_cfg(env=env, timesteps=1024, checkpoint_every=10_000)  # 4 rollouts; only the stop saves
    straight, _ = train_policy(cfg, task, tmp_path / "a", seed=2)

    calls = []
    on_step = TaskMetricsCallback._on_step

    def ctrl_c_at_the_6th_step(self):  # in the 2nd rollout of 4 steps
        calls.append(1)
        if len(calls) == 6:
            request_stop("SIGINT")
        return on_step(self)

    monkeypatch.setattr(TaskMetricsCallback, "_on_step", ctrl_c_at_the_6th_step)
    try:
        with pytest.raises(Interrupted, match="SIGINT: stopped at timestep 512/1024"):
            train_policy(cfg, task, tmp_path / "b", seed=2)
    finally:
        clear_stop()
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["timesteps"] == 512
    monkeypatch.setattr(TaskMetricsCallback, "_on_step", on_step)
    torch.manual_seed(123), np.random.seed(123)  # the checkpoint must restore the RNGs
    resumed, progress = train_policy(cfg, task, tmp_path / "b", seed=2, resume=True)
    assert resumed.num_timesteps == 1024 and progress["timesteps"] == 1024
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_without_matching_state_starts_fresh_episodes(tmp_path):
    task = toy_task(n=64)
    train_policy(small_cfg(timesteps=512, checkpoint_every=256), task, tmp_path, seed=2)
    assert [p.name for p in tmp_path.glob("state-*.pt")] == ["state-512.pt"]  # older ones removed
    (tmp_path / "state-512.pt").unlink()  # e.g. a checkpoint from an older version
    model, progress = train_policy(small_cfg(timesteps=768, checkpoint_every=256), task, tmp_path, seed=2, resume=True)
    assert model.num_timesteps == 768 and progress["timesteps"] == 768
    (tmp_path / "state-768.pt").write_bytes(b"not a torch file")
    model, progress = train_policy(small_cfg(timesteps=1024, checkpoint_every=256), task, tmp_path, seed=2, resume=True)
    assert model.num_timesteps == 1024


def test_kill_between_the_checkpoint_files_still_resumes_exactly(tmp_path, monkeypatch):
    """A SIGKILL after the new state file but before the new last.zip: the old last.zip's own
    state file must still be there, so the resume stays exact."""
    import agents.callbacks as callbacks

    task = toy_task(n=64)
    cfg = small_cfg(num_envs=16, n_steps=4, batch_size=64, timesteps=256, checkpoint_every=64)
    straight, _ = train_policy(cfg, task, tmp_path / "a", seed=2)

    saves = []
    real_save_atomic = callbacks.save_atomic

    def killed_at_the_third_save(model, path):
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt  # the process dies here: state-192.pt written, last.zip still at 128
        real_save_atomic(model, path)

    monkeypatch.setattr(callbacks, "save_atomic", killed_at_the_third_save)
    with pytest.raises(KeyboardInterrupt):
        train_policy(cfg, task, tmp_path / "b", seed=2)
    monkeypatch.setattr(callbacks, "save_atomic", real_save_atomic)
    assert {p.name for p in (tmp_path / "b").glob("state-*.pt")} == {"state-128.pt", "state-192.pt"}
    torch.manual_seed(7), np.random.seed(7)
    resumed, progress = train_policy(cfg, task, tmp_path / "b", seed=2, resume=True)
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluation_matches_the_task_and_counts_the_policy(tmp_path):
    task = toy_task(n=64)
    model, progress = train_policy(small_cfg(timesteps=256), task, tmp_path, seed=3)
    extra = policy_flops(model, task, "oneshot")
    result = evaluate_policy_on(model, task, extra_flops=extra)
    masks = torch.as_tensor(model.predict(task.observation(torch.arange(64)).numpy(), deterministic=True)[0]).bool()
    out = task.play(torch.arange(64), masks)
    assert result["accuracy"] == pytest.approx(out["correct"].float().mean().item())
    assert result["blocks_used"] == pytest.approx(out["blocks_used"].double().mean().item())
    expected_flops = (out["flops"].double() + extra).mean().item()
    assert result["flops"] == pytest.approx(expected_flops)
    assert 0 < extra < task.cost.full_flops


def test_counting_policy_flops_changes_nothing(tmp_path):
    """A freshly loaded policy is in training mode; counting its FLOPs must not touch its
    BatchNorm statistics (that once made re-evaluations differ from the stage's own numbers)."""
    task = toy_task(n=64)
    model, _ = train_policy(small_cfg(timesteps=256), task, tmp_path, seed=5)
    loaded = type(model).load(tmp_path / "last.zip", device="cpu")
    before = {k: v.clone() for k, v in loaded.policy.state_dict().items()}
    policy_flops(loaded, task, "oneshot")
    assert all(torch.equal(v, before[k]) for k, v in loaded.policy.state_dict().items())
    assert evaluate_policy_on(loaded, task) == evaluate_policy_on(model, task)


def test_curriculum_forces_early_blocks_on(tmp_path):
    task = toy_task(n=64)
    from agents.callbacks import CurriculumCallback

    curriculum = CurriculumCallback(task.num_blocks, steps=100)
    assert [curriculum.decided(t) for t in (0, 99, 100, 450, 10**6)] == [1, 1, 2, 5, task.num_blocks]
    train_policy(small_cfg(timesteps=256, curriculum=True, curriculum_steps=128), task, tmp_path, seed=4)
    assert task.num_decided == task.num_blocks  # restored when training ends


def test_lambda_warmup_raises_the_price_of_a_block_from_zero(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.callbacks import LambdaWarmupCallback

    task = toy_task(lam=0.05, n=64)
    warmup = LambdaWarmupCallback(task.reward, steps=200)
    assert [warmup.lam(t) for t in (0, 100, 200, 10**6)] == pytest.approx([0.0, 0.025, 0.05, 0.05])
    train_policy(small_cfg(timesteps=512, n_steps=2, lam_warmup=384), task, tmp_path / "out", tb_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    charged = [e.value for e in events.Scalars("charts/lambda")]  # what the envs charged, per rollout
    assert charged[0] == 0.0 and charged == sorted(charged) and charged[-1] == pytest.approx(0.05)
    assert len(set(charged)) >= 3
    assert task.reward.lam == 0.05  # the card's λ again when training ends


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(algo="dqn"), "policy.algo"),
        (dict(env="tree"), "policy.env"),
        (dict(num_envs=0), "num_envs"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(curriculum=True, env="sequential"), "curriculum"),
        (dict(reward={"kind": "linear", "lam": -1.0}), "lam"),
        (dict(lam_warmup=-1), "lam_warmup"),
        (dict(lam_warmup=100, reward={"kind": "blockdrop"}), "lam_warmup"),
    ],
)
def test_bad_policy_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        PolicyConfig(**bad)


@pytest.mark.parametrize("env", ["oneshot", "sequential"])
def test_device_side_masks_equal_sb3_predict(tmp_path, env):
    from agents.evaluation import policy_keep_masks

    task = toy_task(n=64)
    model, _ = train_policy(small_cfg(env=env, timesteps=256), task, tmp_path, seed=4)
    if env == "oneshot":
        obs = task.observation(torch.arange(64))
    else:
        obs = task.seq_observation(task.seq_start(torch.arange(64)), 0, torch.zeros(64, dtype=torch.long))
    expected, _ = model.predict(obs.cpu().numpy(), deterministic=True)
    got = policy_keep_masks(model, obs)
    np.testing.assert_array_equal(got.reshape(expected.shape).numpy(), expected.astype(bool))
