"""A2C: synchronous n-step advantage actor-critic (Mnih et al. 2016, the synchronous variant).

One update per unroll: step all ``num_envs`` envs ``T = unroll_length`` times with the current
policy, then take one gradient step on the ``[T, num_envs]`` batch with λ-return targets
(``td_lambda = 1`` gives the n-step returns of the paper). Terminations stop the return,
truncations bootstrap from the value of the cut episode's last observation, and auto-reset
steps are left out of the loss (see :mod:`pbt_rl.agents.returns`).
"""

from __future__ import annotations

import time

import numpy as np
from torch import Tensor

from pbt_rl.agents.base import CallStats, Learner, TrainReport, Unroll
from pbt_rl.agents.returns import lambda_returns
from pbt_rl.config import ConfigError, ExperimentConfig


class A2CLearner(Learner):
    """Synchronous advantage actor-critic on one batched env (``env.async_batch_size`` must be 0)."""

    algo = "a2c"

    def __init__(self, config: ExperimentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None) -> None:
        if config.env.async_batch_size:
            raise ConfigError(
                f"env.async_batch_size: {config.env.async_batch_size} needs agent.algo=impala; "
                f"a2c steps all envs together (set env.async_batch_size=0)"
            )
        super().__init__(config, seed, device, num_threads)
        self._obs: np.ndarray | None = None  # [num_envs, ...] prepared observation to act on next
        self._unroll: Unroll | None = None  # reused rollout buffer, reallocated when T changes

    def train(self, until_env_steps: int) -> TrainReport:
        """Collect unrolls and update until ``env_steps >= until_env_steps``."""
        stats = CallStats(self.env_steps)
        if self._obs is None:
            self._obs = self._prepare_obs(self.env.reset().obs, update_statistics=True)
        while self.env_steps < until_env_steps:
            started = time.perf_counter()
            unroll = self._collect(stats)
            acted = time.perf_counter()
            stats.add_update(self._update(unroll), unroll)
            stats.act_seconds += acted - started
            stats.update_seconds += time.perf_counter() - acted
        return stats.report(self.env_steps, self.updates, unroll_length=self.agent_cfg.unroll_length)

    def _buffer(self, actions: np.ndarray) -> Unroll:
        """The rollout buffer for the current ``unroll_length`` (allocated on first use / resize)."""
        length = self.agent_cfg.unroll_length
        unroll = self._unroll
        if unroll is None or unroll.length != length or unroll.actions.dtype != actions.dtype:
            obs = self._obs
            unroll = Unroll.empty(length, self.env.num_envs, obs.shape[1:], obs.dtype, actions.shape[1:], actions.dtype)
            self._unroll = unroll
        return unroll

    def _collect(self, stats: CallStats) -> Unroll:
        """Step every env ``unroll_length`` times with the current policy: one ``[T, num_envs]`` unroll."""
        unroll = None
        length = self.agent_cfg.unroll_length
        for t in range(length):
            actions, env_actions, log_probs = self._policy_step(self.model, self._obs)
            if unroll is None:
                unroll = self._buffer(actions)
            unroll.obs[t] = self._obs
            batch = self.env.step(env_actions)
            unroll.actions[t] = actions
            unroll.behaviour_log_probs[t] = log_probs
            unroll.rewards[t] = self._scale_rewards(batch)
            unroll.terminated[t] = batch.terminated
            unroll.truncated[t] = batch.truncated
            unroll.valid[t] = ~batch.is_first
            unroll.policy_updates[t] = self.updates
            self._obs = self._prepare_obs(batch.obs, update_statistics=True)
            self.env_steps += batch.batch_size
            stats.add_episodes(batch.episode_returns, batch.episode_lengths)
        unroll.obs[length] = self._obs
        return unroll

    def _targets(self, batch: dict[str, Tensor], log_probs: Tensor, values: Tensor,
                 bootstrap_value: Tensor) -> tuple[Tensor, Tensor]:
        """λ-returns as value targets; advantages ``G_t - V(x_t)``."""
        agent = self.agent_cfg
        values = values.detach()
        discounts = agent.gamma * (1.0 - batch["terminated"].float())
        returns = lambda_returns(batch["rewards"], values, bootstrap_value, discounts,
                                 batch["truncated"], agent.td_lambda)
        return returns - values, returns
