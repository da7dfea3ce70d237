"""Train block-skipping policies with stable-baselines3 on the batched environments.

``train_policy`` builds (or resumes) an SB3 PPO/A2C model on a ``BlockSkipVecEnv`` (one-shot) or
``BlockSkipSeqVecEnv`` (sequential), and trains it with the callbacks of ``agents.callbacks``:
task metrics in TensorBoard (``charts/accuracy``, ``charts/blocks_used``, ``charts/flops_ratio``,
``charts/reward``, per-block keep rates), BlockDrop's curriculum, evaluation of the
deterministic policy on held-out images (``agents.evaluation``) and exact-resume checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.vec_env import VecMonitor

from agents.callbacks import (
    CheckpointEvalCallback,
    CurriculumCallback,
    LambdaWarmupCallback,
    ProgressBarCallback,
    TaskMetricsCallback,
    restore_training_state,
)
from agents.evaluation import policy_flops
from agents.pair import DynamicModel
from agents.policies import BoundedPolicy, policy_kwargs
from backbone.errors import ConfigError
from backbone.training.interrupt import Interrupted, deferred_stop, stop_requested
from backbone.training.loop import NonFiniteLossError
from envs.block_skip import SkipTask
from envs.observations import sequential_feature_statistics
from envs.rewards import RewardConfig
from envs.vec import BlockSkipSeqVecEnv, BlockSkipVecEnv

ALGOS = {"ppo": PPO, "a2c": A2C}


@dataclass
class PolicyConfig:
    """How the block-skipping policy is trained (``policy:`` section of an experiment config)."""

    algo: str = "ppo"  # ppo | a2c
    env: str = "oneshot"  # oneshot: one MultiBinary mask per image; sequential: one decision per block
    reward: RewardConfig = field(default_factory=RewardConfig)
    observation: str = "pixels"  # one-shot: pixels (an image network of its own) | stem (the backbone's stem features)
    # one-shot: blocks (a keep bit per block, MultiBinary) | ladder (pick one of the best fixed
    # subsets of each size, found exhaustively on the policy's images: Discrete(L+1))
    action: str = "blocks"
    ladder_search: str = "best"  # ladder: best subset of each size (exhaustive/beam) | nested (greedy elimination)
    # ladder: only the rungs of at least this many blocks. The card's reward sends an image that
    # no rung classifies to the empty rung, so after fine-tuning (which could make many of them
    # right) those images still get nothing; a floor keeps a path for every image (0: all rungs).
    ladder_min_blocks: int = 0
    stem_grid: int = 4  # stem observation: average-pool the stem's output to this grid (plus channel stds)
    extractor: str = "tiny"  # tiny | resnet: the policy's image network (pixels only)
    extractor_width: int = 16
    obs_size: int | None = None  # pixels: downsample the observed image to this size (cheaper policy)
    exploration_bound: float = 1.0  # BlockDrop's α: keep probabilities stay in [1-α, α] while training (1: off)
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
    # λ rises linearly from 0 to reward.lam over this many timesteps (0: off): the policy first
    # learns which blocks pay at no price, then sheds them as the price rises (linear reward only)
    lam_warmup: int = 0
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
            (self.observation in ("pixels", "stem"), f"policy.observation must be pixels or stem, got {self.observation!r}"),
            (self.action in ("blocks", "ladder"), f"policy.action must be blocks or ladder, got {self.action!r}"),
            (self.ladder_search in ("best", "nested"), f"policy.ladder_search must be best or nested, got {self.ladder_search!r}"),
            (self.ladder_min_blocks >= 0, f"policy.ladder_min_blocks must be >= 0, got {self.ladder_min_blocks}"),
            (self.ladder_min_blocks == 0 or self.action == "ladder", "policy.ladder_min_blocks needs policy.action: ladder"),
            (not (self.action == "ladder" and self.env == "sequential"), "policy.action: ladder is for the oneshot env"),
            (not (self.action == "ladder" and self.curriculum), "policy.curriculum needs policy.action: blocks"),
            (self.stem_grid >= 1, "policy.stem_grid must be >= 1"),
            (self.lam_warmup >= 0, f"policy.lam_warmup must be >= 0, got {self.lam_warmup}"),
            (self.lam_warmup == 0 or self.reward.kind == "linear", "policy.lam_warmup needs the linear reward (its λ)"),
            (0.5 < self.exploration_bound <= 1, "policy.exploration_bound must be in (0.5, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def make_skip_task(cfg: PolicyConfig, backbone, dataset, device: str | torch.device = "cpu",
                   ladder: torch.Tensor | None = None) -> SkipTask:
    """The task of ``cfg``'s env on ``dataset``: its reward, and for the one-shot env its
    observation and action (``ladder``: the candidate masks of ``action: ladder``)."""
    oneshot = cfg.env == "oneshot"
    _check_ladder(cfg, ladder)
    return SkipTask(backbone, dataset, cfg.reward, device=device, obs_size=cfg.obs_size,
                    observation=cfg.observation if oneshot else "pixels", stem_grid=cfg.stem_grid,
                    ladder=ladder if oneshot else None)


def make_dynamic_model(cfg: PolicyConfig, backbone, model: BaseAlgorithm, ladder: torch.Tensor | None = None) -> DynamicModel:
    """``backbone`` routed by ``model``'s policy network as ``cfg`` trained it (env, observation, ladder)."""
    oneshot = cfg.env == "oneshot"
    _check_ladder(cfg, ladder)
    return DynamicModel(backbone, model.policy, cfg.env, cfg.observation if oneshot else "pixels", cfg.obs_size,
                        cfg.stem_grid, ladder if oneshot else None)


def _check_ladder(cfg: PolicyConfig, ladder: torch.Tensor | None) -> None:
    if (cfg.env == "oneshot" and cfg.action == "ladder") != (ladder is not None):
        raise ConfigError("policy.action: ladder needs the ladder of candidate masks (and only it does)")


def make_vec_env(task: SkipTask, cfg: PolicyConfig) -> VecMonitor:
    """The batched env of ``cfg.env`` with ``cfg.num_envs`` images per step, episode stats added."""
    cls = BlockSkipVecEnv if cfg.env == "oneshot" else BlockSkipSeqVecEnv
    return VecMonitor(cls(task, cfg.num_envs))


def build_model(cfg: PolicyConfig, env, seed: int, device: str | torch.device = "auto") -> BaseAlgorithm:
    """A fresh SB3 model for ``env`` with a :class:`~agents.policies.BoundedPolicy`: image
    observations get a 32x32-friendly extractor, stem features a standardiser whose statistics
    come from the env's own images."""
    kwargs = dict(
        learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
        ent_coef=cfg.ent_coef, seed=seed, device=device, verbose=0,
    )
    if cfg.algo == "ppo":
        kwargs.update(batch_size=min(cfg.batch_size, cfg.n_steps * cfg.num_envs), n_epochs=cfg.n_epochs)
    if cfg.env == "oneshot":
        task = env.unwrapped.task
        stats = feature_statistics(task.observation(torch.arange(task.num_images))) if task.observation_kind == "stem" else None
        pkw = policy_kwargs(cfg.extractor, cfg.extractor_width, cfg.hidden, cfg.exploration_bound, stats)
    else:
        task = env.unwrapped.task
        stats = sequential_feature_statistics(task.backbone, task.dataset.images)
        pkw = policy_kwargs(cfg.extractor, cfg.extractor_width, cfg.hidden, cfg.exploration_bound, stats, sequential=True)
    return ALGOS[cfg.algo](BoundedPolicy, env, policy_kwargs=pkw, **kwargs)


def feature_statistics(features: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-feature mean and standard deviation of (N, D) observation vectors, as plain lists."""
    features = features.double()
    return features.mean(0).tolist(), features.std(0, unbiased=False).tolist()


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
    # Without a TensorBoard folder SB3 would make an empty log folder under /tmp on every run.
    model.set_logger(configure(str(tb_dir), ["tensorboard"]) if tb_dir is not None else Logger(None, []))
    extra_flops = policy_flops(model, task, cfg.env)
    if resume and last.exists():  # after policy_flops: nothing may draw from the restored RNGs
        restored = restore_training_state(out_dir, model)
        if restored is not None:
            progress = restored
            print(f"policy: resuming exactly at timestep {model.num_timesteps}")
        else:
            model._last_obs = None  # SB3's learn() then resets the envs
            print(f"policy: resuming at timestep {model.num_timesteps} with fresh episodes (no matching state file)")
    saver = CheckpointEvalCallback(out_dir, eval_task, cfg, progress, extra_flops)
    progress_bar = ProgressBarCallback(cfg.timesteps)
    callbacks = [TaskMetricsCallback(task.num_blocks), saver, progress_bar]
    if cfg.curriculum:
        callbacks.append(CurriculumCallback(task.num_blocks, cfg.curriculum_steps))
    if cfg.lam_warmup:
        callbacks.append(LambdaWarmupCallback(task.reward, cfg.lam_warmup))
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
