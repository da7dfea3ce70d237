"""Stable-Baselines3 VecEnvs that step a whole batch of images with one masked backbone call.

``BlockSkipVecEnv(task, N)`` behaves exactly like ``DummyVecEnv`` over N ``BlockSkipEnv(task=task)``
(same images for the same seed, same rewards and infos for the same actions), but runs the N
images as one batch on the task's device. ``BlockSkipSeqVecEnv`` does the same for the
sequential env: N episodes in lockstep, one batched block per step. Images, activations and
masks stay on the device; only observations, rewards, dones and infos cross to NumPy/Python,
once per step, because SB3 requires them there.

The N sub-environments share one :class:`~envs.block_skip.SkipTask`: ``get_attr``/``set_attr``/
``env_method`` on a task attribute (e.g. ``set_attr("num_decided", k)``) read or change that one
task, for all sub-environments at once, and ``env_method`` calls the method once.
"""

from __future__ import annotations

from typing import Any, Iterable

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from envs.block_skip import SkipTask


class _TaskVecEnv(VecEnv):
    """Seeding, image sampling and attribute forwarding shared by the two batched envs.

    ``task``: the shared SkipTask. ``num_envs``: episodes stepped together (the batch size).
    """

    render_mode = None  # read by VecEnv.__init__ through get_attr

    def __init__(self, task: SkipTask, num_envs: int, observation_space: gym.Space, action_space: gym.Space):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.task = task
        # Sub-env i draws its images from its own generator, made exactly as gymnasium's
        # Env.reset(seed=s) makes np_random, so a DummyVecEnv of single envs sees the same images.
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._index = np.zeros(num_envs, dtype=np.int64)
        self._actions: np.ndarray | None = None
        super().__init__(num_envs, observation_space, action_space)

    def get_state(self) -> dict:
        """Where the episodes stand (image generators, current images, progress), as tensors and
        plain data: with :meth:`set_state` a resumed training run continues exactly."""
        return {"rngs": [rng.bit_generator.state for rng in self._rngs], "index": torch.from_numpy(self._index.copy())}

    def set_state(self, state: dict) -> None:
        for rng, rng_state in zip(self._rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        self._index = state["index"].numpy().copy()

    def _reset_indices(self) -> None:
        """Explicit reset: apply pending seeds/options (once, as DummyVecEnv does), pick images."""
        for i in range(self.num_envs):
            if self._seeds[i] is not None:
                self._rngs[i] = seeding.np_random(self._seeds[i])[0]
            forced = (self._options[i] or {}).get("index")
            if forced is not None and not 0 <= int(forced) < self.task.num_images:
                raise ValueError(f"options['index'] must be in [0, {self.task.num_images}), got {forced}")
            self._index[i] = int(forced) if forced is not None else self._rngs[i].integers(self.task.num_images)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = self.task.reset_infos(self._index)

    def _auto_reset_indices(self) -> None:
        """Auto-reset after a finished episode: every sub-env draws its next image."""
        for i, rng in enumerate(self._rngs):
            self._index[i] = rng.integers(self.task.num_images)
        self.reset_infos = self.task.reset_infos(self._index)

    def _index_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self._index).to(self.task.device)

    def _take_actions(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        actions = np.asarray(self._actions)
        self._actions = None
        if actions.size != int(np.prod(shape)):
            raise ValueError(f"actions must have shape {shape}, got {actions.shape}")
        return torch.as_tensor(actions).reshape(shape)

    # ------------------------------------------------------------------ SB3 VecEnv contract
    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def close(self) -> None:
        """Nothing to release: the task (and its device memory) belongs to the caller."""

    def _target(self, name: str) -> Any:
        return self.task if hasattr(self.task, name) else self

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        envs = list(self._get_indices(indices))
        if attr_name == "np_random":  # the one per-sub-env attribute
            return [self._rngs[i] for i in envs]
        value = getattr(self._target(attr_name), attr_name)
        return [value for _ in envs]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        # The task is shared: setting one sub-env's task attribute sets it for all (as it would
        # in a DummyVecEnv of envs built on one task).
        setattr(self._target(attr_name), attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        result = getattr(self._target(method_name), method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def _get_indices(self, indices: VecEnvIndices) -> Iterable[int]:
        envs = list(super()._get_indices(indices))
        if any(not 0 <= i < self.num_envs for i in envs):
            raise IndexError(f"env indices must be in [0, {self.num_envs}), got {envs}")
        return envs


class BlockSkipVecEnv(_TaskVecEnv):
    """N one-shot episodes (``BlockSkipEnv``) per step, all images in one masked backbone call.

    ``task``: the SkipTask (backbone, images, reward) on its device. ``num_envs``: images per step.
    Every episode lasts one step, so every step returns ``dones`` all True and new images.
    """

    def __init__(self, task: SkipTask, num_envs: int):
        super().__init__(task, num_envs, task.observation_space(), task.action_space())
        self._obs = np.zeros((num_envs,) + task.obs_shape, dtype=self.observation_space.dtype)
        self._started = False

    def _observe(self) -> np.ndarray:
        return self.task.observation(self._index_tensor()).cpu().numpy()

    def get_state(self) -> dict:
        return {**super().get_state(), "obs": torch.from_numpy(self._obs.copy()), "started": self._started}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._obs, self._started = state["obs"].numpy().copy(), state["started"]

    def reset(self) -> VecEnvObs:
        self._reset_indices()
        self._started = True
        self._obs = self._observe()
        return self._obs.copy()  # SB3 callers may modify it; ours backs terminal_observation

    def step_wait(self) -> VecEnvStepReturn:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        shape = (self.num_envs,) if self.task.ladder is not None else (self.num_envs, self.task.num_blocks)
        result = self.task.play(self._index_tensor(), self.task.keep_masks(self._take_actions(shape)))
        rewards = result["reward"].cpu().numpy()
        infos = self.task.infos(result)
        for info, obs in zip(infos, self._obs):
            # self._obs is replaced (not overwritten) every step and never handed out, so these
            # views keep their values.
            info["TimeLimit.truncated"] = False
            info["terminal_observation"] = obs
        self._auto_reset_indices()
        self._obs = self._observe()
        return self._obs.copy(), rewards, np.ones(self.num_envs, dtype=bool), infos


class BlockSkipSeqVecEnv(_TaskVecEnv):
    """N sequential episodes (``BlockSkipSeqEnv``) in lockstep: step i runs block i once, on the
    rows whose action is 1. All episodes last num_blocks steps and end (and restart) together.

    ``task``: the shared SkipTask. ``num_envs``: episodes stepped together.
    """

    def __init__(self, task: SkipTask, num_envs: int):
        super().__init__(task, num_envs, gym.spaces.Box(-np.inf, np.inf, (task.seq_obs_dim,), np.float32),
                         gym.spaces.Discrete(2))
        self._block = 0
        self._h: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._idx: torch.Tensor | None = None

    def get_state(self) -> dict:
        state = {**super().get_state(), "block": self._block}
        if self._h is not None:  # mid-episode: the activations reached so far and the decisions
            state.update(h=self._h.cpu(), mask=self._mask.cpu(), idx=self._idx.cpu())
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._block = state["block"]
        if "h" in state:
            device = self.task.device
            self._h, self._mask, self._idx = (state[k].to(device) for k in ("h", "mask", "idx"))

    def _start(self) -> np.ndarray:
        """Begin the episodes of the images in ``self._index``; returns their first observation."""
        self._idx = self._index_tensor()
        self._block = 0
        self._h = self.task.seq_start(self._idx)
        self._mask = torch.zeros(self.num_envs, self.task.num_blocks, dtype=torch.bool, device=self.task.device)
        return self.task.seq_observation(self._h, 0, self._mask.sum(1)).cpu().numpy()

    def reset(self) -> VecEnvObs:
        self._reset_indices()
        return self._start()

    def step_wait(self) -> VecEnvStepReturn:
        if self._h is None:
            raise RuntimeError("call reset() before step()")
        task, i = self.task, self._block
        run = task.seq_effective_run(self._take_actions((self.num_envs,)), i)
        self._h = task.seq_block(self._h, i, run)
        self._mask[:, i] = run
        self._block = i = i + 1
        rewards, used = task.seq_step_reward(run), self._mask.sum(1)
        if i < task.num_blocks:
            obs = task.seq_observation(self._h, i, used).cpu().numpy()
            infos = [{"index": int(k), "TimeLimit.truncated": False} for k in self._index]
            return obs, rewards.cpu().numpy(), np.zeros(self.num_envs, dtype=bool), infos
        result = task.seq_finish(self._h, self._idx, used, self._mask)
        terminal = task.seq_observation(self._h, i, used).cpu().numpy()
        rewards = (rewards + result["final_reward"]).cpu().numpy()
        infos = task.infos(result)
        for info, obs in zip(infos, terminal):
            info["TimeLimit.truncated"] = False
            info["terminal_observation"] = obs
        self._auto_reset_indices()
        return self._start(), rewards, np.ones(self.num_envs, dtype=bool), infos
