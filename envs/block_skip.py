"""Gymnasium environments in which a policy chooses which residual blocks run on an image.

:class:`SkipTask` holds the backbone, the images (on the device) and the episode semantics:
which blocks a keep mask really runs (the curriculum), the masked forward pass, the reward and
the info dicts. Two views of one episode share it:

- :class:`BlockSkipEnv` (BlockDrop-style, one step): observation = the image or the backbone's
  stem features (``envs.observations``), action = a ``MultiBinary(num_blocks)`` keep mask, or
  with a ``ladder`` of candidate masks (``backbone.baselines.subset_ladder``: the best fixed
  subset of each size) a ``Discrete(K)`` choice among them, reward =
  :func:`envs.rewards.episode_reward`.
- :class:`BlockSkipSeqEnv` (SkipNet-style, one step per block): observation = pooled features
  of the current activation + which block is next + the fraction of blocks used so far, action
  = run block i (1) or take its shortcut (0). Its return equals the one-shot reward.

The batched VecEnvs of ``envs.vec`` call the same SkipTask methods, so all four agree.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from backbone.models.cost import measure_backbone_cost
from backbone.data.datasets import DataConfig, ImageDataset, load_splits
from backbone.errors import ConfigError
from backbone.models.masked import run_block_masked
from backbone.models.resnet import SkippableResNet
from backbone.models.weights import load_model
from envs.observations import (
    OBSERVATIONS,
    downsample_images,
    sequential_obs_dim,
    sequential_observation,
    stem_features,
)
from envs.rewards import RewardConfig, block_cost, episode_reward, reward_score

SPLITS = ("train", "val", "test")


class SkipTask:
    """The one place the episode semantics live; the single envs and the VecEnvs all call it.

    ``backbone``: a SkippableResNet or the path of a dyndepth checkpoint; it is put in eval mode on
    ``device`` (its mode is not touched afterwards, so joint fine-tuning may change it).
    ``dataset``: the images episodes are drawn from; copied to ``device`` once.
    ``reward``: how episodes are scored. ``observation``: what the one-shot policy sees,
    ``"pixels"`` (the image, area-downsampled to ``obs_size`` if given) or ``"stem"`` (the
    backbone's stem features pooled to a ``stem_grid`` grid, see ``envs.observations``). The
    backbone always sees the full image. Stem features and the full backbone's per-image scores
    (reward baseline) are computed once here: the backbone must stay fixed while the task is used.
    ``ladder``: (K, L) bool candidate masks; the one-shot action is then an index into them.
    """

    def __init__(self, backbone: SkippableResNet | str | os.PathLike, dataset: ImageDataset,
                 reward: RewardConfig | dict | None = None, device: str | torch.device = "cpu",
                 obs_size: int | None = None, observation: str = "pixels", stem_grid: int = 4,
                 ladder: torch.Tensor | None = None):
        if isinstance(backbone, (str, os.PathLike)):
            backbone = load_model(backbone)
        if not isinstance(backbone, SkippableResNet):
            raise TypeError(f"backbone must be a SkippableResNet or a checkpoint path, got {type(backbone).__name__}")
        if len(dataset) == 0:
            raise ConfigError("the environment needs at least one image, got an empty dataset")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.reward = RewardConfig.from_any(reward)
        if int(dataset.labels.max()) >= backbone.num_classes:
            raise ConfigError(f"dataset has labels up to {int(dataset.labels.max())} but the backbone "
                              f"predicts {backbone.num_classes} classes")
        difficulty = None if dataset.difficulty is None else dataset.difficulty.to(self.device)
        self.dataset = ImageDataset(dataset.images.to(self.device), dataset.labels.to(self.device),
                                    list(dataset.classes), difficulty, dataset.name)
        self.num_blocks = backbone.num_blocks
        self.num_images = len(dataset)
        height = dataset.images.shape[2]
        self.cost = measure_backbone_cost(self.backbone, image_size=height)
        # Per-image FLOPs as base + mask @ delta, so they are computed where the mask lives.
        self._flops_base = float(self.cost.min_flops)
        self._flops_delta = torch.tensor([k - s for k, s in zip(self.cost.block_flops, self.cost.skip_flops)],
                                         dtype=torch.float64, device=self.device)
        self._labels_host = dataset.labels.cpu().numpy()  # for reset infos without a device sync
        if observation not in OBSERVATIONS:
            raise ConfigError(f"policy.observation must be one of {', '.join(OBSERVATIONS)}, got {observation!r}")
        self.observation_kind, self.stem_grid = observation, int(stem_grid)
        if observation == "stem":
            if self.stem_grid < 1:
                raise ConfigError(f"policy.stem_grid must be >= 1, got {stem_grid}")
            self._obs = stem_features(self.backbone, self.dataset.images, self.stem_grid)
        else:
            size = height if obs_size is None else int(obs_size)
            if size < 1:
                raise ConfigError(f"obs_size must be >= 1, got {obs_size}")
            self._obs = self.dataset.images if size == height else downsample_images(self.dataset.images, size)
        self.obs_shape = tuple(self._obs.shape[1:])
        # The full backbone's score per image, subtracted from every episode's score (baseline "full").
        self._baseline = self._full_scores() if self.reward.baseline == "full" else None
        self._num_decided = self.num_blocks
        if ladder is not None and (ladder.dim() != 2 or ladder.shape[1] != self.num_blocks):
            raise ConfigError(f"the ladder must be (K, {self.num_blocks}) keep masks, got {tuple(ladder.shape)}")
        self.ladder = None if ladder is None else ladder.bool().to(self.device)

    def action_space(self) -> gym.Space:
        """The one-shot action: keep bits, or an index into the ladder of candidate masks."""
        if self.ladder is not None:
            return gym.spaces.Discrete(len(self.ladder))
        return gym.spaces.MultiBinary(self.num_blocks)

    def keep_masks(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, L) keep masks of one-shot actions: the bits themselves, or the chosen ladder rows."""
        actions = actions.to(self.device)
        if self.ladder is not None:
            return self.ladder[actions.reshape(-1).long()]
        return actions.reshape(-1, self.num_blocks)

    def observation_space(self) -> gym.spaces.Box:
        """uint8 images in [0, 255], or unbounded float32 feature vectors."""
        if self.observation_kind == "stem":
            return gym.spaces.Box(-np.inf, np.inf, self.obs_shape, np.float32)
        return gym.spaces.Box(0, 255, self.obs_shape, np.uint8)

    @torch.no_grad()
    def _full_scores(self, chunk: int = 1024) -> torch.Tensor:
        images, labels = self.dataset.images, self.dataset.labels
        return torch.cat([reward_score(self.reward, self.backbone(images[s:s + chunk]), labels[s:s + chunk])
                          for s in range(0, len(images), chunk)])

    # ------------------------------------------------------------------ one-shot episodes
    @property
    def num_decided(self) -> int:
        """Curriculum (BlockDrop): only the last ``num_decided`` blocks follow the action; the
        earlier ones always run."""
        return self._num_decided

    @num_decided.setter
    def num_decided(self, value: int) -> None:
        if isinstance(value, bool) or int(value) != value or not 0 <= value <= self.num_blocks:
            raise ValueError(f"num_decided must be an integer in [0, {self.num_blocks}], got {value!r}")
        self._num_decided = int(value)

    def observation(self, idx: torch.Tensor) -> torch.Tensor:
        """The observations of images ``idx`` on the device: uint8 (B, 3, s, s) or float32 (B, D)."""
        return self._obs[idx.to(self.device)]

    def effective_mask(self, keep_mask: torch.Tensor) -> torch.Tensor:
        """``keep_mask`` (B, L), 0/1 or bool, as the bool mask that really runs (curriculum applied)."""
        mask = keep_mask.to(self.device)
        mask = mask if mask.dtype == torch.bool else mask != 0
        forced = self.num_blocks - self._num_decided
        if forced > 0:
            mask = mask.clone()
            mask[:, :forced] = True
        return mask

    def play(self, idx: torch.Tensor, keep_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run images ``idx`` with ``keep_mask`` (B, L) in ONE masked backbone call, and score them."""
        idx = idx.to(self.device)
        mask = self.effective_mask(keep_mask)
        with torch.no_grad():
            logits = self.backbone(self.dataset.images[idx], mask)
        return self._result(logits, idx, mask.sum(1), mask)

    def _result(self, logits: torch.Tensor, idx: torch.Tensor, blocks_used: torch.Tensor,
                mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        label = self.dataset.labels[idx]
        prediction = logits.argmax(1)
        correct = prediction == label
        blocks_used = blocks_used.to(torch.int64)
        score = None
        if self.reward.kind == "linear" and (self.reward.signal, self.reward.baseline) != ("correct", "none"):
            score = reward_score(self.reward, logits, label)
            if self._baseline is not None:
                score = score - self._baseline[idx]
        result = {"prediction": prediction, "label": label, "correct": correct, "blocks_used": blocks_used,
                  "reward": episode_reward(self.reward, correct, blocks_used, self.num_blocks, score), "index": idx}
        if score is not None:
            result["score"] = score
        if mask is not None:
            result["keep_mask"] = mask
            result["flops"] = self._flops_base + mask.to(torch.float64) @ self._flops_delta
        if self.dataset.difficulty is not None:
            result["difficulty"] = self.dataset.difficulty[idx]
        return result

    def infos(self, result: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One info dict per image of a ``play``/``seq_finish`` result (one host copy per key)."""
        host = {k: v.cpu() for k, v in result.items()}
        columns = {k: host[k].tolist() for k in ("correct", "blocks_used", "label", "prediction", "index",
                                                 "flops", "difficulty") if k in host}
        masks = host["keep_mask"].numpy() if "keep_mask" in host else None
        full = float(self.cost.full_flops)
        infos = []
        for r in range(len(columns["index"])):
            info = {k: v[r] for k, v in columns.items()}
            if "flops" in info:
                info["flops_ratio"] = info["flops"] / full
            if masks is not None:
                info["keep_mask"] = masks[r]
            infos.append(info)
        return infos

    def reset_infos(self, indices: np.ndarray) -> list[dict[str, int]]:
        """The info dicts of episodes starting on images ``indices``: {"index", "label"}."""
        return [{"index": int(i), "label": int(self._labels_host[i])} for i in indices]

    # ------------------------------------------------------------------ sequential episodes
    @property
    def seq_obs_dim(self) -> int:
        """D = 2·F (channel means and stds of the activation, F = the widest stage) + num_blocks
        (one-hot block index) + 1 (fraction used); see ``envs.observations.sequential_observation``."""
        return sequential_obs_dim(self.backbone.feature_dim, self.num_blocks)

    def seq_start(self, idx: torch.Tensor) -> torch.Tensor:
        """The activation after the stem for images ``idx``."""
        with torch.no_grad():
            return self.backbone.stem(self.dataset.images[idx.to(self.device)])

    def seq_effective_run(self, run: torch.Tensor, i: int) -> torch.Tensor:
        """Which rows really run block ``i`` when ``run`` (B,) asks: forced on by the curriculum."""
        run = run.to(self.device)
        run = run if run.dtype == torch.bool else run != 0
        return run | (i < self.num_blocks - self._num_decided)

    def seq_block(self, h: torch.Tensor, i: int, run: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on the rows of ``h`` where ``run`` (B,) is set; the others take its shortcut."""
        keep_rows = run.nonzero().squeeze(1)
        skip_rows = (~run).nonzero().squeeze(1)
        with torch.no_grad():
            return run_block_masked(self.backbone.blocks[i], h, keep_rows, skip_rows)

    def seq_step_reward(self, run: torch.Tensor) -> torch.Tensor:
        """Dense part of the reward, float32 (B,): −block cost per executed block (linear), else 0."""
        cost = block_cost(self.reward, self.num_blocks)
        return -(cost or 0.0) * run.to(torch.float32)

    def seq_finish(self, h: torch.Tensor, idx: torch.Tensor, blocks_used: torch.Tensor,
                   keep_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Classify the final activation ``h``; like ``play`` plus "final_reward", the reward of the
        last step on top of its ``seq_step_reward`` (1[correct] for linear, the episode reward for
        blockdrop). ``keep_mask``: the executed blocks (B, L), needed for "keep_mask" and "flops"."""
        with torch.no_grad():
            logits = self.backbone.classify(h, keep_mask)
        result = self._result(logits, idx.to(self.device), blocks_used, keep_mask)
        dense = block_cost(self.reward, self.num_blocks) is not None
        final = result["score"] if "score" in result else result["correct"].to(torch.float32)
        result["final_reward"] = final if dense else result["reward"]
        return result

    def seq_observation(self, h: torch.Tensor, i: int, blocks_used: torch.Tensor) -> torch.Tensor:
        """float32 (B, D) before block ``i`` (``envs.observations.sequential_observation``)."""
        return sequential_observation(h, i, blocks_used, self.num_blocks, self.backbone.feature_dim)


def make_task(backbone: SkippableResNet | str | os.PathLike | None = None, dataset: ImageDataset | None = None,
              reward: RewardConfig | dict | None = None, device: str | torch.device = "cpu",
              obs_size: int | None = None, data: DataConfig | dict | None = None, split: str = "val",
              task: SkipTask | None = None, observation: str = "pixels") -> SkipTask:
    """A SkipTask from the environment constructor's arguments (see :class:`BlockSkipEnv`)."""
    if task is not None:
        if any(arg is not None for arg in (backbone, dataset, data, reward, obs_size)) or observation != "pixels":
            raise ValueError("pass either task or backbone, dataset/data, reward, obs_size, observation (the task has them)")
        return task
    if backbone is None:
        raise ConfigError("the environment needs a backbone (a SkippableResNet or a checkpoint path) or a task")
    if dataset is None:
        if data is None:
            raise ConfigError("the environment needs a dataset or a data config (data=..., split=...)")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(data, dict):
            try:
                data = DataConfig(**data)
            except TypeError as err:  # unknown field
                raise ConfigError(f"bad data config: {err}") from err
        dataset = getattr(load_splits(data), split)
    return SkipTask(backbone, dataset, reward, device, obs_size, observation)


class _SkipEnv(gym.Env):
    """Shared constructor and image sampling of the two single-image environments."""

    metadata = {"render_modes": []}

    def __init__(self, backbone: SkippableResNet | str | os.PathLike | None = None, dataset: ImageDataset | None = None,
                 reward: RewardConfig | dict | None = None, device: str | torch.device = "cpu",
                 obs_size: int | None = None, data: DataConfig | dict | None = None, split: str = "val",
                 task: SkipTask | None = None, observation: str = "pixels"):
        self.task = make_task(backbone, dataset, reward, device, obs_size, data, split, task, observation)
        self.index: int | None = None  # the current episode's image; None when there is none
        self.observation_space, self.action_space = self._spaces()

    def _spaces(self) -> tuple[gym.Space, gym.Space]:
        raise NotImplementedError

    @property
    def num_decided(self) -> int:
        return self.task.num_decided

    @num_decided.setter
    def num_decided(self, value: int) -> None:
        self.task.num_decided = value

    def _start(self, seed: int | None, options: dict | None) -> dict[str, int]:
        """Seed like gym.Env.reset, pick the image (``options={"index": i}`` forces one)."""
        super().reset(seed=seed)
        forced = (options or {}).get("index")
        if forced is not None:
            if not 0 <= int(forced) < self.task.num_images:
                raise ValueError(f"options['index'] must be in [0, {self.task.num_images}), got {forced}")
            self.index = int(forced)
        else:
            self.index = int(self.np_random.integers(self.task.num_images))
        return self.task.reset_infos(np.array([self.index]))[0]

    def _index_tensor(self) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        return torch.tensor([self.index], device=self.task.device)


class BlockSkipEnv(_SkipEnv):
    """One image per episode, one MultiBinary keep mask (or ladder choice) per image (BlockDrop-style).

    ``backbone``: a SkippableResNet or a checkpoint path. Images: ``dataset``, or ``data`` (a
    DataConfig or dict of its fields) with ``split`` in train/val/test. ``reward``: RewardConfig
    or dict. ``device``: where backbone and images live. ``obs_size``: observation side.
    ``observation``: "pixels" or "stem" (see :class:`SkipTask`).
    ``task``: an existing SkipTask instead of all of these (many envs, one backbone).
    """

    _obs: np.ndarray | None = None  # the current image observation

    def _spaces(self) -> tuple[gym.Space, gym.Space]:
        return self.task.observation_space(), self.task.action_space()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        info = self._start(seed, options)
        self._obs = self.task.observation(self._index_tensor())[0].cpu().numpy()
        return self._obs.copy(), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        idx = self._index_tensor()
        action = np.asarray(action)
        expected = 1 if self.task.ladder is not None else self.task.num_blocks
        if action.size != expected:
            raise ValueError(f"action must hold {expected} value(s), got shape {action.shape}")
        result = self.task.play(idx, self.task.keep_masks(torch.as_tensor(action)))
        self.index = None
        # The observation of a finished episode is its image (SB3 keeps it as terminal_observation);
        # a copy, since callers may keep and modify what they get.
        return self._obs.copy(), float(result["reward"][0]), True, False, self.task.infos(result)[0]


class BlockSkipSeqEnv(_SkipEnv):
    """One image per episode, one Discrete(2) decision per block (SkipNet-style); same arguments
    as :class:`BlockSkipEnv`. Blocks forced on by the curriculum run whatever the action."""

    def _spaces(self) -> tuple[gym.Space, gym.Space]:
        return gym.spaces.Box(-np.inf, np.inf, (self.task.seq_obs_dim,), np.float32), gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        info = self._start(seed, options)
        task = self.task
        self._block = 0
        self._h = task.seq_start(self._index_tensor())
        self._mask = torch.zeros(1, task.num_blocks, dtype=torch.bool, device=task.device)
        return task.seq_observation(self._h, 0, self._mask.sum(1))[0].cpu().numpy(), info

    def step(self, action: int | np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        task, idx, i = self.task, self._index_tensor(), self._block
        run = task.seq_effective_run(torch.as_tensor(np.asarray(action)).reshape(1), i)
        self._h = task.seq_block(self._h, i, run)
        self._mask[:, i] = run
        self._block = i = i + 1
        reward, used = task.seq_step_reward(run), self._mask.sum(1)
        obs = task.seq_observation(self._h, i, used)[0].cpu().numpy()
        if i < task.num_blocks:
            return obs, float(reward[0]), False, False, {"index": self.index}
        result = task.seq_finish(self._h, idx, used, self._mask)
        self.index = None
        return obs, float((reward + result["final_reward"])[0]), True, False, task.infos(result)[0]
