"""Train block-skipping policies with stable-baselines3 on the batched environments.

``train_policy`` builds (or resumes) an SB3 PPO/A2C model on a ``BlockSkipVecEnv`` (one-shot) or
``BlockSkipSeqVecEnv`` (sequential), and trains it with callbacks that log the task metrics to
TensorBoard (``charts/accuracy``, ``charts/blocks_used``, ``charts/flops_ratio``,
``charts/reward``, per-block keep rates), run BlockDrop's curriculum, evaluate the deterministic
policy on held-out images and write resumable checkpoints.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecMonitor
from tqdm.auto import tqdm

from agents.policies import policy_kwargs
from backbone.cost import count_flops
from backbone.errors import CheckpointError, ConfigError
from backbone.interrupt import Interrupted, deferred_stop, stop_requested
from backbone.train import NonFiniteLossError
from envs.block_skip import SkipTask
from envs.rewards import RewardConfig
from envs.vec import BlockSkipSeqVecEnv, BlockSkipVecEnv

ALGOS = {"ppo": PPO, "a2c": A2C}


@dataclass
class PolicyConfig:
    """How the block-skipping policy is trained (``policy:`` section of an experiment config)."""

    algo: str = "ppo"  # ppo | a2c
    env: str = "oneshot"  # oneshot: one MultiBinary mask per image; sequential: one decision per block
    reward: RewardConfig = field(default_factory=RewardConfig)
    extractor: str = "tiny"  # tiny | resnet: the policy's image network (one-shot only)
    extractor_width: int = 16
    obs_size: int | None = None  # one-shot: downsample the observed image to this size (cheaper policy)
    num_envs: int = 64  # images per batched env step (one backbone call)
    timesteps: int = 100_000
    n_steps: int = 8  # rollout steps per env before each update
    batch_size: int = 256  # PPO minibatch
    n_epochs: int = 4  # PPO epochs per rollout
    learning_rate: float = 3e-4
    ent_coef: float = 0.01
    gamma: float = 1.0  # no discounting: only the episode's total reward matters
    gae_lambda: float = 0.95
    hidden: int = 64  # width of the actor and critic heads
    curriculum: bool = False  # BlockDrop: decide only the last k blocks first, k grows by one ...
    curriculum_steps: int = 5_000  # ... every this many timesteps
    eval_every: int = 10_000  # timesteps between deterministic evaluations on held-out images
    eval_fraction: float = 0.2  # part of the policy's images kept for those evaluations
    checkpoint_every: int = 20_000
    data_split: str = "val"  # images the policy trains on: val (not seen by the backbone) or train

    def __post_init__(self) -> None:
        if isinstance(self.reward, dict):
            self.reward = RewardConfig(**self.reward)
        checks = [
            (self.algo in ALGOS, f"policy.algo must be one of {', '.join(ALGOS)}, got {self.algo!r}"),
            (self.env in ("oneshot", "sequential"), f"policy.env must be oneshot or sequential, got {self.env!r}"),
            *[(getattr(self, name) >= 1, f"policy.{name} must be >= 1, got {getattr(self, name)}")
              for name in ("num_envs", "timesteps", "n_steps", "batch_size")],
            (self.learning_rate > 0, "policy.learning_rate must be > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "policy.gamma and gae_lambda must be in [0, 1]"),
            (self.curriculum_steps >= 1 and self.eval_every >= 1 and self.checkpoint_every >= 1,
             "policy.curriculum_steps, eval_every and checkpoint_every must be >= 1"),
            (0 <= self.eval_fraction < 1, "policy.eval_fraction must be in [0, 1)"),
            (self.data_split in ("val", "train"), "policy.data_split must be val or train"),
            (self.obs_size is None or self.obs_size >= 8, "policy.obs_size must be >= 8 (or null)"),
            (not (self.curriculum and self.env == "sequential"), "policy.curriculum is for the oneshot env"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def make_vec_env(task: SkipTask, cfg: PolicyConfig) -> VecMonitor:
    """The batched env of ``cfg.env`` with ``cfg.num_envs`` images per step, episode stats added."""
    cls = BlockSkipVecEnv if cfg.env == "oneshot" else BlockSkipSeqVecEnv
    return VecMonitor(cls(task, cfg.num_envs))


def build_model(cfg: PolicyConfig, env, seed: int, device: str | torch.device = "auto") -> BaseAlgorithm:
    """A fresh SB3 model for ``env``; image policies get a 32x32-friendly features extractor."""
    kwargs = dict(
        learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
        ent_coef=cfg.ent_coef, seed=seed, device=device, verbose=0,
    )
    if cfg.algo == "ppo":
        kwargs.update(batch_size=min(cfg.batch_size, cfg.n_steps * cfg.num_envs), n_epochs=cfg.n_epochs)
    if cfg.env == "oneshot":
        return ALGOS[cfg.algo]("CnnPolicy", env, policy_kwargs=policy_kwargs(cfg.extractor, cfg.extractor_width, cfg.hidden), **kwargs)
    return ALGOS[cfg.algo]("MlpPolicy", env, policy_kwargs={"net_arch": {"pi": [cfg.hidden], "vf": [cfg.hidden]}}, **kwargs)


def policy_flops(model: BaseAlgorithm, task: SkipTask, env_kind: str) -> int:
    """FLOPs of the policy's decisions for one image (actor only; the critic is not used at inference)."""
    space = model.observation_space
    obs = torch.zeros((1,) + space.shape, device=model.device)
    was_training = model.policy.training
    # Eval mode: in training mode the policy's BatchNorm layers would fold this dummy input
    # into their running statistics and change every later decision.
    model.policy.set_training_mode(False)
    try:
        flops = count_flops(lambda: model.policy._predict(obs, deterministic=True))
    finally:
        model.policy.set_training_mode(was_training)
    return flops * (task.num_blocks if env_kind == "sequential" else 1)


def policy_keep_masks(model: BaseAlgorithm, observations: torch.Tensor) -> torch.Tensor:
    """The one-shot policy's deterministic keep masks for a batch of observations, computed as
    a deployed model would: the policy network on the device, no NumPy round trip (what SB3's
    ``predict`` adds). Same masks as ``model.predict(..., deterministic=True)``."""
    model.policy.set_training_mode(False)
    with torch.no_grad():
        actions = model.policy.get_distribution(observations.float()).get_actions(deterministic=True)
    return actions.reshape(observations.shape[0], -1).bool()


@torch.no_grad()
def evaluate_policy_on(
    model: BaseAlgorithm, task: SkipTask, env_kind: str = "oneshot", batch_size: int = 512, extra_flops: float = 0.0
) -> dict:
    """Deterministic policy on every image of ``task.dataset``: accuracy, blocks, FLOPs, keep rates.

    ``extra_flops``: per-image FLOPs to add to the backbone's (the policy's own, see ``policy_flops``).
    """
    results = {k: [] for k in ("correct", "blocks_used", "flops", "keep_mask", "reward")}
    for start in range(0, task.num_images, batch_size):
        idx = torch.arange(start, min(start + batch_size, task.num_images), device=task.device)
        if env_kind == "oneshot":
            out = task.play(idx, policy_keep_masks(model, task.observation(idx)))
        else:
            h, used = task.seq_start(idx), torch.zeros(len(idx), dtype=torch.long, device=task.device)
            keep = torch.zeros(len(idx), task.num_blocks, dtype=torch.bool, device=task.device)
            for i in range(task.num_blocks):
                run = task.seq_effective_run(policy_keep_masks(model, task.seq_observation(h, i, used))[:, 0], i)
                h, used, keep[:, i] = task.seq_block(h, i, run), used + run.long(), run
            out = task.seq_finish(h, idx, used, keep)
        for key in results:
            results[key].append(out[key].cpu())
    r = {k: torch.cat(v) for k, v in results.items()}
    correct, blocks = r["correct"].float(), r["blocks_used"].double()
    flops = r["flops"].double() + extra_flops
    metrics = {
        "num_images": task.num_images,
        "accuracy": correct.mean().item(),
        "blocks_used": blocks.mean().item(),
        "blocks_used_std": blocks.std(unbiased=False).item(),
        "flops": flops.mean().item(),
        "flops_ratio": (flops / task.cost.full_flops).mean().item(),
        "reward": r["reward"].double().mean().item(),
        "keep_rate_per_block": r["keep_mask"].float().mean(0).tolist(),
        "blocks_histogram": torch.bincount(r["blocks_used"].long(), minlength=task.num_blocks + 1).tolist(),
    }
    metrics["by_class"] = _grouped(task.dataset.labels.cpu(), correct, blocks, task.dataset.classes)
    if task.dataset.difficulty is not None:
        metrics["by_difficulty"] = _grouped(task.dataset.difficulty.cpu(), correct, blocks)
    metrics["top_masks"] = _top_masks(r["keep_mask"], correct)
    return metrics


def _grouped(groups: torch.Tensor, correct: torch.Tensor, blocks: torch.Tensor, names=None) -> dict:
    return {
        (names[int(g)] if names else str(int(g))): {
            "accuracy": correct[groups == g].mean().item(),
            "blocks_used": blocks[groups == g].mean().item(),
            "count": int((groups == g).sum()),
        }
        for g in groups.unique()
    }


def _top_masks(keep_mask: torch.Tensor, correct: torch.Tensor, k: int = 5) -> list[dict]:
    """The ``k`` most frequent masks ("1" = block run), with their share and accuracy."""
    patterns, inverse, counts = torch.unique(keep_mask.bool(), dim=0, return_inverse=True, return_counts=True)
    order = counts.argsort(descending=True)[:k]
    return [
        {
            "mask": "".join("1" if b else "0" for b in patterns[i].tolist()),
            "share": counts[i].item() / len(keep_mask),
            "accuracy": correct[inverse == i].mean().item(),
        }
        for i in order.tolist()
    ]


class TaskMetricsCallback(BaseCallback):
    """Logs what the task is about, from the infos of the episodes finished in each rollout."""

    def __init__(self, num_blocks: int):
        super().__init__()
        self.num_blocks = num_blocks
        self._episodes: list[dict] = []

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done and "correct" in info:
                self._episodes.append(info)
        return True

    def _on_rollout_end(self) -> None:
        if not self._episodes:
            return
        eps = self._episodes
        keep = np.stack([np.asarray(e["keep_mask"], dtype=np.float32) for e in eps]).mean(0)
        self.logger.record("charts/accuracy", float(np.mean([e["correct"] for e in eps])))
        self.logger.record("charts/blocks_used", float(np.mean([e["blocks_used"] for e in eps])))
        self.logger.record("charts/flops_ratio", float(np.mean([e["flops_ratio"] for e in eps])))
        self.logger.record("charts/reward", float(np.mean([e["episode"]["r"] for e in eps if "episode" in e] or [0.0])))
        self.logger.record("charts/keep_rates", torch.as_tensor(keep), exclude=("stdout", "log", "json", "csv"))
        for i, rate in enumerate(keep):
            self.logger.record(f"keep_rate/block_{i:02d}", float(rate))
        self._episodes = []


class CurriculumCallback(BaseCallback):
    """BlockDrop's curriculum: the policy first decides only the last block, then one more every
    ``steps`` timesteps, until it decides them all (earlier blocks are forced on meanwhile)."""

    def __init__(self, num_blocks: int, steps: int):
        super().__init__()
        self.num_blocks, self.steps = num_blocks, steps

    def decided(self, timesteps: int) -> int:
        return min(self.num_blocks, 1 + timesteps // self.steps)

    def _on_rollout_start(self) -> None:
        k = self.decided(self.num_timesteps)
        self.training_env.set_attr("num_decided", k)
        self.logger.record("charts/curriculum_blocks_decided", k)

    def _on_training_end(self) -> None:
        self.training_env.set_attr("num_decided", self.num_blocks)

    def _on_step(self) -> bool:
        return True


def save_atomic(model: BaseAlgorithm, path: Path) -> None:
    """``model.save`` to a temp file, then rename: an interrupted save or a full disk never
    damages ``path`` (a failed write is a ``CheckpointError`` and leaves no temp file)."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.zip")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, RuntimeError)):  # RuntimeError: torch's zip writer
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CheckpointError(f"policy {path} could not be written ({reason}); any previous file there is unchanged") from err


class CheckpointEvalCallback(BaseCallback):
    """Every ``eval_every`` steps: evaluate the deterministic policy on held-out images. Every
    ``checkpoint_every`` steps, and when SIGINT/SIGTERM asks to stop, save a checkpoint at the
    next rollout boundary (after the update, before new experience): ``last.zip`` (weights,
    optimiser, timestep count, the current observations), ``state.pt`` (the envs' position and
    the RNG states) and ``progress.json`` (history, time spent). Resuming from there continues
    exactly as the uninterrupted run would have."""

    def __init__(self, out_dir: Path, eval_task: SkipTask | None, cfg: PolicyConfig, progress: dict, extra_flops: float):
        super().__init__()
        self.out_dir, self.eval_task, self.cfg, self.progress = out_dir, eval_task, cfg, progress
        self.extra_flops = extra_flops
        self._tic = time.perf_counter()
        self._next_eval = self._next_ckpt = 0
        self.stopped = False  # saved on a stop request; learn() ends at the next step

    def _on_training_start(self) -> None:
        self._next_eval = (self.num_timesteps // self.cfg.eval_every + 1) * self.cfg.eval_every
        self._next_ckpt = (self.num_timesteps // self.cfg.checkpoint_every + 1) * self.cfg.checkpoint_every

    def _on_rollout_start(self) -> None:
        due = self.num_timesteps >= self._next_ckpt
        if due:
            self._next_ckpt = (self.num_timesteps // self.cfg.checkpoint_every + 1) * self.cfg.checkpoint_every
        if due or stop_requested():
            self.save()
            self.stopped = stop_requested() is not None

    def _on_step(self) -> bool:
        if self.stopped:
            return False  # the step just taken is discarded: the checkpoint is from before it
        if self.eval_task is not None and self.num_timesteps >= self._next_eval:
            self._next_eval += self.cfg.eval_every
            m = evaluate_policy_on(self.model, self.eval_task, self.cfg.env, extra_flops=self.extra_flops)
            for key in ("accuracy", "blocks_used", "flops_ratio", "reward"):
                self.logger.record(f"eval/{key}", m[key])
            self.progress["eval_history"].append({"timesteps": self.num_timesteps, **{k: m[k] for k in ("accuracy", "blocks_used", "flops_ratio", "reward")}})
        return True

    def save(self) -> None:
        now = time.perf_counter()
        self.progress["train_time_s"] += now - self._tic
        self._tic = now
        self.progress["timesteps"] = self.num_timesteps
        # state.pt first: it names its timestep, so a kill between the files is detected on load.
        save_training_state(self.out_dir / "state.pt", self.model)
        save_atomic(self.model, self.out_dir / "last.zip")
        tmp = self.out_dir / ".progress.json.tmp"
        tmp.write_text(json.dumps(self.progress, indent=2))
        os.replace(tmp, self.out_dir / "progress.json")


def save_training_state(path: Path, model: BaseAlgorithm) -> None:
    """What SB3's zip leaves out but an exact resume needs: the envs' position and the RNGs
    (torch samples the actions, NumPy shuffles the PPO minibatches)."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {
        "timesteps": model.num_timesteps,
        "env": model.get_env().unwrapped.get_state(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        raise CheckpointError(f"{path} could not be written ({err}); any previous file there is unchanged") from err


def restore_training_state(path: Path, model: BaseAlgorithm) -> bool:
    """Put the envs and RNGs back as :func:`save_training_state` found them; False (and the envs
    start afresh) when the file is missing or belongs to another timestep than the model."""
    if not path.exists():
        return False
    state = torch.load(path, weights_only=True)
    if state.get("timesteps") != model.num_timesteps:
        return False
    model.get_env().unwrapped.set_state(state["env"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    rng = state["numpy_rng"]
    np.random.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"], rng["cached"]))
    return True


class ProgressBarCallback(BaseCallback):
    """A tqdm bar over timesteps (SB3's own needs ``rich``)."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total, initial=self.num_timesteps, desc="policy", unit="step", leave=False)

    def _on_step(self) -> bool:
        self.bar.update(self.num_timesteps - self.bar.n)
        return True

    def _on_training_end(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()


def train_policy(
    cfg: PolicyConfig,
    task: SkipTask,
    out_dir: Path,
    eval_task: SkipTask | None = None,
    seed: int = 0,
    resume: bool = False,
    tb_dir: Path | None = None,
) -> tuple[BaseAlgorithm, dict]:
    """Train (or continue, with ``resume``) a policy on ``task``; checkpoints go to ``out_dir``.

    Returns the model and ``{"train_time_s", "timesteps", "eval_history", "policy_flops"}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(task, cfg)
    env.seed(seed)
    last = out_dir / "last.zip"
    progress = {"train_time_s": 0.0, "timesteps": 0, "eval_history": []}
    if resume and last.exists():
        # force_reset=False keeps the observations saved in the zip; they are only valid with the
        # envs' saved position, so without it the envs start afresh (a valid, not exact, resume).
        model = ALGOS[cfg.algo].load(last, env=env, device=task.device, force_reset=False)
        if (out_dir / "progress.json").exists():
            progress = json.loads((out_dir / "progress.json").read_text())
    else:
        model = build_model(cfg, env, seed, device=task.device)
    if tb_dir is not None:
        model.set_logger(configure(str(tb_dir), ["tensorboard"]))
    extra_flops = policy_flops(model, task, cfg.env)
    if resume and last.exists():  # after policy_flops: nothing may draw from the restored RNGs
        if restore_training_state(out_dir / "state.pt", model):
            print(f"policy: resuming exactly at timestep {model.num_timesteps}")
        else:
            model._last_obs = None  # SB3's learn() then resets the envs
            print(f"policy: resuming at timestep {model.num_timesteps} with fresh episodes (no matching state.pt)")
    saver = CheckpointEvalCallback(out_dir, eval_task, cfg, progress, extra_flops)
    progress_bar = ProgressBarCallback(cfg.timesteps)
    callbacks = [TaskMetricsCallback(task.num_blocks), saver, progress_bar]
    if cfg.curriculum:
        callbacks.append(CurriculumCallback(task.num_blocks, cfg.curriculum_steps))
    remaining = cfg.timesteps - model.num_timesteps
    if remaining > 0:
        try:
            with deferred_stop():
                model.learn(remaining, callback=callbacks, reset_num_timesteps=False, log_interval=1)
        except ValueError as err:  # torch.distributions refuses NaN logits: the policy diverged
            if "invalid values" not in str(err):
                raise
            kept = f"the last checkpoint ({last}) is kept" if last.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite policy outputs at timestep {model.num_timesteps}/{cfg.timesteps}; {kept}. "
                f"Lower policy.learning_rate."
            ) from err
        finally:
            progress_bar.close()  # before any error line, which would land on the bar's line
        if saver.stopped:
            raise Interrupted(
                f"{stop_requested()}: stopped at timestep {saver.progress['timesteps']}/{cfg.timesteps}; "
                f"saved {last}: rerun with --resume"
            )
        saver.save()
    progress["policy_flops"] = extra_flops
    env.close()
    return model, progress
