"""Env factory (envpool / Gymnasium) and episode statistics; see docs/design.md "Env contract".

Typical synchronous use::

    env = make_env(EnvConfig(id="CartPole-v1"), num_envs=4, seed=0)
    batch = env.reset()               # StepBatch; every row is_first
    batch = env.step(actions)         # actions [4]; batch.episode_returns: games that just ended
"""

from pbt_rl.envs.episode_stats import EpisodeStats
from pbt_rl.envs.factory import (
    ATARI_TRUNCATION_FRAMES,
    BatchedEnv,
    StepBatch,
    atari_max_episode_steps,
    envpool_episode_signals,
    envpool_options,
    make_env,
    per_env_seeds,
)
from pbt_rl.envs.registry import (
    FAMILIES,
    GYMNASIUM_FALLBACK_NOTE,
    UnknownEnvError,
    check_env_id,
    env_family,
    supported_envs,
)

__all__ = [
    "ATARI_TRUNCATION_FRAMES",
    "BatchedEnv",
    "EpisodeStats",
    "FAMILIES",
    "GYMNASIUM_FALLBACK_NOTE",
    "StepBatch",
    "UnknownEnvError",
    "atari_max_episode_steps",
    "check_env_id",
    "env_family",
    "envpool_episode_signals",
    "envpool_options",
    "make_env",
    "per_env_seeds",
    "supported_envs",
]
