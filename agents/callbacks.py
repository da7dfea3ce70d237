"""The callbacks of policy training: TensorBoard task metrics, BlockDrop's curriculum, a λ
warm-up, periodic evaluation with exact-resume checkpoints, and a progress bar.

A checkpoint is taken at a rollout boundary (after the update, before new experience) and has
three files: ``last.zip`` (SB3: weights, optimiser, timestep count, current observations),
``state-<timesteps>.pt`` (what SB3 leaves out: the environments' position, the RNG states and
the progress record) and ``progress.json`` (evaluation history, time spent, for reading).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from tqdm.auto import tqdm

from agents.adaptivity import log_adaptivity
from agents.evaluation import evaluate_policy_on
from backbone.training.interrupt import stop_requested
from backbone.files import write_atomically
from envs.block_skip import SkipTask

if TYPE_CHECKING:
    from agents.rl import PolicyConfig


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


class LambdaWarmupCallback(BaseCallback):
    """λ rises linearly from 0 to ``reward.lam`` over the first ``steps`` timesteps (set on the
    training envs at each rollout start; a function of the timestep count, so a resumed run
    continues the same schedule). Why: on a backbone that loses most of its accuracy to a few
    random drops, a policy whose early, random decisions run an arbitrary few blocks finds blocks
    worth less than their price and settles on running none (the sequential env on akamaster's
    ResNet-32 at λ ≥ 0.045, docs/results.md). Starting with free blocks, it first learns which
    blocks pay on which images, then sheds them as the price rises."""

    def __init__(self, reward, steps: int):
        super().__init__()
        self.reward, self.steps = reward, steps

    def lam(self, timesteps: int) -> float:
        return self.reward.lam * min(1.0, timesteps / self.steps)

    def _on_rollout_start(self) -> None:
        lam = self.lam(self.num_timesteps)
        self.training_env.set_attr("reward", dataclasses.replace(self.reward, lam=lam))
        self.logger.record("charts/lambda", lam)

    def _on_training_end(self) -> None:
        self.training_env.set_attr("reward", self.reward)

    def _on_step(self) -> bool:
        return True


def save_atomic(model: BaseAlgorithm, path: Path) -> None:
    """``model.save`` without ever damaging ``path``: serialised in memory, then written
    atomically (a failed write is a ``CheckpointError`` and leaves no temporary file)."""
    buffer = io.BytesIO()
    model.save(buffer)
    write_atomically(path, buffer.getvalue(), what="policy")


class CheckpointEvalCallback(BaseCallback):
    """Every ``eval_every`` steps: evaluate the deterministic policy on held-out images. Every
    ``checkpoint_every`` steps, and when SIGINT/SIGTERM asks to stop, save a checkpoint at the
    next rollout boundary (after the update, before new experience): ``last.zip`` (weights,
    optimiser, timestep count, the current observations), ``state-<timesteps>.pt`` (the envs'
    position, the RNG states, the progress record) and ``progress.json`` (history, time spent). Resuming from there continues
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
            # Is it input-adaptive? Distinct masks, spread of blocks, blocks per difficulty group.
            log_adaptivity(lambda tag, value, _step: self.logger.record(
                tag, value, exclude=("stdout", "log", "json", "csv") if torch.is_tensor(value) else None), "eval", m)
            self.progress["eval_history"].append({"timesteps": self.num_timesteps, **{k: m[k] for k in ("accuracy", "blocks_used", "flops_ratio", "reward")}})
        return True

    def save(self) -> None:
        now = time.perf_counter()
        self.progress["train_time_s"] += now - self._tic
        self._tic = now
        self.progress["timesteps"] = self.num_timesteps
        # The state file is named by its timestep and written before last.zip, and the older one
        # is deleted only after: a kill at any moment leaves a last.zip whose state file exists.
        state = save_training_state(self.out_dir, self.model, self.progress)
        save_atomic(self.model, self.out_dir / "last.zip")
        for old in self.out_dir.glob("state-*.pt"):
            if old != state:
                old.unlink(missing_ok=True)
        write_atomically(self.out_dir / "progress.json", json.dumps(self.progress, indent=2).encode(), what="file")


def state_path(out_dir: Path, timesteps: int) -> Path:
    return Path(out_dir) / f"state-{timesteps}.pt"


def save_training_state(out_dir: Path, model: BaseAlgorithm, progress: dict) -> Path:
    """What SB3's zip leaves out but an exact resume needs: the envs' position, the RNGs (torch
    samples the actions, NumPy shuffles the PPO minibatches) and the progress record."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {
        "timesteps": model.num_timesteps,
        "progress": json.dumps(progress),
        "env": model.get_env().unwrapped.get_state(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_atomically(state_path(out_dir, model.num_timesteps), buffer.getvalue())


def restore_training_state(out_dir: Path, model: BaseAlgorithm) -> dict | None:
    """Put the envs and RNGs back as :func:`save_training_state` found them at the model's
    timestep and return the progress record of then; None (the envs start afresh) when that
    state file is missing or unreadable."""
    path = state_path(out_dir, model.num_timesteps)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # unreadable (not written by us): the resume is still correct, just not exact
        return None
    if not isinstance(state, dict) or state.get("timesteps") != model.num_timesteps:
        return None
    model.get_env().unwrapped.set_state(state["env"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    rng = state["numpy_rng"]
    np.random.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"], rng["cached"]))
    return json.loads(state["progress"])


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
