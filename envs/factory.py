"""Batched environments behind one small numpy interface: :func:`make_env` -> :class:`BatchedEnv`.

Backends:

- **envpool** for the ``atari``, ``mujoco`` and ``classic`` families (C++ thread pool, optional
  asynchronous ``send``/``recv``; :mod:`pbt_rl.envs.envpool_envs`, which also documents the
  Atari defaults);
- **Gymnasium** ``SyncVectorEnv`` for every other Gymnasium id (family ``gymnasium``), with the
  asynchronous interface emulated by stepping groups of ``batch_size`` envs in turn
  (:mod:`pbt_rl.envs.gymnasium_envs`).

Both backends use *next-step* auto-reset: the step that reports ``terminated``/``truncated``
returns the episode's real last observation, and the next step of that env ignores its action
and returns the first observation of a new episode with reward 0. :class:`BatchedEnv`
(:mod:`pbt_rl.envs.batched`) flags such steps with ``StepBatch.is_first`` by remembering, per env
id, whether that env's previous step ended a (learning) episode.
"""

from __future__ import annotations

from pbt_rl.config import ConfigError, EnvConfig
from pbt_rl.envs.batched import BackendBatch, BatchedEnv, StepBatch, per_env_seeds
from pbt_rl.envs.envpool_envs import (
    ATARI_TRUNCATION_FRAMES,
    EnvpoolBatchedEnv,
    EnvpoolGroupedEnv,
    EnvpoolPool,
    atari_max_episode_steps,
    envpool_episode_signals,
    envpool_options,
)
from pbt_rl.envs.gymnasium_envs import GymnasiumBatchedEnv
from pbt_rl.envs.registry import GYMNASIUM, env_family


def make_env(env_cfg: EnvConfig, num_envs: int, seed: int, num_threads: int = 0,
             fixed_groups: bool = False) -> BatchedEnv:
    """Build ``num_envs`` copies of ``env_cfg.id``.

    Args:
        env_cfg: the env section of the experiment (id, Atari options, ``async_batch_size``, ...).
            ``env_cfg.num_envs`` and ``env_cfg.num_threads`` are not read: the caller passes the
            values it decided (e.g. after sharing cores among members).
        num_envs: envs stepped together.
        seed: the member's env seed (>= 0); each env gets an independent seed derived from it,
            so the same seed and the same actions give the same observations.
        num_threads: envpool worker threads; 0 lets envpool choose. Ignored by Gymnasium envs.
            With ``fixed_groups`` every group's pool gets this many (at most its group size).
        fixed_groups: asynchronous envs return whole fixed groups of ``async_batch_size`` envs in
            the order they were sent (:class:`EnvpoolGroupedEnv`), instead of whichever envs are
            ready first. Gymnasium envs always behave this way.

    Returns:
        A :class:`BatchedEnv`; asynchronous when ``env_cfg.async_batch_size`` > 0.

    Raises:
        UnknownEnvError: the id is neither an envpool nor a Gymnasium id (with suggestions).
        ConfigError: an unsupported env family or observation space.

    ``env_cfg.async_batch_size`` must divide ``num_envs`` (with ``num_envs = env.num_envs`` the
    config's validation, :func:`pbt_rl.config.validate`, checks that rule; it is not checked again here).
    """
    family = env_family(env_cfg.id)
    if num_envs < 1:
        raise ConfigError(f"env.num_envs: {num_envs} must be >= 1")
    is_async = env_cfg.async_batch_size > 0
    batch_size = env_cfg.async_batch_size if is_async else num_envs
    if family == GYMNASIUM:
        return GymnasiumBatchedEnv(env_cfg, num_envs, batch_size, is_async, seed)
    if is_async and fixed_groups:
        return EnvpoolGroupedEnv(env_cfg, family, num_envs, batch_size, seed, num_threads)
    return EnvpoolBatchedEnv(env_cfg, family, num_envs, batch_size, is_async, seed, num_threads)


__all__ = [
    "ATARI_TRUNCATION_FRAMES",
    "BackendBatch",
    "BatchedEnv",
    "EnvpoolBatchedEnv",
    "EnvpoolGroupedEnv",
    "EnvpoolPool",
    "GymnasiumBatchedEnv",
    "StepBatch",
    "atari_max_episode_steps",
    "envpool_episode_signals",
    "envpool_options",
    "make_env",
    "per_env_seeds",
]
