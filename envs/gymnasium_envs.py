"""Gymnasium backend (family ``gymnasium``): every Gymnasium id that envpool does not have, as
``SyncVectorEnv`` groups with next-step auto-reset and an emulated asynchronous interface."""

from __future__ import annotations

import collections
from typing import Any

import gymnasium
import numpy as np

from pbt_rl.config import ConfigError, EnvConfig
from pbt_rl.envs.batched import BackendBatch, BatchedEnv, per_env_seeds
from pbt_rl.envs.registry import GYMNASIUM


class GymnasiumBatchedEnv(BatchedEnv):
    """Gymnasium backend (family ``gymnasium``): ``SyncVectorEnv`` groups with next-step auto-reset.

    Asynchronous mode is emulated: the envs form ``num_envs / batch_size`` groups of consecutive
    ids; ``send`` steps the group whose ids it names, and ``recv`` returns the groups in the order
    they were sent. This keeps the same interface (and an actor loop written for envpool works
    unchanged), without envpool's overlap of stepping and inference.

    Observations: Box spaces are delivered as float32 (uint8 images stay uint8); Discrete(n)
    observations are one-hot encoded into float32 ``[B, n]``. ``reward_clip`` and the other Atari
    options do not apply here; ``max_episode_steps`` > 0 replaces the registered time limit.
    """

    def __init__(self, env_cfg: EnvConfig, num_envs: int, batch_size: int, is_async: bool, seed: int) -> None:
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        make_kwargs: dict[str, Any] = {}
        if env_cfg.max_episode_steps > 0:
            make_kwargs["max_episode_steps"] = env_cfg.max_episode_steps
        env_id = env_cfg.id

        def make_one() -> gymnasium.Env:
            return gymnasium.make(env_id, **make_kwargs)

        num_groups = num_envs // batch_size
        try:
            self._groups = [
                SyncVectorEnv([make_one] * batch_size, autoreset_mode=AutoresetMode.NEXT_STEP)
                for _ in range(num_groups)
            ]
        except gymnasium.error.Error as exc:  # e.g. DependencyNotInstalled for Box2D or MuJoCo ids
            raise ConfigError(f"env.id: Gymnasium cannot build {env_id!r}: {exc}") from None
        self._seeds = per_env_seeds(seed, num_envs)
        self._ready: collections.deque[BackendBatch] = collections.deque()
        self._in_flight = np.zeros(num_groups, dtype=bool)

        single_obs_space = self._groups[0].single_observation_space
        if isinstance(single_obs_space, gymnasium.spaces.Discrete):
            self._one_hot_start = int(single_obs_space.start)
            observation_space: gymnasium.Space = gymnasium.spaces.Box(0.0, 1.0, (int(single_obs_space.n),), np.float32)
        elif isinstance(single_obs_space, gymnasium.spaces.Box):
            self._one_hot_start = None
            dtype = np.uint8 if single_obs_space.dtype == np.uint8 else np.float32
            observation_space = gymnasium.spaces.Box(
                single_obs_space.low.astype(dtype), single_obs_space.high.astype(dtype), dtype=dtype
            )
        else:
            self._close_groups()
            raise ConfigError(
                f"env.id: {env_id!r} has a {type(single_obs_space).__name__} observation space; "
                f"pbt-rl supports Box and Discrete observations"
            )
        super().__init__(env_id, GYMNASIUM, "gymnasium", num_envs, batch_size, is_async,
                         observation_space, self._groups[0].single_action_space)

    def _convert_obs(self, obs: np.ndarray) -> np.ndarray:
        if self._one_hot_start is not None:
            index = np.asarray(obs, dtype=np.int64) - self._one_hot_start
            one_hot = np.zeros((index.shape[0], self.observation_space.shape[0]), dtype=np.float32)
            one_hot[np.arange(index.shape[0]), index] = 1.0
            return one_hot
        return np.asarray(obs, dtype=self.observation_space.dtype)

    def _step_group(self, group: int, actions: np.ndarray) -> BackendBatch:
        obs, reward, terminated, truncated, _info = self._groups[group].step(actions)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        return BackendBatch(
            obs=self._convert_obs(obs),
            reward=np.asarray(reward, dtype=np.float32),
            raw_reward=np.asarray(reward, dtype=np.float64),
            terminated=terminated,
            truncated=truncated,
            episode_over=terminated | truncated,
            env_ids=self.group_env_ids(group),
        )

    def _backend_reset(self) -> BackendBatch:
        self._ready.clear()
        for group, vector_env in enumerate(self._groups):
            ids = self.group_env_ids(group)
            obs, _info = vector_env.reset(seed=self._seeds[ids].tolist())
            zeros = np.zeros(ids.shape[0], dtype=np.float32)
            falses = np.zeros(ids.shape[0], dtype=bool)
            self._ready.append(BackendBatch(self._convert_obs(obs), zeros, zeros.copy(), falses,
                                             falses.copy(), falses.copy(), ids))
        self._in_flight[:] = True  # every group has a batch waiting to be received
        return self._backend_recv()

    def _backend_step(self, actions: np.ndarray) -> BackendBatch:
        return self._step_group(0, actions)

    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        group = self._whole_group(env_ids, lambda g: bool(self._in_flight[g]))
        self._in_flight[group] = True
        self._ready.append(self._step_group(group, actions))

    def _backend_recv(self) -> BackendBatch:
        if not self._ready:
            raise RuntimeError("recv() with no envs in flight: send() actions for a received batch first")
        batch = self._ready.popleft()
        self._in_flight[int(batch.env_ids[0]) // self.batch_size] = False
        return batch

    def _close_groups(self) -> None:
        for vector_env in self._groups:
            vector_env.close()

    def _backend_close(self) -> None:
        self._close_groups()
