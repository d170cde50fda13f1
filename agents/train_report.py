"""What one :meth:`~pbt_rl.agents.base.Learner.train` call did: :class:`TrainReport`, and
:class:`CallStats`, which a learner fills during the call.

Units: ``env_steps`` counts agent decisions summed over the member's envs (auto-reset steps
included: the env took them); ``updates`` counts gradient steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pbt_rl.agents.rollout import Unroll


@dataclass
class TrainReport:
    """What one ``Learner.train`` call did.

    ``env_steps`` is the learner's total env step counter after the call (so it is
    ``>= until_env_steps``); everything else covers this call only: the episodes that finished
    during it, the mean losses of its updates, its number of updates and its throughput (env steps
    taken in this call / wall seconds of this call). ``extra`` holds learner-specific numbers
    (``env_steps_in_call``, ``updates_total``, ``grad_norm``, ``act_seconds``, ``update_seconds``,
    ``env_seconds`` (acting blocked on the env), ``inference_seconds``, the acting thread's CPU
    time ``act_cpu_seconds`` and ``inference_cpu_seconds`` over the same spans, ``policy_steps``
    (:class:`ActingTime`), ``batch_shape`` ``[T, B]``
    of the last update, ``wall_seconds``, ``clip_fraction`` and ``approx_kl`` (averaged like the
    losses, see :func:`~pbt_rl.agents.losses.policy_ratio_stats`); IMPALA adds ``policy_lag`` and
    ``policy_lag_max``).
    """

    env_steps: int
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    updates: int = 0
    env_steps_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActingTime:
    """Where the acting thread's time went during a call (the member's thread for A2C, the actor
    thread for IMPALA): wall seconds acting (waits for the learner or for a turn left out), of
    them blocked on the env and in policy steps; the thread's CPU seconds over the same spans;
    and the number of policy steps. CPU per policy step is what acting costs the machine's cores
    per env batch, the per-step Python and launches that ``pbt-rl bench`` attributes by thread
    (docs/design.md, "Where the cores go")."""

    seconds: float = 0.0
    env_seconds: float = 0.0
    inference_seconds: float = 0.0
    cpu_seconds: float = 0.0
    inference_cpu_seconds: float = 0.0
    policy_steps: int = 0


class CallStats:
    """Accumulates what one ``train`` call did, and turns it into a :class:`TrainReport`."""

    def __init__(self, env_steps_at_start: int) -> None:
        self.started = time.perf_counter()
        self.env_steps_at_start = env_steps_at_start
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.loss_sums: dict[str, float] = {}
        self.batches = 0  # _update calls (one per batch of unrolls)
        self.updates = 0  # gradient steps
        self.batch_shape: list[int] = []
        self.acting = ActingTime()
        self.update_seconds = 0.0

    def add_episodes(self, returns: np.ndarray, lengths: np.ndarray) -> None:
        self.episode_returns.extend(float(r) for r in returns)
        self.episode_lengths.extend(int(n) for n in lengths)

    def add_update(self, stats: dict[str, float], unroll: Unroll, gradient_steps: int = 1) -> None:
        """Account one batch's update (``gradient_steps`` steps with epochs and minibatches)."""
        for name, value in stats.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
        self.batches += 1
        self.updates += gradient_steps
        self.batch_shape = [unroll.length, unroll.num_envs]

    def report(self, env_steps: int, updates_total: int, **extra: Any) -> TrainReport:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        means = {name: total / self.batches for name, total in self.loss_sums.items()} if self.batches else {}
        grad_norm = means.pop("grad_norm", float("nan"))
        # Diagnostics of the policy ratio, not loss terms: reported beside grad_norm.
        ratio_stats = {name: means.pop(name, float("nan")) for name in ("clip_fraction", "approx_kl")}
        steps = env_steps - self.env_steps_at_start
        return TrainReport(
            env_steps=env_steps,
            episode_returns=self.episode_returns,
            episode_lengths=self.episode_lengths,
            losses=means,
            updates=self.updates,
            env_steps_per_second=steps / seconds,
            extra={
                "env_steps_in_call": steps,
                "updates_total": updates_total,
                "grad_norm": grad_norm,
                **ratio_stats,
                "act_seconds": self.acting.seconds,
                "update_seconds": self.update_seconds,
                "env_seconds": self.acting.env_seconds,
                "inference_seconds": self.acting.inference_seconds,
                "act_cpu_seconds": self.acting.cpu_seconds,
                "inference_cpu_seconds": self.acting.inference_cpu_seconds,
                "policy_steps": self.acting.policy_steps,
                "batch_shape": self.batch_shape,
                "wall_seconds": seconds,
                **extra,
            },
        )
