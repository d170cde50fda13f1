"""Scaling tables of ``pbt-rl bench``: one machine's envs split among more members
(``--populations 8,16,32,64``), and a population over more of the machine's GPUs (``--gpus 1,2,4``).

``--populations``:

The config's total env count (``population_size x env.num_envs``) is kept and divided among each
population size in turn (each member's async groups kept while a group holds at least
``MIN_ASYNC_BATCH`` envs, fewer and larger batches below that: :func:`config_at_population`), so
raw envpool stepping (at the config's own batching) is the same work for every size: it is
measured at those envs and threads before the first size and again after each, and each size is
compared with the mean of the two raw measurements either side of it
(:class:`pbt_rl.bench_raw.RawBrackets`: a lent machine's speed drifts over minutes). Each size
trains as in :func:`pbt_rl.bench.bench_population` (a temporary run directory, metrics read back)
and reports its env-step rate, the raw rates around it, the ratio, its members per host process
and how long after its start every member was training. With variants (``--variant``,
:func:`pbt_rl.bench.variant_configs`: e.g. one synchronous batch per member,
``env.async_batch_size=0``), each size trains as divided and then as each variant of it, in turn,
so that they meet the same machine; a variant's raw envpool is the config's with its overrides.

``--gpus``: the config is one GPU's worth (its population, envs and each member's settings); on
``g`` GPUs the population is ``g`` times as large, on the first ``g`` GPUs (``run.gpus``), with
``g / N`` of the cores (``run.total_threads``; N = the GPUs visible). Raw envpool is measured at
each size's envs and threads before and after it, so each row has its own ratio, and env steps per second per core
shows how the rate scales from one GPU to N.

Units: env steps per second summed over all envs (Atari: x4 for frames per second).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from pbt_rl.config import ConfigError, ExperimentConfig
from pbt_rl.machine_use import ENVPOOL, members_cores
from pbt_rl.runtime.resources import hosts_layout, machine_threads, too_few_gpus


# A member's async batch below this many envs costs more per env step than its overlap saves
# (Pong IMPALA, 64 x 16 on 16 cores: two groups of 8 at 0.69-0.77 of raw envpool, one synchronous
# batch of 16 at 0.90-0.93; docs/design.md, "Batches per member").
MIN_ASYNC_BATCH = 16


def member_groups(num_envs: int, groups: int, batch_floor: int) -> int:
    """How many async groups a member with ``num_envs`` envs steps: the most, up to ``groups``,
    that divide its envs into batches of at least ``batch_floor`` envs (1: one synchronous batch)."""
    return next(g for g in range(groups, 0, -1) if g == 1 or (num_envs % g == 0 and num_envs // g >= batch_floor))


def config_at_population(config: ExperimentConfig, population: int) -> ExperimentConfig:
    """``config`` with its total envs divided among ``population`` members.

    Each member keeps the config's async groups while a group holds at least ``MIN_ASYNC_BATCH``
    envs (or the config's own batch, where that is smaller); below that it steps fewer, larger
    batches, down to one synchronous batch. Raises ConfigError when the envs do not divide evenly.
    """
    env = config.env
    total = config.pbt.population_size * env.num_envs
    if population < 1 or total % population:
        raise ConfigError(f"--populations: {population} members cannot share the config's {total} envs "
                          f"evenly; pick sizes dividing {total}")
    num_envs = total // population
    groups = 1
    if env.async_batch_size:
        groups = member_groups(num_envs, env.num_envs // env.async_batch_size,
                               min(MIN_ASYNC_BATCH, env.async_batch_size))
    new_env = dataclasses.replace(env, num_envs=num_envs, async_batch_size=num_envs // groups if groups > 1 else 0)
    new_pbt = dataclasses.replace(config.pbt, population_size=population)
    return dataclasses.replace(config, env=new_env, pbt=new_pbt)


def bench_scaling(config: ExperimentConfig, populations: tuple[int, ...], seconds: float,
                  say: Callable[[str], None] = lambda line: None,
                  variants: tuple[list[str], ...] = ()) -> dict[str, Any]:
    """The population trained at each size, raw envpool (at the config's envs and threads, the
    same for every size) measured before the first and after each; rates, ratios, start-up.
    ``variants`` (lists of overrides): each size also trained with each, right after it.

    ``say`` gets the table's lines as they are measured (its header after the first raw
    measurement, then one row per size and variant), so a run cut short still shows the sizes it
    finished.
    """
    from pbt_rl.bench import variant_configs
    from pbt_rl.bench_raw import RawBrackets

    raw_variants = variant_configs(config, list(variants))  # every check first: the overrides, then the sizes
    runs = []
    for size in populations:
        sized = config_at_population(config, size)
        runs.append(("", sized, config))
        runs.extend((label, variant, raw_at) for (label, variant), (_, raw_at)
                    in zip(variant_configs(sized, list(variants)), raw_variants))
    raws = RawBrackets(seconds=min(seconds, 20.0))
    result = {"env": config.env.id, "algo": config.agent.algo, "sharing": config.run.host_sharing,
              "raw": raws.before(config), "sizes": []}
    for line in header_lines(result):
        say(line)
    result["sizes"] = _measured_rows(runs, seconds, lambda row: say(row_line(row)), raws)
    result["raw_rates"] = [measured["env_steps_per_second"] for measured in raws.measured]
    return result


def _measured_rows(runs: list[tuple[str, ExperimentConfig, ExperimentConfig | None]], seconds: float,
                   said: Callable[[dict], None], raws: Any) -> list[dict[str, Any]]:
    """Each run's population (``(label, config, raw config)``) trained in turn between two raw
    measurements (``raws``, a :class:`~pbt_rl.bench_raw.RawBrackets`) at its raw config, or at the
    row's own envs and threads where that is None (then kept in the row): a row each, with its
    ratio to their mean, handed to ``said`` as it is measured."""
    from pbt_rl.bench import train_for_bench
    from pbt_rl.bench_raw import raw_around
    from pbt_rl.bench_window import default_warmup

    warmup, rows = default_warmup(seconds), []
    for label, sized, raw_config in runs:
        at = raw_config or sized
        before = raws.before(at)
        run = train_for_bench(sized, seconds, warmup)
        around = raw_around(before, raws.after(at))
        rate = run["population"]["env_steps_per_second"]
        row = {"label": label, "gpus": sized.run.gpus, "population_size": sized.pbt.population_size,
               "num_envs_per_member": sized.env.num_envs, "members_per_host": hosts_layout(sized)[0],
               "threads": sized.run.total_threads, "ratio": rate / around["env_steps_per_second"],
               "raw_around": around, "per_core": rate / machine_threads(sized.run.total_threads), **run}
        if raw_config is None:
            row["raw"] = before
        rows.append(row)
        said(row)
    return rows


def header_lines(result: dict[str, Any]) -> list[str]:
    raw = result["raw"]
    return [
        f"{result['env']}  {result['algo']}  population scaling at {raw['total_envs']} envs in all"
        f" (run.host_sharing: {result.get('sharing', 'turns')})",
        f"raw envpool ({raw['mode']}, {raw['total_envs']} envs, batch {raw['batch_size']}, {raw['threads']} threads): "
        f"{raw['env_steps_per_second']:,.0f} env steps/s before the first size, and measured again after each",
        "| population x envs | members per host | population env steps/s | raw before / after | ratio (to their mean) | "
        "all members training after | resident memory (MiB) | cores: envpool / members' threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]


def row_line(row: dict[str, Any]) -> str:
    pop, memory = row["population"], row["machine"].get("resident_mib_max")
    variant = f", {row['label']}" if row.get("label") else ""
    return (f"| {row['population_size']} x {row['num_envs_per_member']}{variant} | {_per_host(row)} | "
            f"{pop['env_steps_per_second']:,.0f} | {_raws(row)} | {row['ratio']:.3f} | {pop['startup_seconds']:.0f} s | "
            f"{'-' if memory is None else f'{memory:,.0f}'} | {_cores(row)} |")


def _raws(row: dict[str, Any]) -> str:
    """The raw rates measured either side of the row's population."""
    around = row["raw_around"]
    return f"{around['before']:,.0f} / {around['after']:,.0f}"


def _cores(row: dict[str, Any]) -> str:
    """Cores of envpool's workers and of the members' own threads (actors, member threads) over
    the row's window (machine_use's thread names), or '-' where they were not read."""
    cores = row["machine"].get("cores_by_thread")
    if not cores:
        return "-"
    return f"{cores.get(ENVPOOL, 0.0):.1f} / {members_cores(cores):.1f}"


def _per_host(row: dict[str, Any]) -> str:
    """Members per host, and ', MPS' when the row's hosts shared the GPU through a CUDA MPS daemon."""
    return f"{row['members_per_host']}{', MPS' if row.get('cuda_mps') else ''}"


def format_scaling(result: dict[str, Any]) -> str:
    """The whole table and the result as one json line."""
    lines = [*header_lines(result), *(row_line(row) for row in result["sizes"])]
    return "\n".join([*lines, "json: " + json.dumps(result, default=float)])


def config_at_gpus(config: ExperimentConfig, gpus: int, visible: int) -> ExperimentConfig:
    """``config`` (one GPU's population) on the first ``gpus`` of ``visible`` GPUs, with that share
    of the cores. Raises ConfigError when there are not that many GPUs."""
    if not 1 <= gpus <= visible:
        raise too_few_gpus("--gpus", gpus, visible)
    if config.agent.device == "cpu":
        raise ConfigError("--gpus: agent.device is 'cpu'; the GPU scaling table needs GPU members")
    threads = max(1, machine_threads(config.run.total_threads) * gpus // visible)
    return dataclasses.replace(
        config,
        pbt=dataclasses.replace(config.pbt, population_size=config.pbt.population_size * gpus),
        run=dataclasses.replace(config.run, gpus=gpus, total_threads=threads),
    )


def bench_gpu_scaling(config: ExperimentConfig, gpu_counts: tuple[int, ...], seconds: float, visible: int,
                      say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """At each GPU count the population, between two raw envpool measurements at that size's envs
    and threads; a row each, said as it is measured."""
    from pbt_rl.bench_raw import RawBrackets

    configs = [config_at_gpus(config, gpus, visible) for gpus in gpu_counts]  # every check first
    result = {"env": config.env.id, "algo": config.agent.algo, "visible_gpus": visible, "rows": []}
    for line in gpu_header_lines(result):
        say(line)
    result["rows"] = _measured_rows([("", sized, None) for sized in configs], seconds,
                                    lambda row: say(gpu_row_line(row)), RawBrackets(seconds=min(seconds, 20.0)))
    return result


def gpu_header_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"{result['env']}  {result['algo']}  GPU scaling ({result['visible_gpus']} GPUs visible)",
        "| GPUs | population x envs | threads | raw envpool before / after | population env steps/s | ratio | "
        "env steps/s per core | all members training after | GPU busy (mean over all GPUs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]


def gpu_row_line(row: dict[str, Any]) -> str:
    pop, busy = row["population"], row["machine"].get("gpu_utilization_percent")
    return (f"| {row['gpus']} | {row['population_size']} x {row['num_envs_per_member']} | {row['threads']} | "
            f"{_raws(row)} | {pop['env_steps_per_second']:,.0f} | {row['ratio']:.3f} | "
            f"{row['per_core']:,.0f} | {pop['startup_seconds']:.0f} s | {'-' if busy is None else f'{busy:.0f}%'} |")


__all__ = ["bench_gpu_scaling", "bench_scaling", "config_at_gpus", "config_at_population", "format_scaling"]
