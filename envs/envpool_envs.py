"""envpool backends (families ``atari``, ``mujoco``, ``classic``): one asynchronous or synchronous
pool (:class:`EnvpoolBatchedEnv`), or fixed groups of synchronous pools stepped in turn
(:class:`EnvpoolGroupedEnv`); both built on :class:`EnvpoolPool`, one envpool instance whose steps
come out as :class:`~pbt_rl.envs.batched.BackendBatch` es.

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

import collections
import warnings
from typing import Any

import gymnasium
import numpy as np

from pbt_rl.config import EnvConfig
from pbt_rl.envs.batched import BackendBatch, BatchedEnv, per_env_seeds
from pbt_rl.envs.registry import ATARI
from pbt_rl.machine_use import ENVPOOL, thread_named

ATARI_TRUNCATION_FRAMES = 108_000
"""Machado et al. 2018: an Atari episode is cut after 108k emulator frames (30 minutes of play)."""


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


class DirectCalls:
    """envpool's C++ ``_send`` and ``_recv`` of one pool, without its Python wrapper's conversions.

    Every asynchronous env batch of a member is one ``send`` and one ``recv``. envpool's public
    methods rebuild the whole step (every state key into a tree, an info dict, the config dict)
    and convert the actions through a dict on each call: on the 2-core CPU machine 203-206 us of
    the caller's CPU per Pong batch of 8 against 82-97 us for the same calls made directly
    (2026-12-06), where a member's whole acting step is ~600 us of CPU besides its policy. The
    direct calls read the five arrays a batch needs by their state-key positions, found once.

    They rely on envpool internals (``_state_keys``, ``_action_keys``, ``_send``, ``_recv``), so
    :meth:`of` checks the layout it relies on and returns None when a pool differs (another
    envpool version, a multi-player or dict-action env): that pool keeps the public methods.
    tests/test_envs.py checks that both give the same steps.
    """

    _ACTION_KEYS = ["env_id", "players.env_id", "action"]

    @staticmethod
    def _state_names(atari: bool) -> list[str]:
        """The state keys a batch is read from, in :meth:`recv`'s order."""
        return ["obs", "reward", "done", "trunc", "info:env_id"] + (["info:reward", "info:terminated"] if atari else [])

    def __init__(self, pool: Any, atari: bool) -> None:
        keys = {key: index for index, key in enumerate(pool._state_keys)}
        self._indices = [keys[name] for name in self._state_names(atari)]
        self._atari = atari
        self._recv = pool._recv
        self._send = pool._send
        self._action_dtype = np.dtype(pool._spec._action_spec[-1][0])
        self._all_env_ids = np.asarray(pool.all_env_ids, dtype=np.int32)

    @classmethod
    def of(cls, pool: Any, atari: bool) -> "DirectCalls | None":
        """Direct calls for ``pool`` if its layout is the one they rely on, else None."""
        try:
            if (list(pool._action_keys) != cls._ACTION_KEYS or not set(cls._state_names(atari)) <= set(pool._state_keys)
                    or pool.config.get("max_num_players", 1) != 1 or not callable(pool._recv) or not callable(pool._send)):
                return None
            return cls(pool, atari)
        except (AttributeError, KeyError, IndexError, TypeError):
            return None

    def send(self, actions: np.ndarray, env_ids: np.ndarray | None = None) -> None:
        """Step ``env_ids`` (all envs when None) with ``actions``, as ``pool.send`` does."""
        # Copies, as envpool's own send makes: its workers may read the arrays after this returns.
        env_ids = self._all_env_ids if env_ids is None else np.array(env_ids, dtype=np.int32)
        self._send([env_ids, env_ids, np.array(actions, dtype=self._action_dtype, order="C")])

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """``(obs, reward, terminated, truncated, info)`` as ``pool.recv`` returns them, with only
        the info keys pbt-rl reads (``env_id``; Atari: ``reward``, ``terminated``)."""
        state = self._recv()
        obs, reward, done, trunc, env_id, *atari = (state[index] for index in self._indices)
        info = {"env_id": env_id}
        if self._atari:
            info["reward"], info["terminated"] = atari
        return obs, reward, done & ~trunc, trunc, info


class EnvpoolPool:
    """One envpool instance: its options, its single-env spaces as the batch delivers them, and its
    steps converted to :class:`~pbt_rl.envs.batched.BackendBatch` es (no reset flags or episode
    statistics: those are the :class:`~pbt_rl.envs.batched.BatchedEnv`'s that owns the pool).

    ``num_envs`` envs seeded with ``env_seeds``; ``batch_size < num_envs`` makes envpool's own
    asynchronous mode possible (:meth:`start_reset`, :meth:`send`, :meth:`recv`).
    """

    def __init__(self, env_cfg: EnvConfig, family: str, num_envs: int, batch_size: int, num_threads: int,
                 env_seeds: np.ndarray, direct_calls: bool = True) -> None:
        import envpool

        self.family = family
        self.options = envpool_options(env_cfg, family)
        with warnings.catch_warnings():
            # envpool builds float32 Box spaces from float64 bounds and Gymnasium warns about the
            # harmless cast (e.g. CartPole); that is noise for our users.
            warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")
            with thread_named(ENVPOOL):  # envpool's worker threads take the name (the bench's CPU attribution)
                self._pool = envpool.make(
                    env_cfg.id,
                    env_type="gymnasium",
                    num_envs=num_envs,
                    batch_size=batch_size,
                    num_threads=num_threads,
                    seed=np.asarray(env_seeds).tolist(),
                    **self.options,
                )
            observation_space = self._pool.observation_space  # built lazily, hence inside the filter
            self.action_space = self._pool.action_space
        if family != ATARI and isinstance(observation_space, gymnasium.spaces.Box):
            # MuJoCo simulates in float64; learners work in float32, so the batch is float32.
            observation_space = gymnasium.spaces.Box(
                low=observation_space.low.astype(np.float32),
                high=observation_space.high.astype(np.float32),
                dtype=np.float32,
            )
        self.observation_space = observation_space
        # Steps go through envpool's C++ calls directly where its layout allows (DirectCalls),
        # else through its public send/recv, which take and return the same.
        self._io = (DirectCalls.of(self._pool, family == ATARI) if direct_calls else None) or self._pool

    @property
    def direct(self) -> bool:
        """Whether steps go through :class:`DirectCalls` (else envpool's public methods)."""
        return self._io is not self._pool

    def reset(self) -> BackendBatch:
        """Reset every env synchronously: the first observations, reward 0, no episode ends."""
        obs, info = self._pool.reset()
        env_ids = np.asarray(info["env_id"], dtype=np.int32)
        zeros = np.zeros(env_ids.shape[0], dtype=np.float32)
        falses = np.zeros(env_ids.shape[0], dtype=bool)
        return BackendBatch(self._convert_obs(obs), zeros, zeros.copy(), falses, falses.copy(), falses.copy(), env_ids)

    def start_reset(self) -> None:
        """Reset every env asynchronously; the first observations arrive through :meth:`recv`."""
        self._pool.async_reset()

    def step(self, actions: np.ndarray) -> BackendBatch:
        """Step every env with ``actions`` ``[num_envs, ...]`` (already checked and cast)."""
        self._io.send(actions)  # no env ids: every env, as envpool's own step sends
        return self._from_step(*self._io.recv())

    def send(self, actions: np.ndarray, env_ids: np.ndarray | None) -> None:
        """Start stepping the envs ``env_ids`` (ids of this pool; None: all of them) with ``actions``."""
        self._io.send(actions, env_ids)

    def recv(self) -> BackendBatch:
        """The next ``batch_size`` envs that finished stepping (or resetting)."""
        return self._from_step(*self._io.recv())

    def close(self) -> None:
        self._pool.close()

    def _convert_obs(self, obs: np.ndarray) -> np.ndarray:
        return obs if self.family == ATARI else obs.astype(np.float32, copy=False)

    def _from_step(self, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                   truncated: np.ndarray, info: dict[str, Any]) -> BackendBatch:
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        raw_reward, episode_over = envpool_episode_signals(self.family, reward, terminated, truncated, info)
        return BackendBatch(
            obs=self._convert_obs(obs),
            reward=np.asarray(reward, dtype=np.float32),
            raw_reward=raw_reward,
            terminated=terminated,
            truncated=truncated,
            episode_over=episode_over,
            env_ids=np.asarray(info["env_id"], dtype=np.int32),
        )


class EnvpoolBatchedEnv(BatchedEnv):
    """envpool backend: one pool of ``num_envs`` envs, synchronous or asynchronous."""

    def __init__(self, env_cfg: EnvConfig, family: str, num_envs: int, batch_size: int, is_async: bool,
                 seed: int, num_threads: int) -> None:
        self._pool = EnvpoolPool(env_cfg, family, num_envs, batch_size, num_threads, per_env_seeds(seed, num_envs))
        self.envpool_options = self._pool.options
        super().__init__(env_cfg.id, family, "envpool", num_envs, batch_size, is_async,
                         self._pool.observation_space, self._pool.action_space)

    def _backend_reset(self) -> BackendBatch:
        if self.is_async:
            self._pool.start_reset()
            return self._pool.recv()
        return self._pool.reset()

    def _backend_step(self, actions: np.ndarray) -> BackendBatch:
        return self._pool.step(actions)

    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        self._pool.send(actions, env_ids)

    def _backend_recv(self) -> BackendBatch:
        return self._pool.recv()

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
        self._pools: list[EnvpoolPool] = []
        try:
            for group in range(num_groups):
                self._pools.append(EnvpoolPool(
                    env_cfg, family, batch_size, batch_size, min(num_threads, batch_size) if num_threads else 0,
                    seeds[group * batch_size:(group + 1) * batch_size],
                ))
        except BaseException:
            self._close_pools()
            raise
        self.envpool_options = self._pools[0].options
        self._sent: collections.deque[int] = collections.deque()  # groups in flight, oldest first
        first = self._pools[0]
        super().__init__(env_cfg.id, family, "envpool", num_envs, batch_size, True,
                         first.observation_space, first.action_space)

    @property
    def num_groups(self) -> int:
        """Fixed groups of ``batch_size`` envs, each its own synchronous pool."""
        return len(self._pools)

    def _backend_reset(self) -> BackendBatch:
        for group in self._sent:  # collect whatever is still in flight before resetting
            self._pools[group].recv()
        self._sent.clear()
        for group, pool in enumerate(self._pools):
            pool.start_reset()
            self._sent.append(group)
        return self._backend_recv()

    def _backend_step(self, actions: np.ndarray) -> BackendBatch:
        raise RuntimeError("a grouped env is stepped with send() and recv()")

    def _backend_send(self, actions: np.ndarray, env_ids: np.ndarray) -> None:
        group = self._whole_group(env_ids, self._sent.__contains__)
        self._pools[group].send(actions, None)  # a group is its pool's every env
        self._sent.append(group)

    def _backend_recv(self) -> BackendBatch:
        if not self._sent:
            raise RuntimeError("recv() with no envs in flight: send() actions for a received batch first")
        group = self._sent.popleft()
        batch = self._pools[group].recv()
        batch.env_ids = batch.env_ids + group * self.batch_size
        return batch

    def _close_pools(self) -> None:
        for pool in self._pools:
            pool.close()

    def _backend_close(self) -> None:
        self._close_pools()
