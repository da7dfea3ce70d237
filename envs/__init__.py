"""The Gymnasium side: environments in which a policy picks the residual blocks to run.

``gymnasium.make("dyndepth/BlockSkip-v0", backbone=..., data={...}, split="val")`` builds the
one-shot env, ``"dyndepth/BlockSkipSeq-v0"`` the sequential one (arguments: ``BlockSkipEnv``).
"""

import gymnasium

from envs.block_skip import BlockSkipEnv, BlockSkipSeqEnv, SkipTask, make_task
from envs.rewards import RewardConfig, block_cost, episode_reward
from envs.vec import BlockSkipSeqVecEnv, BlockSkipVecEnv

ENV_IDS = {
    "dyndepth/BlockSkip-v0": "envs.block_skip:BlockSkipEnv",
    "dyndepth/BlockSkipSeq-v0": "envs.block_skip:BlockSkipSeqEnv",
}
for _env_id, _entry_point in ENV_IDS.items():
    if _env_id not in gymnasium.registry:  # re-import (e.g. importlib.reload) must not re-register
        gymnasium.register(_env_id, entry_point=_entry_point)

__all__ = [
    "BlockSkipEnv",
    "BlockSkipSeqEnv",
    "BlockSkipSeqVecEnv",
    "BlockSkipVecEnv",
    "ENV_IDS",
    "RewardConfig",
    "SkipTask",
    "block_cost",
    "episode_reward",
    "make_task",
]
