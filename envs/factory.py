"""Batched environments behind one small numpy interface: :func:`make_env` -> :class:`BatchedEnv`.

Backends:

- **envpool** for the ``atari``, ``mujoco`` and ``classic`` families (C++ thread pool, optional
  asynchronous ``send``/``recv``);
- **Gymnasium** ``SyncVectorEnv`` for every other Gymnasium id (family ``gymnasium``), with the
  asynchronous interface emulated by stepping groups of ``batch_size`` envs in turn.

Both backends use *next-step* auto-reset: the step that reports ``terminated``/``truncated``
returns the episode's real last observation, and the next step of that env ignores its action
and returns the first observation of a new episode with reward 0. :class:`BatchedEnv` flags such
steps with ``StepBatch.is_first`` by remembering, per env id, whether that env's previous step
ended a (learning) episode.

Atari defaults (the Machado et al. 2018 evaluation protocol; see docs/envs.md):

- sticky actions with probability 0.25 (``env.repeat_action_probability``), full game episodes
  (``env.episodic_life: false``), no no-op starts (``env.noop_max: 1``: envpool always plays one
  no-op frame at reset, so the start state is fixed up to stickiness), no FIRE-on-reset (a game
  specific trick the protocol excludes), minimal action set (``env.full_action_space: false``);
- truncation after 108,000 emulator frames = ``108000 // frame_skip`` env steps (27,000 with the
  default frame skip 4), unless ``env.max_episode_steps`` sets another limit in env steps;
- observations: ``frame_stack`` grayscale ``image_size`` x ``image_size`` frames, each the
  max over the last two emulator frames of a ``frame_skip``-frame action repeat; uint8
  ``[B, frame_stack, image_size, image_size]``;
- rewards to learn from are clipped to their sign (``env.reward_clip: true``); episode returns in
  ``StepBatch`` are always the raw game score over all lives.

With ``episodic_life: true`` a life loss sets ``terminated`` (a learning boundary). envpool then
treats the next step as a reset, but it does not restart the game: it plays the reset no-op
frame(s), ignores the action and reports reward 0 (any points scored during that one no-op frame
are dropped by envpool). That step is therefore flagged ``is_first`` even though the game goes
on; the recorded episode (for statistics) still ends only at game over or truncation.
"""

from __future__ import annotations

import abc
import collections
import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from pbt_rl.config import ConfigError, EnvConfig
from pbt_rl.envs.episode_stats import EpisodeStats
from pbt_rl.envs.registry import ATARI, GYMNASIUM, env_family

ATARI_TRUNCATION_FRAMES = 108_000
"""Machado et al. 2018: an Atari episode is cut after 108k emulator frames (30 minutes of play)."""

_MAX_ENV_SEED = 2**31  # envpool takes int32 seeds.


@dataclass(eq=False)
class StepBatch:
    """One batch of env steps; the leading dimension ``B`` is the batch (num_envs when synchronous).

    Attributes:
        obs: uint8 ``[B, frame_stack, H, W]`` (Atari) or float32 ``[B, obs_dim]``.
        reward: float32 ``[B]`` reward to learn from (Atari: clipped to its sign if ``reward_clip``).
        terminated: bool ``[B]`` the learning episode ended (a life loss counts when ``episodic_life``).
        truncated: bool ``[B]`` the time limit cut the episode.
        is_first: bool ``[B]`` auto-reset step: the action sent for it was ignored, ``obs`` is the
            first observation of a new (learning) episode and ``reward`` is 0. Learners exclude it.
        env_ids: int32 ``[B]`` which env each row is.
        episode_returns: float64 ``[k]`` raw, unclipped returns of the k episodes (games, across all
            lives; truncated ones included) that ended at this step.
        episode_lengths: int64 ``[k]`` their lengths in env steps (reset steps not counted).
    """

    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    is_first: np.ndarray
    env_ids: np.ndarray
    episode_returns: np.ndarray
    episode_lengths: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.env_ids.shape[0])


@dataclass(eq=False)
class _BackendBatch:
    """What a backend returns for one batch, before the reset/statistics bookkeeping."""

    obs: np.ndarray  # already converted to the StepBatch dtype
    reward: np.ndarray  # float32 [B] learning reward
    raw_reward: np.ndarray  # float [B] unclipped reward, for statistics
    terminated: np.ndarray  # bool [B] learning-episode end
    truncated: np.ndarray  # bool [B]
    episode_over: np.ndarray  # bool [B] the game (statistics episode) ended
    env_ids: np.ndarray  # int32 [B]


def per_env_seeds(seed: int, num_envs: int) -> np.ndarray:
    """Independent int32-range seeds ``[num_envs]`` for the envs of one member.

    Derived with ``numpy.random.SeedSequence`` rather than ``seed + i`` so that two members with
    neighbouring seeds do not share envs (with ``seed + i``, member 0's env 1 would replay member
    1's env 0 exactly).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    state = np.random.SeedSequence(seed).generate_state(num_envs, dtype=np.uint32)
    return (state.astype(np.int64) % _MAX_ENV_SEED).astype(np.int64)


def atari_max_episode_steps(env_cfg: EnvConfig) -> int:
    """Atari truncation in env steps: ``env.max_episode_steps``, or 108k frames / frame skip."""
    if env_cfg.max_episode_steps > 0:
        return env_cfg.max_episode_steps
    return ATARI_TRUNCATION_FRAMES // env_cfg.frame_skip


def envpool_options(env_cfg: EnvConfig, family: str) -> dict[str, Any]:
    """The envpool ``make`` options that ``env_cfg`` implies for ``family`` (no batching/seeding keys)."""
    if family == ATARI:
        return {
            "max_episode_steps": atari_max_episode_steps(env_cfg),
            "stack_num": env_cfg.frame_stack,
            "frame_skip": env_cfg.frame_skip,
            "noop_max": env_cfg.noop_max,
            "episodic_life": env_cfg.episodic_life,
            "reward_clip": env_cfg.reward_clip,
            "repeat_action_probability": env_cfg.repeat_action_probability,
            "full_action_space": env_cfg.full_action_space,
            "img_height": env_cfg.image_size,
            "img_width": env_cfg.image_size,
            "use_fire_reset": False,
            "gray_scale": True,
            "zero_discount_on_life_loss": False,
        }
    options: dict[str, Any] = {}
    if env_cfg.max_episode_steps > 0:
        options["max_episode_steps"] = env_cfg.max_episode_steps
    return options


def envpool_episode_signals(
    family: str,
    reward: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    info: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """From one envpool step ``[B]``: ``(raw_reward float64 [B], episode_over bool [B])`` for statistics.

    Atari: ``info["reward"]`` is the unclipped score (``reward`` may be clipped) and
    ``info["terminated"]`` is game over, which differs from ``terminated`` at a life loss when
    ``episodic_life`` is on; the recorded episode ends at game over or truncation. Other
    families: the reward is already raw and the episode ends at ``terminated | truncated``.
    """
    terminated = np.asarray(terminated, dtype=bool)
    truncated = np.asarray(truncated, dtype=bool)
    if family == ATARI:
        raw_reward = np.asarray(info["reward"], dtype=np.float64)
        episode_over = np.asarray(info["terminated"], dtype=bool) | truncated
    else:
        raw_reward = np.asarray(reward, dtype=np.float64)
        episode_over = terminated | truncated
    return raw_reward, episode_over


class BatchedEnv(abc.ABC):
    """``num_envs`` copies of one env, stepped together (numpy in, numpy out).

    Synchronous (``is_async`` False): ``reset()`` then ``step(actions[num_envs])`` repeatedly.
    Asynchronous: ``reset()`` returns the first batch of ``batch_size`` envs; then repeatedly
    ``send(actions[batch_size], batch.env_ids)`` and ``batch = recv()``. ``recv`` returns whichever
    ``batch_size`` envs are ready, so rows are always identified by ``env_ids``.

    ``observation_space`` and ``action_space`` are the *single-env* spaces, as the batch delivers
    them (e.g. float32 for MuJoCo, whose simulator works in float64). Continuous actions are
    clipped to the action space bounds before stepping.
    """

    def __init__(
        self,
        env_id: str,
        family: str,
        backend: str,
        num_envs: int,
        batch_size: int,
        is_async: bool,
        observation_space: gymnasium.Space,
        action_space: gymnasium.Space,
    ) -> None:
        self.env_id = env_id
        self.family = family
        self.backend = backend
        self.num_envs = num_envs
        self.batch_size = batch_size
        self.is_async = is_async
        self.observation_space = observation_space
        self.action_space = action_space
        # Per env: did its last delivered step end a learning episode? Then its next step is a reset.
        self._previous_step_ended = np.ones(num_envs, dtype=bool)
        self._episode_stats = EpisodeStats(num_envs)
        self._closed = False

    # -- public interface --------------------------------------------------------------------

    def reset(self) -> StepBatch:
        """Reset every env; return the first batch (all rows ``is_first``).

        Synchronous: all ``num_envs`` envs. Asynchronous: the first ``batch_size`` envs ready;
        the others arrive through later ``recv()`` calls, also flagged ``is_first``.
        """
        self._check_open()
        self._previous_step_ended[:] = True
        self._episode_stats.reset()
        return self._finish(self._backend_reset())

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step all envs with ``actions`` ``[num_envs, ...]`` (synchronous envs only)."""
        self._check_open()
        if self.is_async:
            raise RuntimeError("step() is for synchronous envs; this one is asynchronous: use send() and recv()")
        return self._finish(self._backend_step(self._prepare_actions(actions, self.num_envs)))

    def send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        """Start stepping the envs ``env_ids`` ``[batch_size]`` with ``actions`` ``[batch_size, ...]``."""
        self._check_open()
        if not self.is_async:
            raise RuntimeError("send() is for asynchronous envs (env.async_batch_size > 0); use step()")
        env_ids = np.asarray(env_ids, dtype=np.int32)
        if env_ids.shape != (self.batch_size,):
            raise ValueError(f"env_ids has shape {env_ids.shape}; expected ({self.batch_size},)")
        self._backend_send(self._prepare_actions(actions, self.batch_size), env_ids)

    def recv(self) -> StepBatch:
        """Receive the next ``batch_size`` envs that finished stepping (asynchronous envs only)."""
        self._check_open()
        if not self.is_async:
            raise RuntimeError("recv() is for asynchronous envs (env.async_batch_size > 0); use step()")
        return self._finish(self._backend_recv())

    def close(self) -> None:
        """Release the envs; further calls raise. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._backend_close()

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary: id, family, backend, batching, spaces."""
        return {
            "env_id": self.env_id,
            "family": self.family,
            "backend": self.backend,
            "num_envs": self.num_envs,
            "batch_size": self.batch_size,
            "is_async": self.is_async,
            "observation_shape": list(self.observation_space.shape or ()),
            "observation_dtype": str(self.observation_space.dtype),
            "action_space": repr(self.action_space),
        }

    def __enter__(self) -> "BatchedEnv":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = f"async batch {self.batch_size}" if self.is_async else "sync"
        return f"{type(self).__name__}({self.env_id!r}, family={self.family}, num_envs={self.num_envs}, {mode})"

    # -- backend hooks -----------------------------------------------------------------------

    @abc.abstractmethod
    def _backend_reset(self) -> _BackendBatch: ...

    @abc.abstractmethod
    def _backend_step(self, actions: np.ndarray) -> _BackendBatch: ...

    @abc.abstractmethod
    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _backend_recv(self) -> _BackendBatch: ...

    @abc.abstractmethod
    def _backend_close(self) -> None: ...

    # -- shared bookkeeping ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _whole_group(self, env_ids: np.ndarray, in_flight: Any) -> int:
        """For backends that step fixed groups of ``batch_size`` consecutive envs: the group that
        ``env_ids`` names, checked to be exactly one group and not already in flight
        (``in_flight(group) -> bool``)."""
        group = int(env_ids[0]) // self.batch_size
        first = group * self.batch_size
        if not np.array_equal(env_ids, np.arange(first, first + self.batch_size)):
            raise ValueError(
                f"env_ids {env_ids.tolist()} must be exactly those of one received batch "
                f"(the {self.backend} backend steps envs in fixed groups of {self.batch_size})"
            )
        if in_flight(group):
            raise RuntimeError(f"envs {env_ids.tolist()} were sent again before their result was received")
        return group

    def _prepare_actions(self, actions: np.ndarray, batch: int) -> np.ndarray:
        """Check the shape of ``actions`` ``[batch, ...]``; cast and clip them for the backend."""
        space = self.action_space
        actions = np.asarray(actions)
        expected = (batch, *space.shape)
        if actions.shape != expected:
            raise ValueError(f"actions have shape {actions.shape}; expected {expected} for {space}")
        if isinstance(space, gymnasium.spaces.Discrete):
            return actions.astype(np.int32, copy=False)
        if isinstance(space, gymnasium.spaces.Box):
            return np.clip(actions.astype(space.dtype, copy=False), space.low, space.high)
        return actions

    def _finish(self, batch: _BackendBatch) -> StepBatch:
        """Flag reset steps and account episode statistics for one backend batch."""
        env_ids = batch.env_ids
        is_first = self._previous_step_ended[env_ids].copy()
        self._previous_step_ended[env_ids] = batch.terminated | batch.truncated
        returns, lengths = self._episode_stats.update(batch.raw_reward, batch.episode_over, env_ids, is_first)
        return StepBatch(
            obs=batch.obs,
            reward=batch.reward,
            terminated=batch.terminated,
            truncated=batch.truncated,
            is_first=is_first,
            env_ids=env_ids,
            episode_returns=returns,
            episode_lengths=lengths,
        )


class EnvpoolBatchedEnv(BatchedEnv):
    """envpool backend (families ``atari``, ``mujoco``, ``classic``)."""

    def __init__(self, env_cfg: EnvConfig, family: str, num_envs: int, batch_size: int, is_async: bool,
                 seed: int, num_threads: int, env_seeds: np.ndarray | None = None) -> None:
        import envpool

        self.envpool_options = envpool_options(env_cfg, family)
        with warnings.catch_warnings():
            # envpool builds float32 Box spaces from float64 bounds and Gymnasium warns about the
            # harmless cast (e.g. CartPole); that is noise for our users.
            warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")
            self._pool = envpool.make(
                env_cfg.id,
                env_type="gymnasium",
                num_envs=num_envs,
                batch_size=batch_size,
                num_threads=num_threads,
                seed=(per_env_seeds(seed, num_envs) if env_seeds is None else np.asarray(env_seeds)).tolist(),
                **self.envpool_options,
            )
            observation_space = self._pool.observation_space  # built lazily, hence inside the filter
            action_space = self._pool.action_space
        if family != ATARI and isinstance(observation_space, gymnasium.spaces.Box):
            # MuJoCo simulates in float64; learners work in float32, so the batch is float32.
            observation_space = gymnasium.spaces.Box(
                low=observation_space.low.astype(np.float32),
                high=observation_space.high.astype(np.float32),
                dtype=np.float32,
            )
        super().__init__(env_cfg.id, family, "envpool", num_envs, batch_size, is_async,
                         observation_space, action_space)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "envpool_options": dict(self.envpool_options)}

    def _convert_obs(self, obs: np.ndarray) -> np.ndarray:
        return obs if self.family == ATARI else obs.astype(np.float32, copy=False)

    def _backend_reset(self) -> _BackendBatch:
        if self.is_async:
            self._pool.async_reset()
            return self._backend_recv()
        obs, info = self._pool.reset()
        env_ids = np.asarray(info["env_id"], dtype=np.int32)
        zeros = np.zeros(env_ids.shape[0], dtype=np.float32)
        falses = np.zeros(env_ids.shape[0], dtype=bool)
        return _BackendBatch(self._convert_obs(obs), zeros, zeros.copy(), falses, falses.copy(), falses.copy(), env_ids)

    def _from_step(self, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                   truncated: np.ndarray, info: dict[str, Any]) -> _BackendBatch:
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        raw_reward, episode_over = envpool_episode_signals(self.family, reward, terminated, truncated, info)
        return _BackendBatch(
            obs=self._convert_obs(obs),
            reward=np.asarray(reward, dtype=np.float32),
            raw_reward=raw_reward,
            terminated=terminated,
            truncated=truncated,
            episode_over=episode_over,
            env_ids=np.asarray(info["env_id"], dtype=np.int32),
        )

    def _backend_step(self, actions: np.ndarray) -> _BackendBatch:
        return self._from_step(*self._pool.step(actions))

    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        self._pool.send(actions, env_ids)

    def _backend_recv(self) -> _BackendBatch:
        return self._from_step(*self._pool.recv())

    def _backend_close(self) -> None:
        self._pool.close()


class EnvpoolGroupedEnv(BatchedEnv):
    """envpool in fixed groups: ``num_envs / batch_size`` synchronous pools stepped in turn.

    The asynchronous interface with a guarantee that envpool's own asynchronous mode does not
    give: every ``recv`` returns one whole group (envs ``g * batch_size ... (g + 1) * batch_size -
    1``), in the order the groups were sent. While the caller acts on one group the others step on
    their pools' threads (double buffering with two groups), and a learner that needs every env
    in lockstep (A2C) still gets ``T`` steps of every env from the same policy.
    ``reset`` returns group 0; the other groups' first observations arrive through ``recv``.
    """

    def __init__(self, env_cfg: EnvConfig, family: str, num_envs: int, batch_size: int, seed: int,
                 num_threads: int) -> None:
        seeds = per_env_seeds(seed, num_envs)
        num_groups = num_envs // batch_size
        self._pools: list[EnvpoolBatchedEnv] = []
        try:
            for group in range(num_groups):
                self._pools.append(EnvpoolBatchedEnv(
                    env_cfg, family, batch_size, batch_size, False, seed, min(num_threads, batch_size) if num_threads else 0,
                    env_seeds=seeds[group * batch_size:(group + 1) * batch_size],
                ))
        except BaseException:
            self._close_pools()
            raise
        self.envpool_options = self._pools[0].envpool_options
        self._sent: collections.deque[int] = collections.deque()  # groups in flight, oldest first
        first = self._pools[0]
        super().__init__(env_cfg.id, family, "envpool", num_envs, batch_size, True,
                         first.observation_space, first.action_space)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "groups": len(self._pools), "envpool_options": dict(self.envpool_options)}

    def _backend_reset(self) -> _BackendBatch:
        for group in self._sent:  # collect whatever is still in flight before resetting
            self._pools[group]._pool.recv()
        self._sent.clear()
        for group, pool in enumerate(self._pools):
            pool._pool.async_reset()
            self._sent.append(group)
        return self._backend_recv()

    def _backend_step(self, actions: np.ndarray) -> _BackendBatch:
        raise RuntimeError("a grouped env is stepped with send() and recv()")

    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        group = self._whole_group(env_ids, self._sent.__contains__)
        self._pools[group]._pool.send(actions, env_ids - group * self.batch_size)
        self._sent.append(group)

    def _backend_recv(self) -> _BackendBatch:
        if not self._sent:
            raise RuntimeError("recv() with no envs in flight: send() actions for a received batch first")
        group = self._sent.popleft()
        batch = self._pools[group]._backend_recv()
        batch.env_ids = batch.env_ids + group * self.batch_size
        return batch

    def _close_pools(self) -> None:
        for pool in self._pools:
            pool.close()

    def _backend_close(self) -> None:
        self._close_pools()


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
        self._group_ids = [np.arange(g * batch_size, (g + 1) * batch_size, dtype=np.int32) for g in range(num_groups)]
        self._ready: collections.deque[_BackendBatch] = collections.deque()
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

    def _step_group(self, group: int, actions: np.ndarray) -> _BackendBatch:
        obs, reward, terminated, truncated, _info = self._groups[group].step(actions)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        return _BackendBatch(
            obs=self._convert_obs(obs),
            reward=np.asarray(reward, dtype=np.float32),
            raw_reward=np.asarray(reward, dtype=np.float64),
            terminated=terminated,
            truncated=truncated,
            episode_over=terminated | truncated,
            env_ids=self._group_ids[group],
        )

    def _backend_reset(self) -> _BackendBatch:
        self._ready.clear()
        for group, vector_env in enumerate(self._groups):
            ids = self._group_ids[group]
            obs, _info = vector_env.reset(seed=self._seeds[ids].tolist())
            zeros = np.zeros(ids.shape[0], dtype=np.float32)
            falses = np.zeros(ids.shape[0], dtype=bool)
            self._ready.append(_BackendBatch(self._convert_obs(obs), zeros, zeros.copy(), falses,
                                             falses.copy(), falses.copy(), ids))
        self._in_flight[:] = True  # every group has a batch waiting to be received
        return self._backend_recv()

    def _backend_step(self, actions: np.ndarray) -> _BackendBatch:
        return self._step_group(0, actions)

    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        group = self._whole_group(env_ids, lambda g: bool(self._in_flight[g]))
        self._in_flight[group] = True
        self._ready.append(self._step_group(group, actions))

    def _backend_recv(self) -> _BackendBatch:
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
        ConfigError: unsupported env family or observation space, or an ``async_batch_size`` that
            does not divide ``num_envs``.
    """
    family = env_family(env_cfg.id)
    if num_envs < 1:
        raise ConfigError(f"env.num_envs: {num_envs} must be >= 1")
    is_async = env_cfg.async_batch_size > 0
    batch_size = env_cfg.async_batch_size if is_async else num_envs
    if batch_size > num_envs or num_envs % batch_size:
        raise ConfigError(f"env.async_batch_size: {batch_size} must divide env.num_envs ({num_envs})")
    if family == GYMNASIUM:
        return GymnasiumBatchedEnv(env_cfg, num_envs, batch_size, is_async, seed)
    if is_async and fixed_groups:
        return EnvpoolGroupedEnv(env_cfg, family, num_envs, batch_size, seed, num_threads)
    return EnvpoolBatchedEnv(env_cfg, family, num_envs, batch_size, is_async, seed, num_threads)


__all__ = [
    "ATARI_TRUNCATION_FRAMES",
    "BatchedEnv",
    "EnvpoolBatchedEnv",
    "EnvpoolGroupedEnv",
    "GymnasiumBatchedEnv",
    "StepBatch",
    "atari_max_episode_steps",
    "envpool_episode_signals",
    "envpool_options",
    "make_env",
    "per_env_seeds",
]
