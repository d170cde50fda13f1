"""``pbt-rl bench CONFIG --populations 8,16,32,64``: one machine's envs split among more members.

The config's total env count (``population_size x env.num_envs``) is kept and divided among each
population size in turn (each member's async groups kept: ``num_envs / async_batch_size`` is the
same), so raw envpool stepping is measured once, at those envs and threads, and every population
size is compared with that one number. Each size trains as in :func:`pbt_rl.bench.bench_population`
(a temporary run directory, metrics read back) and reports its env-step rate, the ratio to raw,
its members per host process and how long after its start every member was training.

Units: env steps per second summed over all envs (Atari: x4 for frames per second).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from pbt_rl.config import ConfigError, ExperimentConfig
from pbt_rl.runtime.resources import hosts_layout


def config_at_population(config: ExperimentConfig, population: int) -> ExperimentConfig:
    """``config`` with its total envs divided among ``population`` members, groups kept.

    Raises ConfigError when the envs (or one member's groups) do not divide evenly.
    """
    env = config.env
    total = config.pbt.population_size * env.num_envs
    groups = env.num_envs // env.async_batch_size if env.async_batch_size else 1
    if population < 1 or total % population or (total // population) % groups:
        raise ConfigError(f"--populations: {population} members cannot share the config's {total} envs "
                          f"({groups} async group(s) per member) evenly; pick sizes dividing {total // groups}")
    num_envs = total // population
    new_env = dataclasses.replace(env, num_envs=num_envs,
                                  async_batch_size=num_envs // groups if env.async_batch_size else 0)
    new_pbt = dataclasses.replace(config.pbt, population_size=population)
    return dataclasses.replace(config, env=new_env, pbt=new_pbt)


def bench_scaling(config: ExperimentConfig, populations: tuple[int, ...], seconds: float,
                  say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Raw envpool once, then the population trained at each size; rates, ratios, start-up.

    ``say`` gets the table's lines as they are measured (its header after the raw measurement,
    then one row per size), so a run cut short still shows the sizes it finished.
    """
    from pbt_rl.bench import bench_raw_envpool, default_warmup, train_for_bench

    configs = [config_at_population(config, size) for size in populations]  # every check first
    raw = bench_raw_envpool(config, seconds=min(seconds, 20.0))
    result = {"env": config.env.id, "algo": config.agent.algo, "raw": raw, "sizes": []}
    for line in header_lines(result):
        say(line)
    warmup = default_warmup(seconds)
    for size, sized in zip(populations, configs):
        run = train_for_bench(sized, sized.run.backend, seconds, warmup)
        rate = run["population"]["env_steps_per_second"]
        row = {"population_size": size, "num_envs_per_member": sized.env.num_envs,
               "members_per_host": hosts_layout(sized)[0], "ratio": rate / raw["env_steps_per_second"], **run}
        result["sizes"].append(row)
        say(row_line(row))
    return result


def header_lines(result: dict[str, Any]) -> list[str]:
    raw = result["raw"]
    return [
        f"{result['env']}  {result['algo']}  population scaling at {raw['total_envs']} envs in all",
        f"raw envpool ({raw['mode']}, {raw['total_envs']} envs, batch {raw['batch_size']}, {raw['threads']} threads): "
        f"{raw['env_steps_per_second']:,.0f} env steps/s",
        "| population x envs | members per host | population env steps/s | ratio | all members training after | "
        "resident memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]


def row_line(row: dict[str, Any]) -> str:
    pop, memory = row["population"], row["machine"].get("resident_mib_max")
    return (f"| {row['population_size']} x {row['num_envs_per_member']} | {row['members_per_host']} | "
            f"{pop['env_steps_per_second']:,.0f} | {row['ratio']:.3f} | {pop['startup_seconds']:.0f} s | "
            f"{'-' if memory is None else f'{memory:,.0f}'} |")


def format_scaling(result: dict[str, Any]) -> str:
    """The whole table and the result as one json line."""
    lines = [*header_lines(result), *(row_line(row) for row in result["sizes"])]
    return "\n".join([*lines, "json: " + json.dumps(result, default=float)])


__all__ = ["bench_scaling", "config_at_population", "format_scaling"]
