"""IMPALA: decoupled acting and learning with V-trace off-policy correction (Espeholt et al. 2018).

Two threads per learner:

- the **actor** thread steps the env with its own copy of the policy (same device as the
  learner), refreshed from the learner's latest published weights before every env step, and
  turns the steps into unrolls ``[T, B]`` (+ the bootstrap observation) with the behaviour
  log-probabilities. Unrolls go into a bounded queue (``max(queue_size, learner_batch_unrolls)``
  unrolls). The actor waits only when that queue is full, never for a gradient step.
- the **learner** thread (the caller of :meth:`ImpalaLearner.train`) pops
  ``learner_batch_unrolls`` unrolls, concatenates them along ``B``, recomputes the target
  log-probabilities and values with the current weights, computes V-trace targets and takes one
  gradient step (or, with ``num_epochs`` / ``num_minibatches``, several PPO-clipped ones, the
  targets recomputed for each), then publishes the new weights to the actor.

Each thread has its own random stream: the actor samples actions only from the learner's acting
generator (on the learner's device), the learner thread permutes minibatches only from the update
generator (CPU), so neither thread's draws shift the other's (:mod:`pbt_rl.agents.state`).

How unrolls are cut from asynchronous env batches: :mod:`pbt_rl.agents.trajectories`.

Stale experience: the learner keeps a policy version, bumped by :meth:`load_state_dict` and
:meth:`drop_stale_experience`. Queued unrolls of an older version are discarded, and the actor
drops its partial trajectories when it sees the new version.

Between :meth:`train` calls the actor is paused (it stops once ``env_steps`` reaches the call's
target, and on any exit of ``train``), so ``state_dict``, ``load_state_dict`` and
``set_hyperparameters`` never race with it. An exception in the actor thread is re-raised by
the next (or current) :meth:`train` call.

Policy lag of an update: the learner's update count minus the mean update count of the weights
that chose the unroll's actions; ``TrainReport.extra['policy_lag']`` is its mean over the call.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pbt_rl.agents.base import Learner
from pbt_rl.agents.device import to_device
from pbt_rl.agents.rollout import Unroll
from pbt_rl.agents.trajectories import EnvTrajectories
from pbt_rl.agents.train_report import ActingTime, CallStats, TrainReport
from pbt_rl.agents.vtrace import vtrace
from pbt_rl.config import AgentConfig, EnvConfig
from pbt_rl.machine_use import ACTOR, set_thread_name

_ACTOR_JOIN_SECONDS = 30.0


class ImpalaLearner(Learner):
    """IMPALA learner: an actor thread feeding a V-trace learner through a bounded queue."""

    algo = "impala"

    def __init__(self, env: EnvConfig, agent: AgentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None) -> None:
        super().__init__(env, agent, seed, device, num_threads)
        self._cond = threading.Condition()
        # Everything below is guarded by self._cond.
        self._queue: collections.deque[Unroll] = collections.deque()
        self._policy_version = 0
        self._target_env_steps = 0
        self._actor_may_run = False
        self._actor_idle = True
        self._actor_error: BaseException | None = None
        self._stop = False
        self._episode_returns: list[float] = []
        self._episode_lengths: list[int] = []
        self._acting = ActingTime()  # the actor thread's, handed to each train call's report
        # Weights for the actor: a state dict of clones plus the update count that produced it.
        self._publish_lock = threading.Lock()
        self._published: tuple[dict[str, Tensor], int] | None = None
        self._publish_count = 0
        self._actor_model = copy.deepcopy(self.model).requires_grad_(False)
        self._publish()
        self._thread: threading.Thread | None = None

    # -- learner thread -----------------------------------------------------------------------

    def train(self, until_env_steps: int) -> TrainReport:
        """Let the actor step to ``until_env_steps`` env steps and learn from every full batch of unrolls.

        Returns once the actor has reached the target and no full batch of unrolls is queued.
        """
        stats = CallStats(self.env_steps)
        lags: list[float] = []
        self._raise_actor_error()
        self._start_actor()
        with self._cond:
            self._target_env_steps = int(until_env_steps)
            self._actor_may_run = True
            self._cond.notify_all()
        try:
            while True:
                unrolls = self._next_batch(until_env_steps, stats)
                if unrolls is None:
                    break
                unroll = Unroll.concatenate(unrolls, pinned=self.device.type == "cuda")
                lags.append(float(self.updates - unroll.policy_updates.mean()))
                started = time.perf_counter()
                self._learn(unroll, stats)
                self._publish()
                stats.update_seconds += time.perf_counter() - started
        finally:
            self._pause_actor()
            with self._cond:
                self._take_episodes(stats)
                stats.acting, self._acting = self._acting, ActingTime()
        self._raise_actor_error()
        return stats.report(
            self.env_steps,
            self.updates,
            policy_lag=float(np.mean(lags)) if lags else float("nan"),
            policy_lag_max=float(np.max(lags)) if lags else float("nan"),
            queued_unrolls=len(self._queue),
            unroll_length=self.agent_cfg.unroll_length,
        )

    def _next_batch(self, until_env_steps: int, stats: CallStats) -> list[Unroll] | None:
        """Wait for the next batch of unrolls; None once the actor reached the target and none is full."""
        with self._cond:
            while True:
                self._raise_actor_error()
                self._take_episodes(stats)
                unrolls = self._pop_unrolls()
                if unrolls:
                    self._cond.notify_all()  # room in the queue again
                    return unrolls
                if self._actor_idle and self.env_steps >= until_env_steps:
                    return None
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the IMPALA actor thread stopped unexpectedly")
                self._cond.wait(timeout=1.0)

    def _pop_unrolls(self) -> list[Unroll]:
        """Up to ``learner_batch_unrolls`` queued unrolls of the current version and of equal length.

        Fewer than asked only when an unroll of another length waits behind them (after an
        ``unroll_length`` change), so that they are not held forever. Caller holds ``_cond``.
        """
        while self._queue and self._queue[0].policy_version != self._policy_version:
            self._queue.popleft()
        if not self._queue:
            return []
        wanted = self.agent_cfg.learner_batch_unrolls
        length = self._queue[0].length
        same = 0
        for unroll in self._queue:
            if unroll.length != length or unroll.policy_version != self._policy_version or same == wanted:
                break
            same += 1
        if same < wanted and same == len(self._queue):
            return []
        return [self._queue.popleft() for _ in range(same)]

    def _take_episodes(self, stats: CallStats) -> None:
        """Move the episodes the actor finished into ``stats``. Caller holds ``_cond``."""
        stats.add_episodes(np.asarray(self._episode_returns), np.asarray(self._episode_lengths))
        self._episode_returns.clear()
        self._episode_lengths.clear()

    def targets(self, batch: dict[str, Tensor], log_probs: Tensor, values: Tensor,
                bootstrap_value: Tensor) -> tuple[Tensor, Tensor]:
        """V-trace: ``(advantages, vs)``.

        The advantages are V-trace's ``pg_advantages`` (weighted by ``min(ρ̄_pg, π/μ)``), or the
        unweighted ones when ``ppo_clip > 0``: the clipped ratio ``π/μ`` of the loss already
        corrects for the behaviour policy (APPO).
        """
        agent = self.agent_cfg
        valid = batch["valid"]
        # An auto-reset step's action was ignored: give it importance weight 1 (log rho = 0) so its
        # arbitrary log-probabilities cannot matter; it is masked out of the loss anyway.
        behaviour = torch.where(valid, batch["behaviour_log_probs"], log_probs.detach())
        discounts = agent.gamma * (1.0 - batch["terminated"].float())
        targets = vtrace(
            behaviour, log_probs, batch["rewards"], values.detach(), bootstrap_value, discounts,
            trace_cut=batch["truncated"], rho_clip=agent.vtrace_rho_clip, c_clip=agent.vtrace_c_clip,
            pg_rho_clip=agent.vtrace_pg_rho_clip, td_lambda=agent.td_lambda,
        )
        advantages = targets.advantages if agent.ppo_clip > 0 else targets.pg_advantages
        return advantages, targets.vs

    def _publish(self) -> None:
        """Hand the current weights to the actor (it loads them before its next env step)."""
        weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        with self._publish_lock:
            self._published = (weights, self.updates)
            self._publish_count += 1

    # -- actor thread -------------------------------------------------------------------------

    def _start_actor(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._actor_main, name="impala-actor", daemon=True)
            self._thread.start()

    def _pause_actor(self) -> None:
        """Stop the actor at its next step boundary and wait until it is idle."""
        with self._cond:
            self._actor_may_run = False
            self._cond.notify_all()
            while not self._actor_idle and self._thread is not None and self._thread.is_alive():
                self._cond.wait(timeout=1.0)

    def _raise_actor_error(self) -> None:
        if self._actor_error is not None:
            raise self._actor_error

    def _actor_main(self) -> None:
        set_thread_name(ACTOR)
        try:
            self._actor_loop()
        except BaseException as exc:  # re-raised in the learner thread by train()
            with self._cond:
                self._actor_error = exc
                self._actor_idle = True
                self._cond.notify_all()

    def _actor_loop(self) -> None:
        """Act on each received batch, step its envs and queue the unrolls its steps complete.

        A received batch's bookkeeping (its rewards and steps into the trajectories, the unrolls
        they complete, queued for the learner) is done while the GPU computes the batch's actions:
        the policy step is launched first and waited for after, so the CPU work fills what was a
        spinning wait. It is done before the actor pauses too, so a pause finds the same unrolls
        queued and the same statistics as if it were done on receipt.
        """
        env, state = self.env, self.state
        on_gpu = self.device.type == "cuda"
        obs_device = self.device if on_gpu and self.agent_cfg.trajectories_on_device else None
        trajectories = EnvTrajectories(env.num_envs, pinned=on_gpu, obs_device=obs_device)
        version = self._policy_version
        loaded_count = -1
        policy_updates = 0
        batch = None
        obs = None  # prepared observations of `batch`
        unrecorded = None  # `batch`, if its bookkeeping is still to be done
        while True:
            with self._cond:
                flush = unrecorded is not None and self._actor_must_wait()
                if not flush:
                    while self._actor_must_wait():
                        if not self._actor_idle:
                            self._actor_idle = True
                            self._cond.notify_all()
                        self._cond.wait()
                    if self._stop:
                        return
                    self._actor_idle = False
                    if version != self._policy_version:
                        version = self._policy_version
                        trajectories.drop_experience()
            if flush:  # pausing: the last batch's bookkeeping first, as if it were done on receipt
                if not self._record(trajectories, unrecorded, obs, version):
                    return
                unrecorded = None
                continue
            started, cpu_started = time.perf_counter(), time.thread_time()
            with self._publish_lock:
                published, count = self._published, self._publish_count
            if count != loaded_count:
                self._actor_model.load_state_dict(published[0])
                policy_updates, loaded_count = published[1], count
            if batch is None:
                batch = unrecorded = env.reset()
                obs = self._actor_obs(batch, obs_device)
            acting, cpu_acting = time.perf_counter(), time.thread_time()
            launched = self.launch_policy_step(self._actor_model, obs)
            inference, inference_cpu = time.perf_counter() - acting, time.thread_time() - cpu_acting
            if unrecorded is not None:  # while the GPU computes the actions (waits only if the queue is full)
                if not self._record(trajectories, unrecorded, obs, version):
                    return
                unrecorded = None
            finishing, cpu_finishing = time.perf_counter(), time.thread_time()
            actions, env_actions, log_probs = self.finish_policy_step(self._actor_model, launched)
            inference += time.perf_counter() - finishing
            inference_cpu += time.thread_time() - cpu_finishing
            trajectories.sent(batch.env_ids, actions, log_probs, policy_updates)
            stepping = time.perf_counter()
            if env.is_async:
                env.send(env_actions, batch.env_ids)
                state.env_steps += batch.batch_size
                batch = env.recv()
            else:
                state.env_steps += batch.batch_size
                batch = env.step(env_actions)
            stepped = time.perf_counter()
            obs, unrecorded = self._actor_obs(batch, obs_device), batch
            with self._cond:
                self._episode_returns.extend(batch.episode_returns.tolist())
                self._episode_lengths.extend(batch.episode_lengths.tolist())
                acted = self._acting
                acted.seconds += time.perf_counter() - started
                acted.cpu_seconds += time.thread_time() - cpu_started
                acted.env_seconds += stepped - stepping
                acted.inference_seconds += inference
                acted.inference_cpu_seconds += inference_cpu
                acted.policy_steps += 1

    def _actor_obs(self, batch: Any, device: torch.device | None) -> np.ndarray | torch.Tensor:
        """A received batch's prepared observations, on ``device`` when the trajectories keep them
        there (the policy step and the rings both read that one copy)."""
        obs = self._prepare_obs(batch.obs, update_statistics=True)
        return obs if device is None else to_device(obs, device)

    def _actor_must_wait(self) -> bool:
        """Whether the actor is to stay idle now (asked with ``self._cond`` held): paused, or at its target."""
        return not self._stop and (not self._actor_may_run or self.state.env_steps >= self._target_env_steps)

    def _record(self, trajectories: EnvTrajectories, batch: Any, obs: np.ndarray | torch.Tensor, version: int) -> bool:
        """A received batch into the trajectories (its prepared observations ``obs``, its scaled
        rewards, the in-flight steps it completes) and the unrolls complete now queued
        (:meth:`_enqueue`). False when the actor is to stop."""
        trajectories.receive(batch.env_ids, obs, self._scale_rewards(batch), batch.terminated, batch.truncated,
                             batch.is_first)
        unrolls = []
        while (unroll := trajectories.cut(self.agent_cfg.unroll_length, self.env.batch_size, version)) is not None:
            unrolls.append(unroll)
        return self._enqueue(unrolls, version)

    def _enqueue(self, unrolls: list[Unroll], version: int) -> bool:
        """Queue ``unrolls`` for the learner, waiting for room; dropped if their policy version is
        stale. False when the actor is to stop."""
        with self._cond:
            for unroll in unrolls:
                while (len(self._queue) >= self._queue_bound() and self._actor_may_run
                       and not self._stop and version == self._policy_version):
                    self._cond.wait()
                if self._stop:
                    return False
                if version == self._policy_version:
                    self._queue.append(unroll)
                    self._cond.notify_all()
        return True

    def _queue_bound(self) -> int:
        agent = self.agent_cfg
        return max(agent.queue_size, agent.learner_batch_unrolls)

    # -- PBT hooks, state, shutdown -------------------------------------------------------------

    def drop_stale_experience(self) -> None:
        """Discard queued and partial unrolls gathered by the policy before this call."""
        with self._cond:
            self._policy_version += 1
            self._queue.clear()
            self._cond.notify_all()

    def _state_loaded(self) -> None:
        self.drop_stale_experience()
        self._publish()

    def _hyperparameters_changed(self, names: set[str]) -> None:
        with self._cond:
            self._cond.notify_all()  # a new queue bound may free a waiting actor

    def close(self) -> None:
        """Stop and join the actor thread, then close the env. Closing twice is harmless."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=_ACTOR_JOIN_SECONDS)
        super().close()
