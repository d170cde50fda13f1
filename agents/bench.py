"""Throughput of one learner (``pbt-rl bench agent CONFIG``): env steps/s and learner samples/s.

After a warm-up (a few updates: allocations, first-call overheads, CUDA kernel selection), the
learner trains in short ``Learner.train`` calls until ``seconds`` of wall
time have passed. Reported rates:

- ``env_steps_per_second``: env steps / wall seconds, the rate a PBT member trains at;
- ``acting_env_steps_per_second``: env steps / seconds spent acting (policy inference and env
  stepping; for IMPALA the actor thread's busy time);
- ``learner_samples_per_second``: gradient steps x samples per step (``T x B`` / minibatches) /
  seconds spent in updates (forward, backward, optimiser step; for IMPALA also publishing the weights);
- ``learner_samples_per_second_wall``: the same samples / wall seconds;
- ``acting_cpu_us_per_policy_step``: the acting thread's CPU time per policy step (one env
  batch), and ``inference_cpu_us_per_policy_step`` the part of it in the policy step (copy in,
  forward pass, sampling, copy out): the per-batch cost a population pays per member, whatever
  the batch size (docs/design.md, "Where the cores go").

For A2C acting and learning alternate, so wall time ~ acting + updating; for IMPALA they overlap.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pbt_rl.config import ExperimentConfig

_CALL_SECONDS = 0.5  # length of one train() call while measuring
_WARMUP_UPDATES = 3


def bench_agent(config: ExperimentConfig, seconds: float, device: str | None = None) -> dict[str, Any]:
    """Measure one learner built from ``config`` (seed ``run.seed``) for ``seconds`` after a warm-up."""
    from pbt_rl.agents import make_learner
    from pbt_rl.runtime.host import configure_process

    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    agent, env, run = config.agent, config.env, config.run
    # The whole machine is this one learner's: env threads (env.num_threads or all cores), and
    # on CPU as many torch threads (configure_process decides).
    threads = env.num_threads or os.cpu_count() or 1
    configure_process(device if device is not None else agent.device, num_threads=threads,
                      torch_threads=run.torch_threads, gpu_wait=run.gpu_wait)
    learner = make_learner(config, seed=run.seed, device=device, num_threads=threads)
    try:
        unrolls_per_update = agent.learner_batch_unrolls if agent.algo == "impala" else 1
        batch_envs = env.async_batch_size or env.num_envs
        steps_per_update = agent.unroll_length * batch_envs * unrolls_per_update
        warm_started = time.perf_counter()
        learner.train(learner.env_steps + _WARMUP_UPDATES * steps_per_update)
        warm_rate = learner.env_steps / max(time.perf_counter() - warm_started, 1e-6)
        call_steps = max(steps_per_update, int(warm_rate * _CALL_SECONDS))

        env_steps = updates = policy_steps = 0
        act_seconds = update_seconds = act_cpu_seconds = inference_cpu_seconds = 0.0
        lags: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            report = learner.train(learner.env_steps + call_steps)
            env_steps += report.extra["env_steps_in_call"]
            updates += report.updates
            act_seconds += report.extra["act_seconds"]
            update_seconds += report.extra["update_seconds"]
            act_cpu_seconds += report.extra["act_cpu_seconds"]
            inference_cpu_seconds += report.extra["inference_cpu_seconds"]
            policy_steps += report.extra["policy_steps"]
            if report.updates and "policy_lag" in report.extra:
                lags.append(report.extra["policy_lag"])
        wall = time.perf_counter() - started
        # Samples the learner processed: each gradient step takes one minibatch of the batch.
        samples = updates * steps_per_update / min(agent.num_minibatches, batch_envs * unrolls_per_update)
        return {
            "algo": agent.algo,
            "env_id": env.id,
            "network": agent.network,
            "device": str(learner.device),
            "num_envs": env.num_envs,
            "async_batch_size": env.async_batch_size,
            "unroll_length": agent.unroll_length,
            "samples_per_update": steps_per_update,
            "seconds": wall,
            "env_steps": env_steps,
            "updates": updates,
            "env_steps_per_second": env_steps / wall,
            "acting_env_steps_per_second": env_steps / act_seconds if act_seconds else float("nan"),
            "learner_samples_per_second": samples / update_seconds if update_seconds else float("nan"),
            "learner_samples_per_second_wall": samples / wall,
            "policy_lag": sum(lags) / len(lags) if lags else None,
            "policy_steps": policy_steps,
            # The acting thread's CPU per policy step (one env batch), and the part in the policy
            # step itself (observations in, forward pass, sampling, actions out): per-step cost
            # that a population pays once per member per batch.
            "acting_cpu_us_per_policy_step": 1e6 * act_cpu_seconds / policy_steps if policy_steps else None,
            "inference_cpu_us_per_policy_step": 1e6 * inference_cpu_seconds / policy_steps if policy_steps else None,
        }
    finally:
        learner.close()


def format_bench(result: dict[str, Any]) -> str:
    """A few aligned lines for the console."""
    envs = f"{result['num_envs']} envs" + (f", async batch {result['async_batch_size']}" if result["async_batch_size"] else "")
    lines = [
        f"{result['algo']} on {result['env_id']} ({envs}, network {result['network']}, device {result['device']})",
        f"  measured          {result['seconds']:.1f} s, {result['env_steps']:,} env steps, {result['updates']:,} updates "
        f"of {result['samples_per_update']:,} samples (unroll {result['unroll_length']})",
        f"  env steps/s       {result['env_steps_per_second']:,.0f} (wall)   "
        f"{result['acting_env_steps_per_second']:,.0f} (while acting)",
        f"  learner samples/s {result['learner_samples_per_second_wall']:,.0f} (wall)   "
        f"{result['learner_samples_per_second']:,.0f} (while updating)",
    ]
    if result.get("acting_cpu_us_per_policy_step") is not None:
        acting, inference = result["acting_cpu_us_per_policy_step"], result["inference_cpu_us_per_policy_step"]
        lines.append(f"  acting CPU        {acting:,.0f} us per policy step of the acting thread: "
                     f"{inference:,.0f} in the policy step, {acting - inference:,.0f} the rest (env, bookkeeping)")
    if result.get("policy_lag") is not None:
        lines.append(f"  policy lag        {result['policy_lag']:.2f} updates")
    return "\n".join(lines)
