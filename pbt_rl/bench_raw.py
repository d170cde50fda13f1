"""Raw envpool stepping, the yardstick of ``pbt-rl bench``: envpool alone with random actions at a
population's envs and threads (:func:`bench_raw_envpool`), and the measurements either side of each
population it is compared with (:class:`RawBrackets`, :func:`raw_around`).

A lent machine's own speed drifts over minutes (H100 lease, 2026-12-06: a 64-member Pong population
ran at 22.3k env steps/s, its envpool taking 560 us of CPU per env step, where two runs of its own
on the same lease had 28.2k and 28.5k at 440 us, against raw stepping at 34.2k measured minutes
before it), so raw stepping is measured before each population and again after it, and the
population is compared with the mean of the two, the drift between them said beside its ratio.

Units: env steps per second summed over all envs (Atari: x4 for frames per second).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np

from pbt_rl.config import ExperimentConfig
from pbt_rl.machine_use import ENVPOOL, cores_by_thread_name, thread_cpu_seconds, thread_named
from pbt_rl.runtime.resources import machine_threads


def bench_raw_envpool(config: ExperimentConfig, seconds: float, warmup_seconds: float = 3.0) -> dict[str, Any]:
    """Env steps/s of envpool alone with random actions, at the population's env and thread count."""
    import envpool

    from pbt_rl.envs import env_family
    from pbt_rl.envs.factory import envpool_options

    family = env_family(config.env.id)
    if family == "gymnasium":
        raise ValueError(f"{config.env.id} is not an envpool env; the raw benchmark needs envpool")
    total_envs = config.pbt.population_size * config.env.num_envs
    is_async = config.env.async_batch_size > 0
    batch_size = total_envs * config.env.async_batch_size // config.env.num_envs if is_async else total_envs
    # The same cores the population has: run.total_threads or the core count (members may
    # oversubscribe envpool threads; raw stepping is measured at one thread per core).
    threads = min(machine_threads(config.run.total_threads), os.cpu_count() or 1)
    with thread_named(ENVPOOL):  # its worker threads carry the name: their CPU time is told apart
        pool = envpool.make(
            config.env.id,
            env_type="gymnasium",
            num_envs=total_envs,
            batch_size=batch_size,
            num_threads=min(threads, batch_size),
            seed=config.run.seed,
            **envpool_options(config.env, family),
        )
    # Pre-drawn actions, so that the measurement is envpool and not Python's sampling.
    actions = random_actions(pool.action_space, batch_size, np.random.default_rng(config.run.seed))
    if is_async:
        pool.async_reset()

        def one_batch(i: int) -> int:
            _obs, _rew, _term, _trunc, info = pool.recv()
            pool.send(actions[i % len(actions)], info["env_id"])
            return batch_size
    else:
        pool.reset()

        def one_batch(i: int) -> int:
            pool.step(actions[i % len(actions)])
            return batch_size

    steps, elapsed, cores = time_batches(one_batch, warmup_seconds, seconds)
    pool.close()
    return {
        "env_steps_per_second": steps / elapsed,
        "envpool_cores": cores.get(ENVPOOL),
        "env_steps": steps,
        "total_envs": total_envs,
        "batch_size": batch_size,
        "threads": min(threads, batch_size),
        "mode": "async" if is_async else "sync",
        "seconds": elapsed,
    }


def random_actions(space: Any, batch: int, rng: np.random.Generator, count: int = 16) -> list[np.ndarray]:
    """``count`` batches of random actions for ``space`` (one env's), drawn before the clock starts."""
    if hasattr(space, "n"):
        return [rng.integers(0, space.n, size=batch) for _ in range(count)]
    return [rng.uniform(space.low, space.high, size=(batch, *space.shape)).astype(space.dtype) for _ in range(count)]


def time_batches(one_batch: Callable[[int], int], warmup_seconds: float,
                 seconds: float) -> tuple[int, float, dict[str, float]]:
    """Call ``one_batch(i)`` (it returns the env steps it took) for ``warmup_seconds``, then count
    its env steps over ``seconds``: ``(env steps, elapsed seconds, this process's cores by thread
    name over them)``."""
    i = 0
    deadline = time.perf_counter() + warmup_seconds
    while time.perf_counter() < deadline:
        one_batch(i)
        i += 1
    cpu_before, start, steps = thread_cpu_seconds([os.getpid()]), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        steps += one_batch(i)
        i += 1
    elapsed = time.perf_counter() - start
    return steps, elapsed, cores_by_thread_name(cpu_before, thread_cpu_seconds([os.getpid()]), elapsed)


DRIFT_NOTED = 0.05
"""Raw rates either side of a population that differ by more than this fraction are called out."""


def raw_around(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """What a population measured between two raw measurements is compared with: their mean rate,
    and how far the machine's raw speed moved meanwhile (``drift``: after over before, minus 1)."""
    low, high = before["env_steps_per_second"], after["env_steps_per_second"]
    return {"before": low, "after": high, "env_steps_per_second": (low + high) / 2, "drift": high / low - 1.0}


def drift_note(around: dict[str, float] | None) -> str:
    """'' or, when the raw speed moved by more than :data:`DRIFT_NOTED` around a population, a
    clause saying so (its ratio is then only as good as that)."""
    if around is None or abs(around["drift"]) <= DRIFT_NOTED:
        return ""
    return (f" (raw moved {100 * around['drift']:+.0f}% around it: {around['before']:,.0f} before, "
            f"{around['after']:,.0f} after)")


class RawBrackets:
    """Raw envpool measured before the first population and again after each one, so that every
    population lies between two raw measurements at its envs and threads; a population whose raw
    config is the one measured just before it (the same envs, threads and seed) shares that
    measurement instead of taking another."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.measured: list[dict[str, Any]] = []
        self._last_key: tuple[Any, ...] | None = None  # what measured[-1] was measured at

    def before(self, config: ExperimentConfig) -> dict[str, Any]:
        if not self.measured or self._last_key != _raw_key(config):
            return self._measure(config)
        return self.measured[-1]

    def after(self, config: ExperimentConfig) -> dict[str, Any]:
        return self._measure(config)

    def _measure(self, config: ExperimentConfig) -> dict[str, Any]:
        self.measured.append(bench_raw_envpool(config, seconds=self.seconds))
        self._last_key = _raw_key(config)
        return self.measured[-1]


def _raw_key(config: ExperimentConfig) -> tuple[Any, ...]:
    """What :func:`bench_raw_envpool` measures at: the envs, their number, the threads and the seed
    (not the members' env threads, which raw stepping does not use)."""
    return (dataclasses.replace(config.env, num_threads=0), config.pbt.population_size, config.run.total_threads,
            config.run.seed)
