"""``pbt-rl bench envs CONFIG``: the population's envs stepped as its members step them, with
nothing else running, against raw envpool at the same envs and cores.

The population bench (:mod:`pbt_rl.bench`) measures the envs' arrangement and the members' work
together. This one takes the members' work away: each member's envs are built as its learner
builds them (:func:`~pbt_rl.envs.make_env` with the member's share of env threads,
``env.async_batch_size`` and, for A2C, fixed groups), in a process of their own, and stepped with
random actions drawn beforehand in the member's pattern (asynchronous: receive a batch, send it
back, so that the other groups step meanwhile; synchronous: step every env). No policy, no
learning, no checkpoints. Its ratio to raw envpool is the most a population arranged so could
reach; the population's own ratio over it is what the members' work costs.

Units: env steps per second summed over all envs (Atari: x4 for frames per second); CPU in
microseconds per env step.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from typing import Any, Callable

import numpy as np

from pbt_rl.bench_raw import RawBrackets, drift_note, random_actions, raw_around, time_batches
from pbt_rl.config import ConfigError, ExperimentConfig, from_dict, to_dict
from pbt_rl.machine_use import ENVPOOL
from pbt_rl.runtime.member import die_with_parent
from pbt_rl.runtime.resources import threads_per_member

START_TIMEOUT_S = 600.0
"""How long the members' processes may take to build their envs before the bench gives up."""


def member_envs_layout(config: ExperimentConfig) -> dict[str, Any]:
    """How one member's envs are built: its env threads, whether its async envs step in fixed
    groups (its learner's rule), its batch and the number of groups."""
    from pbt_rl.agents import learner_class

    env = config.env
    batch = env.async_batch_size or env.num_envs
    return {
        "num_envs": env.num_envs,
        "batch_size": batch,
        "groups": env.num_envs // batch,
        "is_async": env.async_batch_size > 0,
        "fixed_groups": learner_class(config.agent.algo).fixed_env_groups and env.async_batch_size > 0,
        "threads": threads_per_member(config.pbt.population_size, config.run.total_threads, env.num_threads),
    }


def step_member_envs(config_dict: dict[str, Any], member: int, layout: dict[str, Any], barrier: Any,
                     warmup_seconds: float, seconds: float, results: Any) -> None:
    """One member's process: build its envs, wait for the others, step for the warm-up, then
    count env steps and CPU time over ``seconds``; put the counts (or the error) in ``results``."""
    try:
        from pbt_rl.envs import make_env

        config = from_dict(config_dict)
        env = make_env(config.env, layout["num_envs"], config.run.seed + member, num_threads=layout["threads"],
                       fixed_groups=layout["fixed_groups"])
        try:
            actions = random_actions(env.action_space, env.batch_size, np.random.default_rng(config.run.seed + member))
            batch = env.reset()
            barrier.wait(timeout=START_TIMEOUT_S)

            def one_batch(i: int) -> int:
                nonlocal batch
                if env.is_async:
                    env.send(actions[i % len(actions)], batch.env_ids)
                    batch = env.recv()
                else:
                    batch = env.step(actions[i % len(actions)])
                return batch.env_ids.shape[0]

            steps, elapsed, cores = time_batches(one_batch, warmup_seconds, seconds)
        finally:
            env.close()
        envpool = cores.pop(ENVPOOL, None)
        results.put({"member": member, "env_steps": steps, "seconds": elapsed, "envpool_cores": envpool,
                     "stepping_cores": sum(cores.values()) if cores else None})
    except BaseException as error:  # noqa: BLE001 - reported to the parent as one line
        barrier.abort()
        results.put({"member": member, "error": f"{type(error).__name__}: {error}"})


def _member_process(parent_pid: int, *args: Any) -> None:
    """A member's envs process (:func:`step_member_envs`) that ends with the bench, even one killed
    by SIGKILL, instead of stepping on for its window or waiting at the barrier."""
    die_with_parent(parent_pid)
    step_member_envs(*args)


def measure_member_envs(config: ExperimentConfig, seconds: float, warmup_seconds: float = 3.0) -> dict[str, Any]:
    """Every member's envs stepped at once, each member in its own process (:func:`step_member_envs`);
    their summed rate and cores. Raises RuntimeError with the first member's error if one fails."""
    layout = member_envs_layout(config)
    members = config.pbt.population_size
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads forked mid-use
    barrier, results = context.Barrier(members), context.Queue()
    processes = [context.Process(target=_member_process, daemon=True,
                                 args=(os.getpid(), to_dict(config), member, layout, barrier, warmup_seconds,
                                       seconds, results))
                 for member in range(members)]
    for process in processes:
        process.start()
    reports: list[dict[str, Any]] = []
    finished = False
    try:
        deadline = time.monotonic() + START_TIMEOUT_S + warmup_seconds + seconds
        while len(reports) < members:
            try:
                reports.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"a member's envs process {'died' if dead else 'did not finish'} "
                                       f"(exit code {dead[0].exitcode if dead else None})") from None
                continue
            if "error" in reports[-1]:
                raise RuntimeError(f"member {reports[-1]['member']}'s envs: {reports[-1]['error']}")
        finished = True
    finally:
        for process in processes:  # after a failure the others are not waited for
            process.join(timeout=30 if finished else 0)
            if process.is_alive():
                process.kill()
    elapsed = max(report["seconds"] for report in reports)
    steps = sum(report["env_steps"] for report in reports)
    envpool = [report["envpool_cores"] for report in reports]
    stepping = [report["stepping_cores"] for report in reports]
    return {
        **layout,
        "population_size": members,
        "env_steps_per_second": sum(report["env_steps"] / report["seconds"] for report in reports),
        "env_steps": steps,
        "seconds": elapsed,
        "envpool_cores": None if None in envpool else sum(envpool),
        "stepping_cores": None if None in stepping else sum(stepping),
    }


def bench_member_envs(config: ExperimentConfig, seconds: float = 20.0, warmup_seconds: float = 3.0,
                      say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Raw envpool, the members' envs (:func:`measure_member_envs`), raw envpool again; the ratio
    is to the mean of the two raw rates (:func:`~pbt_rl.bench_raw.raw_around`)."""
    from pbt_rl.envs import env_family

    if env_family(config.env.id) == "gymnasium":
        raise ConfigError(f"env.id: {config.env.id} is not an envpool env; 'bench envs' compares with raw envpool")
    raws = RawBrackets(seconds=min(seconds, 20.0))
    before = raws.before(config)
    say(f"measured: raw envpool {before['env_steps_per_second']:,.0f} env steps/s")
    envs = measure_member_envs(config, seconds, warmup_seconds)
    say(f"measured: the members' envs {envs['env_steps_per_second']:,.0f} env steps/s")
    around = raw_around(before, raws.after(config))
    return {"env": config.env.id, "algo": config.agent.algo, "raw": before, "raw_around": around, "envs": envs,
            "ratio": envs["env_steps_per_second"] / around["env_steps_per_second"]}


def _us_per_step(cores: float | None, rate: float) -> str:
    return "n/a" if cores is None or rate <= 0 else f"{cores / rate * 1e6:,.0f} us"


def format_envs_bench(result: dict[str, Any]) -> str:
    """The envs bench as a few lines: the arrangement, both rates, the ratio and where the CPU went."""
    envs, raw, around = result["envs"], result["raw"], result["raw_around"]
    if envs["is_async"]:
        kind = "fixed groups" if envs["fixed_groups"] else "async batches"
        batching = f"{envs['groups']} {kind} of {envs['batch_size']}"
    else:
        batching = "one synchronous batch"
    rate = envs["env_steps_per_second"]
    threads = f"{envs['threads']} env thread{'s' if envs['threads'] != 1 else ''}"
    threads += " per group" if envs["fixed_groups"] else " per member"
    lines = [
        f"{result['env']}: the envs of {envs['population_size']} {result['algo']} members stepped as they step them "
        f"({envs['num_envs']} envs each in {batching}, {threads}), random actions, no learning",
        f"  raw envpool     {around['env_steps_per_second']:>10,.0f} env steps/s ({raw['mode']}, {raw['total_envs']} envs "
        f"in batches of {raw['batch_size']}, {raw['threads']} threads; mean of {around['before']:,.0f} before and "
        f"{around['after']:,.0f} after){drift_note(around)}",
        f"  members' envs   {rate:>10,.0f} env steps/s   ratio {result['ratio']:.3f}",
        f"  envpool CPU per env step: {_us_per_step(envs['envpool_cores'], rate)} "
        f"(raw {_us_per_step(raw.get('envpool_cores'), raw['env_steps_per_second'])}); "
        f"cores: envpool {_cores(envs['envpool_cores'])}, the members' stepping threads {_cores(envs['stepping_cores'])}",
    ]
    return "\n".join(lines)


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
