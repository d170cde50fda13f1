"""The learner base class: what A2C and IMPALA share around their :class:`LearnerState`.

A learner (:class:`Learner`) owns its batched env and its state record (weights, optimiser,
normalisers, counters, random generators: :mod:`pbt_rl.agents.state`). Subclasses
(:mod:`pbt_rl.agents.a2c`, :mod:`pbt_rl.agents.impala`) only decide how experience is gathered
and which targets (λ-returns or V-trace) the loss (:mod:`pbt_rl.agents.losses`) uses; acting,
the minibatch update with its guarded gradient step, hyperparameter changes and saving live here.

A learner sees only the ``env`` and ``agent`` sections of the config, and changes nothing about
its process: it draws every random number from its own generators and leaves torch threads,
cuDNN/TF32 flags and the GPU wait mode to the process's host
(:func:`pbt_rl.runtime.host.configure_process`).

Shapes: ``T`` env steps per env in an unroll, ``B`` envs in a batch, ``N = T * B`` samples.
Units: ``env_steps`` counts agent decisions summed over the member's envs (auto-reset steps
included: the env took them); ``updates`` counts gradient steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pbt_rl.agents.device import HostCopy, resolve_device, to_device
from pbt_rl.agents.graphed_acting import GraphedActing
from pbt_rl.agents.graphed_steps import GraphedSteps, StepTotals, select_columns
from pbt_rl.agents.hyperparameters import coerce_hyperparameters
from pbt_rl.agents.losses import ValidSteps, actor_critic_loss, policy_ratio_stats
from pbt_rl.agents.normalizer import RewardScaler, RunningMeanStd, uses_observation_normalization
from pbt_rl.agents.optimizer import apply_optimizer_hyperparameters, build_optimizer, graphable
from pbt_rl.agents.rollout import Unroll
from pbt_rl.agents.state import LearnerState, seeded_build
from pbt_rl.agents.train_report import CallStats
from pbt_rl.config import AgentConfig, EnvConfig, tunable_agent_fields

if TYPE_CHECKING:
    from pbt_rl.agents.acting_pool import ActingPool
    from pbt_rl.agents.networks import ActorCritic

STATE_FORMAT = 2
"""Version of the :meth:`Learner.state_dict` layout (2: the learner's own generators under ``rng``)."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm was not finite; raised before the optimiser took that step.

    With several minibatch steps per update, the steps before the failing one have been applied.
    """


class Learner:
    """Shared machinery of the actor-critic learners; see docs/design.md "Learner contract".

    Subclasses implement :meth:`train` and :meth:`targets` (advantages and value targets of an
    unroll batch) and may extend :meth:`state_dict` through :meth:`_extra_state`.

    The phases of learning are public, so tools and tests can run or observe each one on data of
    their own: :meth:`policy_step` (act on prepared observations), :meth:`update` (learn from one
    unroll), :meth:`minibatch_step` (one gradient step on a minibatch: :meth:`minibatch_loss`,
    with :meth:`targets`, then :meth:`gradient_step`: backward, clip, check, step).
    """

    algo = "base"
    fixed_env_groups = False  # async envs in fixed groups, returned whole in the order sent (make_env)

    def __init__(self, env: EnvConfig, agent: AgentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None) -> None:
        """Build the env (seeded by ``seed``), the network (initialised reproducibly from ``seed``,
        see :func:`~pbt_rl.agents.state.seeded_build`), the optimiser and the learner's generators.

        ``num_threads`` is this member's share of the cores, for envpool's worker threads unless
        ``env.num_threads`` sets them; torch's threads are the host's to set.
        """
        from pbt_rl.agents.networks import build_actor_critic
        from pbt_rl.envs import make_env

        self.env_cfg = env
        self.agent_cfg = agent
        self.seed = int(seed)
        self.device = resolve_device(device if device is not None else agent.device)
        self.env = make_env(env, env.num_envs, self.seed, num_threads=env.num_threads or (num_threads or 0),
                            fixed_groups=self.fixed_env_groups)
        spaces = (self.env.observation_space, self.env.action_space)
        model, acting_generator, update_generator = seeded_build(
            self.seed, self.device, lambda: build_actor_critic(*spaces, agent))
        model = model.to(self.device)
        self.state = LearnerState(
            model=model,
            optimizer=build_optimizer(model.parameters(), agent),
            obs_normalizer=(RunningMeanStd(tuple(self.env.observation_space.shape))
                            if uses_observation_normalization(agent, self.env.family) else None),
            reward_scaler=RewardScaler(self.env.num_envs) if agent.normalize_returns else None,
            acting_generator=acting_generator,
            update_generator=update_generator,
        )
        graphed = graphable(list(model.parameters()), agent)
        self._graphs = GraphedSteps(self) if graphed else None
        self._graphed_acting = GraphedActing(self.device) if graphed and agent.graphed_acting else None
        self._acting_pool: ActingPool | None = None
        self._closed = False

    # -- the state record's parts ---------------------------------------------------------------

    @property
    def model(self) -> "ActorCritic":
        return self.state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def obs_normalizer(self) -> RunningMeanStd | None:
        return self.state.obs_normalizer

    @property
    def reward_scaler(self) -> RewardScaler | None:
        return self.state.reward_scaler

    @property
    def env_steps(self) -> int:
        """Env steps taken so far, summed over this member's envs."""
        return self.state.env_steps

    @env_steps.setter
    def env_steps(self, value: int) -> None:
        self.state.env_steps = int(value)

    @property
    def updates(self) -> int:
        """Gradient steps taken so far."""
        return self.state.updates

    @updates.setter
    def updates(self, value: int) -> None:
        self.state.updates = int(value)

    # -- hyperparameters ----------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, int | float]:
        """Every numeric agent-config field and its current value."""
        return {name: getattr(self.agent_cfg, name) for name in tunable_agent_fields()}

    def set_hyperparameters(self, values: dict[str, Any]) -> None:
        """Change hyperparameters; they take effect at the next update (and the next unroll).

        Raises:
            KeyError: an unknown name (nothing is changed).
            ValueError: a value of the wrong type or out of range (nothing is changed).
        """
        converted = coerce_hyperparameters(dict(values))
        self.agent_cfg = dataclasses.replace(self.agent_cfg, **converted)
        apply_optimizer_hyperparameters(self.optimizer, self.agent_cfg)
        self._graph_inputs_changed()
        self._hyperparameters_changed(set(converted))

    def _graph_inputs_changed(self) -> None:
        """The gradient step's graph baked in the old constants or optimiser state: capture it again."""
        if self._graphs is not None:
            self._graphs.invalidate()

    def _hyperparameters_changed(self, names: set[str]) -> None:
        """Hook for subclasses (e.g. to resize buffers); ``self.agent_cfg`` is already updated."""

    # -- acting -------------------------------------------------------------------------------

    def _prepare_obs(self, raw_obs: np.ndarray, update_statistics: bool) -> np.ndarray:
        """Observations as the network takes them: normalised float32 when normalisation is on."""
        normalizer = self.state.obs_normalizer
        if normalizer is None:
            return raw_obs
        if update_statistics:
            normalizer.update(raw_obs)
        return np.asarray(normalizer.normalize(raw_obs), dtype=np.float32)

    def _scale_rewards(self, batch: Any) -> np.ndarray:
        """The learning rewards of a StepBatch, divided by the return scale when that is on."""
        rewards = np.asarray(batch.reward, dtype=np.float32)
        scaler = self.state.reward_scaler
        if scaler is None:
            return rewards
        return scaler(rewards, batch.terminated, batch.truncated, batch.is_first, batch.env_ids, self.agent_cfg.gamma)

    def policy_step(self, model: torch.nn.Module, obs: np.ndarray,
                    deterministic: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample actions for prepared observations ``[B, ...]`` with ``model`` (or take the mode):
        :meth:`launch_policy_step` then :meth:`finish_policy_step`. Returns host arrays
        ``(actions as sampled, env actions (clipped to the bounds), log_probs)``.

        Raises:
            TrainingDiverged: non-finite actions or log-probabilities from non-finite weights.
        """
        return self.finish_policy_step(model, self.launch_policy_step(model, obs, deterministic))

    def launch_policy_step(self, model: torch.nn.Module, obs: np.ndarray, deterministic: bool = False) -> HostCopy:
        """Start a policy step: its packed rows (:meth:`ActorCritic.act_packed`) on their way to the
        host; on a GPU this returns once the work is queued (:meth:`finish_policy_step` waits).

        Draws from the learner's acting generator, here, together with the other members of its
        host through their :class:`~pbt_rl.agents.acting_pool.ActingPool` (:meth:`act_with`), or
        else on a GPU with ``agent.graphed_acting`` as a replayed CUDA graph (the same draws). One
        device-to-host copy per step: every extra sync can wait for other members' kernels.
        """
        generator = self.state.acting_generator
        if self._acting_pool is not None:
            return HostCopy(self._acting_pool.act(model, to_device(obs, self.device), deterministic, generator))
        if self._graphed_acting is not None and not deterministic:
            return self._graphed_acting.launch(model, obs, generator)
        with torch.no_grad():
            return HostCopy(model.act_packed(to_device(obs, self.device), deterministic=deterministic,
                                             generator=generator))

    def finish_policy_step(self, model: torch.nn.Module,
                           launched: HostCopy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for a launched policy step (:meth:`launch_policy_step`) and check and unpack its rows:
        ``(actions as sampled, env actions, log_probs)`` as :meth:`policy_step` returns them."""
        packed = launched.array()
        if not np.isfinite(packed).all():
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingDiverged("non-finite policy weights while acting")
            raise ValueError("non-finite actions or log-probabilities from finite weights: check the observations")
        return model.unpack(packed)

    def act_with(self, pool: "ActingPool | None") -> None:
        """Choose actions through ``pool`` from now on, in one forward pass with the other learners
        acting through it (None: alone again). Same weights, observations and random draws."""
        self._acting_pool = pool

    def act(self, raw_obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Env actions ``[B, ...]`` of the current policy for raw observations ``[B, ...]``.

        Samples (advancing the learner's acting generator), or takes the mode when
        ``deterministic``; the observation statistics are used but not updated.
        """
        obs = self._prepare_obs(np.asarray(raw_obs), update_statistics=False)
        _, env_actions, _ = self.policy_step(self.model, obs, deterministic)
        return env_actions

    # -- learning -----------------------------------------------------------------------------

    def _batch_tensors(self, unroll: Unroll) -> dict[str, Tensor]:
        names = ("obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid")
        return {name: to_device(getattr(unroll, name), self.device) for name in names}

    def targets(self, batch: dict[str, Tensor], log_probs: Tensor, values: Tensor,
                bootstrap_value: Tensor) -> tuple[Tensor, Tensor]:
        """``(advantages, value_targets)`` ``[T, B]`` for one batch; learner specific."""
        raise NotImplementedError

    def update(self, unroll: Unroll) -> dict[str, float]:
        """Learn from ``unroll`` ``[T, B]``: ``num_epochs`` passes of ``num_minibatches`` gradient steps.

        Each pass splits a random permutation of the ``B`` env columns (the learner's update
        generator, on the CPU) into ``min(num_minibatches, B)`` minibatches of whole unrolls; with one minibatch
        there is no permutation (and no RNG draw). Every minibatch takes one gradient step with
        its targets recomputed from the current weights (:meth:`minibatch_step`), so
        ``num_epochs = num_minibatches = 1`` is the classic single A2C / IMPALA update.

        Returns the mean over the gradient steps of the loss parts, ``grad_norm``,
        ``clip_fraction`` and ``approx_kl`` (see :func:`policy_ratio_stats`).

        Raises:
            TrainingDiverged: non-finite loss or gradient norm. The failing step has changed no
                parameter or optimiser state; the steps of earlier minibatches of this call have
                been applied (and counted in ``updates``). With the steps replayed as CUDA graphs
                (``agent.cuda_graphs`` on a GPU: :mod:`pbt_rl.agents.graphed_steps`) the failure
                is found at the end of the call, and the steps after the failing one were not
                applied either.
        """
        batch = self._batch_tensors(unroll)
        plan = self._minibatch_plan(unroll.num_envs)
        if self._graphs is not None and self._graphs.can_run(plan):
            return self._graphs.update(batch, plan)
        totals = StepTotals()  # summed on the device: one host copy at the end, not per step
        for columns in plan:
            parts, grad_norm = self.minibatch_step(select_columns(batch, columns))
            totals.add({**parts, "grad_norm": grad_norm})
        return totals.means()

    def _minibatch_plan(self, num_envs: int) -> list[Tensor | None]:
        """The env columns of each gradient step's minibatch (None: the whole batch), epoch by epoch."""
        agent = self.agent_cfg
        num_minibatches = min(agent.num_minibatches, num_envs)
        if num_minibatches == 1:
            return [None] * agent.num_epochs
        plan: list[Tensor | None] = []
        for _epoch in range(agent.num_epochs):
            # Drawn on the CPU, copied through pinned memory: a plain copy would wait for the GPU.
            order = to_device(torch.randperm(num_envs, generator=self.state.update_generator).numpy(), self.device)
            plan.extend(torch.tensor_split(order, num_minibatches))
        return plan

    def _learn(self, unroll: Unroll, stats: CallStats) -> None:
        """:meth:`update` on ``unroll``, accounted in ``stats`` with its number of gradient steps."""
        updates_before = self.updates
        losses = self.update(unroll)
        stats.add_update(losses, unroll, self.updates - updates_before)

    def minibatch_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """One gradient step on a (mini)batch of whole unrolls, as device tensors ``[T, b, ...]``:
        :meth:`minibatch_loss`, then :meth:`gradient_step`.

        Returns the loss parts and :func:`policy_ratio_stats` and the gradient norm (0-d tensors).
        """
        loss, parts = self.minibatch_loss(batch)
        grad_norm = self.gradient_step(loss)
        self.updates += 1
        return parts, grad_norm

    def minibatch_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of a (mini)batch ``[T, b, ...]`` with its targets from the current weights, and
        its parts with :func:`policy_ratio_stats` (0-d tensors). Waits for nothing: a CUDA graph
        captures it (:mod:`pbt_rl.agents.graphed_steps`)."""
        obs = batch["obs"]  # [T + 1, b, ...]
        length, num_envs = batch["rewards"].shape
        # One forward pass over the T + 1 observations: the last row gives the bootstrap value
        # (its action is a placeholder: the value does not depend on it).
        actions = torch.cat([batch["actions"], batch["actions"][-1:]], dim=0)
        log_probs, entropy, values = self.model.evaluate(obs.flatten(0, 1), actions.flatten(0, 1))
        log_probs = log_probs.view(length + 1, num_envs)[:length]
        entropy = entropy.view(length + 1, num_envs)[:length]
        values = values.view(length + 1, num_envs)
        bootstrap_value = values[length].detach()
        values = values[:length]
        advantages, value_targets = self.targets(batch, log_probs, values, bootstrap_value)
        steps = ValidSteps(batch["valid"])
        behaviour_log_probs = batch["behaviour_log_probs"]
        loss, parts = actor_critic_loss(log_probs, entropy, values, advantages, value_targets, steps, self.agent_cfg,
                                        behaviour_log_probs=behaviour_log_probs)
        parts.update(policy_ratio_stats(log_probs, behaviour_log_probs, steps, self.agent_cfg.ppo_clip))
        return loss, parts

    def gradient_step(self, loss: Tensor) -> Tensor:
        """Backward, clip, check and step; returns the gradient norm before clipping (0-d tensor).

        The loss and the gradient norm are checked together, in the step's one wait for the
        device, before the optimiser moves: a non-finite one raises :class:`TrainingDiverged`
        with parameters and optimiser state untouched.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.agent_cfg.max_grad_norm if self.agent_cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        if not torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all().item():
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss.item()) else "gradient norm"
            raise TrainingDiverged(f"non-finite {what} (loss {loss.item()}, gradient norm {grad_norm.item()}) "
                                   f"at update {self.updates}")
        self.optimizer.step()
        return grad_norm

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything this member is (:meth:`LearnerState.state_dict` plus the hyperparameters): a
        copy made of CPU tensors and plain Python values, so that ``torch.save`` /
        ``torch.load(weights_only=True)`` round-trip it."""
        return {"format": STATE_FORMAT, "algo": self.algo, **self.state.state_dict(),
                "hyperparameters": self.hyperparameters(), **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any], *, resume: bool = True) -> None:
        """Become the member saved in ``state``.

        ``resume=True`` (a restart) also restores the counters and the random generators.
        ``resume=False`` (a PBT exploit) takes the weights, optimiser, normalisers and
        hyperparameters but keeps this learner's own ``env_steps``, ``updates`` and generators.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"learner state format {state.get('format')!r} is not {STATE_FORMAT}")
        hyperparameters = coerce_hyperparameters(state["hyperparameters"])
        self.state.load_state_dict(state, resume=resume)
        self.agent_cfg = dataclasses.replace(self.agent_cfg, **hyperparameters)
        apply_optimizer_hyperparameters(self.optimizer, self.agent_cfg)
        self._graph_inputs_changed()
        self._hyperparameters_changed(set(hyperparameters))
        self._state_loaded()

    def _extra_state(self) -> dict[str, Any]:
        """Hook: more entries for :meth:`state_dict`."""
        return {}

    def _state_loaded(self) -> None:
        """Hook: called at the end of :meth:`load_state_dict`."""

    def drop_stale_experience(self) -> None:
        """Forget experience gathered by an older policy (no-op unless the learner queues it)."""

    def close(self) -> None:
        """Release the env. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self.env.close()

    def __enter__(self) -> "Learner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
