"""Per-env trajectories of an actor, cut into unrolls (IMPALA's actor thread; pure numpy).

How unrolls are cut (synchronous and asynchronous envs alike). Every env id keeps its own
trajectory: the observations it was acted on, and its completed steps (action, behaviour
log-prob, reward, end flags, the update count of the acting weights). An env step of env ``e``
is completed when the env returns ``e`` again. As soon as ``B = env.batch_size`` env ids
(``num_envs`` for a synchronous env, ``async_batch_size`` for an asynchronous one) each hold
``T = unroll_length`` completed steps, the first ``T`` steps of those ``B`` envs (the ones with
the most steps waiting first) become one unroll, and ``obs[T]`` of each is its bootstrap
observation. envpool's asynchronous ``recv`` returns whichever envs are ready, so an unroll's
envs need not have been received together; each column is still ``T`` consecutive steps of one
env. A new ``unroll_length`` applies to unrolls cut after the change; one update only
concatenates unrolls of equal length.
"""

from __future__ import annotations

import numpy as np

from pbt_rl.agents.rollout import Unroll


class EnvTrajectories:
    """Per env id: the observations acted on and the completed steps not yet cut into unrolls.

    For env ``e``, ``obs[e][i]`` is the observation step ``steps[e][i]`` acted on, and the last
    entry of ``obs[e]`` is the observation its next (possibly in-flight) action is chosen on.
    """

    def __init__(self, num_envs: int) -> None:
        self.obs: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self.steps: list[list[tuple]] = [[] for _ in range(num_envs)]
        # Action sent and not yet returned: (action, log_prob, policy_updates).
        self.pending: list[tuple | None] = [None] * num_envs

    def drop_experience(self) -> None:
        """Forget every completed and in-flight step; keep only observations still to be acted on."""
        for env_id in range(len(self.obs)):
            keep = self.obs[env_id][-1:] if self.pending[env_id] is None else []
            self.obs[env_id] = keep
            self.steps[env_id] = []
            self.pending[env_id] = None

    def receive(self, env_ids: np.ndarray, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray, is_first: np.ndarray) -> None:
        """Complete the in-flight steps of a received batch ``[B]`` and record its observations."""
        for row, env_id in enumerate(env_ids.tolist()):
            pending = self.pending[env_id]
            if pending is None:
                # First arrival (reset) or after dropped experience: start a fresh trajectory.
                self.obs[env_id] = []
                self.steps[env_id] = []
            else:
                self.steps[env_id].append(
                    (*pending, rewards[row], terminated[row], truncated[row], not is_first[row])
                )
                self.pending[env_id] = None
            self.obs[env_id].append(np.array(obs[row]))

    def sent(self, env_ids: np.ndarray, actions: np.ndarray, log_probs: np.ndarray, policy_updates: int) -> None:
        for row, env_id in enumerate(env_ids.tolist()):
            self.pending[env_id] = (actions[row], log_probs[row], policy_updates)

    def cut(self, length: int, group_size: int, version: int) -> Unroll | None:
        """An unroll ``[length, group_size]`` if that many envs have ``length`` steps, else None."""
        ready = [env_id for env_id, steps in enumerate(self.steps) if len(steps) >= length]
        if len(ready) < group_size:
            return None
        ready.sort(key=lambda env_id: -len(self.steps[env_id]))
        group = ready[:group_size]
        obs = np.stack([np.stack(self.obs[e][: length + 1]) for e in group], axis=1)  # [T + 1, B, ...]
        columns = [list(zip(*self.steps[e][:length])) for e in group]  # per env: fields of T steps

        def field(index: int, dtype: type) -> np.ndarray:
            """Field ``index`` of the step tuples as ``[T, B]``."""
            return np.stack([np.asarray(column[index], dtype=dtype) for column in columns], axis=1)

        actions = np.stack([np.stack(column[0]) for column in columns], axis=1)  # [T, B, *action_shape]
        unroll = Unroll(
            obs=obs,
            actions=actions,
            behaviour_log_probs=field(1, np.float32),
            policy_updates=field(2, np.int64),
            rewards=field(3, np.float32),
            terminated=field(4, bool),
            truncated=field(5, bool),
            valid=field(6, bool),
            policy_version=version,
        )
        for e in group:
            self.obs[e] = self.obs[e][length:]
            self.steps[e] = self.steps[e][length:]
        return unroll
