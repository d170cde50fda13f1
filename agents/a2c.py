"""A2C: synchronous n-step advantage actor-critic (Mnih et al. 2016, the synchronous variant).

One update per unroll: step all ``num_envs`` envs ``T = unroll_length`` times with the current
policy, then learn from the ``[T, num_envs]`` batch (one gradient step, or PPO-style epochs of
minibatch steps: ``Learner.update`` in :mod:`pbt_rl.agents.base`) with λ-return targets
(``td_lambda = 1`` gives the n-step returns of the paper). Terminations stop the return,
truncations bootstrap from the value of the cut episode's last observation, and auto-reset
steps are left out of the loss (see :mod:`pbt_rl.agents.returns`).

Double buffering (``env.async_batch_size`` = ``num_envs / G``): the envs form ``G`` fixed groups,
stepped in turn; the policy acts on group ``g`` while the groups sent before it step on the env
threads, so env threads do not wait for inference and inference does not wait for them (Sample
Factory's double-buffered sampling). Every env still takes its ``T`` steps with the same weights
and the update sees the same ``[T, num_envs]`` batch: the algorithm is unchanged, only the
order of the work is.
"""

from __future__ import annotations

import time

import numpy as np
from torch import Tensor

from pbt_rl.agents.base import Learner
from pbt_rl.agents.returns import lambda_returns
from pbt_rl.agents.rollout import Unroll
from pbt_rl.agents.train_report import CallStats, TrainReport
from pbt_rl.config import AgentConfig, EnvConfig
from pbt_rl.envs.factory import StepBatch


class A2CLearner(Learner):
    """Synchronous advantage actor-critic; with ``env.async_batch_size`` its envs step in fixed groups."""

    algo = "a2c"
    fixed_env_groups = True  # every env takes its T steps with the same weights

    def __init__(self, env: EnvConfig, agent: AgentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None) -> None:
        super().__init__(env, agent, seed, device, num_threads)
        # The reused rollout buffer (reallocated when T changes; pinned on a GPU). Between unrolls
        # its last observation row holds the prepared observations to act on next.
        self._unroll: Unroll | None = None
        self._in_flight: list[object] = []  # sync env: the step results not yet "received"

    def train(self, until_env_steps: int) -> TrainReport:
        """Collect unrolls and update until ``env_steps >= until_env_steps``."""
        stats = CallStats(self.env_steps)
        while self.env_steps < until_env_steps:
            started, cpu_started = time.perf_counter(), time.thread_time()
            unroll = self._collect(stats)
            acted = time.perf_counter()
            stats.acting.cpu_seconds += time.thread_time() - cpu_started
            self._learn(unroll, stats)
            stats.acting.seconds += acted - started
            stats.update_seconds += time.perf_counter() - acted
        return stats.report(self.env_steps, self.updates, unroll_length=self.agent_cfg.unroll_length)

    # -- stepping groups of envs -------------------------------------------------------------

    def _send(self, group: int, env_actions: np.ndarray, stats: CallStats) -> None:
        """Start stepping ``group`` (a synchronous env has one group, stepped right here)."""
        env = self.env
        started = time.perf_counter()
        if env.is_async:
            env.send(env_actions, env.group_env_ids(group))
        else:
            self._in_flight.append(env.step(env_actions))
        stats.acting.env_seconds += time.perf_counter() - started

    def _recv(self, group: int, stats: CallStats) -> StepBatch:
        """The step results of ``group``, which must be the oldest group in flight."""
        started = time.perf_counter()
        batch = self.env.recv() if self.env.is_async else self._in_flight.pop(0)
        stats.acting.env_seconds += time.perf_counter() - started
        first = int(self.env.group_env_ids(group)[0])
        if int(batch.env_ids[0]) != first:  # the grouped env returns groups in the order sent
            raise RuntimeError(f"expected env group {group}, received envs from {int(batch.env_ids[0])}")
        return batch

    def _reset_all(self, stats: CallStats) -> np.ndarray:
        """Reset every env; the prepared first observations ``[num_envs, ...]``."""
        env = self.env
        batches = [env.reset()]
        while sum(b.batch_size for b in batches) < env.num_envs:
            batches.append(self._recv(len(batches), stats))
        return self._prepare_obs(np.concatenate([b.obs for b in batches]), update_statistics=True)

    # -- collecting --------------------------------------------------------------------------

    def _next_unroll(self, stats: CallStats) -> Unroll:
        """The rollout buffer for the current ``unroll_length``, its first observation row holding
        the observations to act on (the last row of the previous unroll; at the start, the envs'
        first observations). Allocated on first use and when the length changes; pinned on a GPU,
        so that the policy steps and the update copy its rows to the device without staging."""
        length = self.agent_cfg.unroll_length
        previous = self._unroll
        current = self._reset_all(stats) if previous is None else previous.obs[previous.length]
        unroll = previous
        if unroll is None or unroll.length != length:
            action_shape, action_dtype = self.model.sampled_action_layout
            unroll = Unroll.empty(length, self.env.num_envs, current.shape[1:], current.dtype, action_shape,
                                  action_dtype, pinned=self.device.type == "cuda")
            self._unroll = unroll
        unroll.obs[0] = current
        return unroll

    def _collect(self, stats: CallStats) -> Unroll:
        """Step every env ``unroll_length`` times with the current policy: one ``[T, num_envs]`` unroll.

        Group ``g``'s step ``t`` is received (and its next action chosen) only after every other
        group's step ``t`` was sent, so up to ``G - 1`` groups step while the policy acts. Each
        received batch's prepared observations go straight into the unroll's row ``t``, which the
        policy step then reads: one host copy per frame.
        """
        env = self.env
        size = env.batch_size
        groups = env.num_envs // size
        length = self.agent_cfg.unroll_length
        model, updates = self.model, self.updates  # both fixed while collecting
        unroll = self._next_unroll(stats)
        acting = stats.acting
        for t in range(length + 1):
            for group in range(groups):
                cols = slice(group * size, (group + 1) * size)
                batch = self._recv(group, stats) if t > 0 else None
                if batch is not None:
                    unroll.obs[t, cols] = self._prepare_obs(batch.obs, update_statistics=True)
                launched = None
                if t < length:  # act first: the bookkeeping below is done while the GPU computes
                    started, cpu_started = time.perf_counter(), time.thread_time()
                    launched = self.launch_policy_step(model, unroll.obs[t, cols])
                    acting.inference_seconds += time.perf_counter() - started
                    acting.inference_cpu_seconds += time.thread_time() - cpu_started
                if batch is not None:
                    unroll.rewards[t - 1, cols] = self._scale_rewards(batch)
                    unroll.terminated[t - 1, cols] = batch.terminated
                    unroll.truncated[t - 1, cols] = batch.truncated
                    unroll.valid[t - 1, cols] = ~batch.is_first
                    self.env_steps += batch.batch_size
                    stats.add_episodes(batch.episode_returns, batch.episode_lengths)
                if launched is None:
                    continue
                started, cpu_started = time.perf_counter(), time.thread_time()
                actions, env_actions, log_probs = self.finish_policy_step(model, launched)
                acting.inference_seconds += time.perf_counter() - started
                acting.inference_cpu_seconds += time.thread_time() - cpu_started
                acting.policy_steps += 1
                unroll.actions[t, cols] = actions
                unroll.behaviour_log_probs[t, cols] = log_probs
                unroll.policy_updates[t, cols] = updates
                self._send(group, env_actions, stats)
        return unroll

    def targets(self, batch: dict[str, Tensor], log_probs: Tensor, values: Tensor,
                bootstrap_value: Tensor) -> tuple[Tensor, Tensor]:
        """λ-returns as value targets; advantages ``G_t - V(x_t)``."""
        agent = self.agent_cfg
        values = values.detach()
        discounts = agent.gamma * (1.0 - batch["terminated"].float())
        returns = lambda_returns(batch["rewards"], values, bootstrap_value, discounts,
                                 batch["truncated"], agent.td_lambda)
        return returns - values, returns
