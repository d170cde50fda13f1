"""The batched-env interface (:class:`BatchedEnv`, :class:`StepBatch`) and the bookkeeping every
backend shares: next-step auto-reset flags (``StepBatch.is_first``), episode statistics, action
checks. Backends (:mod:`pbt_rl.envs.envpool_envs`, :mod:`pbt_rl.envs.gymnasium_envs`) implement
the ``_backend_*`` hooks and return :class:`BackendBatch` es; :func:`pbt_rl.envs.factory.make_env`
picks one.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from pbt_rl.envs.episode_stats import EpisodeStats

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
class BackendBatch:
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
        self._group_ids = tuple(_read_only(np.arange(start, start + batch_size, dtype=np.int32))
                                for start in range(0, num_envs - batch_size + 1, batch_size))
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

    def __enter__(self) -> "BatchedEnv":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = f"async batch {self.batch_size}" if self.is_async else "sync"
        return f"{type(self).__name__}({self.env_id!r}, family={self.family}, num_envs={self.num_envs}, {mode})"

    # -- backend hooks -----------------------------------------------------------------------

    @abc.abstractmethod
    def _backend_reset(self) -> BackendBatch: ...

    @abc.abstractmethod
    def _backend_step(self, actions: np.ndarray) -> BackendBatch: ...

    @abc.abstractmethod
    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _backend_recv(self) -> BackendBatch: ...

    @abc.abstractmethod
    def _backend_close(self) -> None: ...

    # -- shared bookkeeping ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def group_env_ids(self, group: int) -> np.ndarray:
        """The env ids of fixed group ``group`` (``0 <= group < num_envs // batch_size``): the
        ``batch_size`` consecutive envs from ``group * batch_size``, read-only. Backends that
        step fixed groups (A2C's, ``Learner.fixed_env_groups``) take exactly these in a ``send``."""
        if not 0 <= group < len(self._group_ids):
            raise IndexError(f"env group {group} of {len(self._group_ids)}")
        return self._group_ids[group]

    def _whole_group(self, env_ids: np.ndarray, in_flight: Any) -> int:
        """For backends that step fixed groups of ``batch_size`` consecutive envs: the group that
        ``env_ids`` names, checked to be exactly one group and not already in flight
        (``in_flight(group) -> bool``)."""
        group = int(env_ids[0]) // self.batch_size
        if not (0 <= group < len(self._group_ids) and np.array_equal(env_ids, self._group_ids[group])):
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
        if isinstance(space, gymnasium.spaces.Box):  # np.maximum then np.minimum: cheaper than np.clip here
            clipped = np.maximum(actions.astype(space.dtype, copy=False), space.low)
            return np.minimum(clipped, space.high, out=clipped)
        return actions

    def _finish(self, batch: BackendBatch) -> StepBatch:
        """Flag reset steps and account episode statistics for one backend batch."""
        env_ids = batch.env_ids
        is_first = self._previous_step_ended[env_ids]  # a copy: indexed by an array
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


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
