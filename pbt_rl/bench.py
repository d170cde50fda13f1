"""``pbt-rl bench CONFIG``: raw envpool stepping vs. the whole population training, in one run.

Both numbers are measured in one invocation on the same machine, so their ratio is meaningful
even where absolute speeds vary between machines; and since a lent machine's own speed drifts over
minutes, raw stepping is measured before each population and again after it, and the population
is compared with the mean of the two, the drift between them printed beside its ratio
(:mod:`pbt_rl.bench_raw`):

(a) *raw*: envpool alone, random actions, the same env id and options, the same total number of
    envs (population_size x env.num_envs) and the same number of threads the population uses;
(b) *population*: ``pbt-rl train`` of the config into a temporary run directory (learners
    updating, PBT deciding, checkpoints and metrics written) until every member has started, then
    ``warmup + seconds`` more; the env-step rate is read back from the members' ``metrics.jsonl``
    over the window after the warm-up (:mod:`pbt_rl.bench_window`).

Units: env steps per second summed over all envs (Atari: x4 for frames per second).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from pbt_rl.bench_raw import RawBrackets, bench_raw_envpool, drift_note, raw_around
from pbt_rl.bench_window import WindowWatch, default_warmup, population_rate_from_metrics
from pbt_rl.config import ExperimentConfig, from_dict, to_dict
from pbt_rl.machine_use import ENVPOOL, MachineSampler, members_cores
from pbt_rl.runtime.store import RunStore


def bench_population(config: ExperimentConfig, seconds: float = 60.0, warmup_seconds: float | None = None,
                     variants: tuple[tuple[str, ExperimentConfig], ...] = (), repeats: int = 1,
                     say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure raw envpool and the population training; return both rates and their ratio.

    ``variants`` (``(label, config)`` pairs, e.g. ``run.backend=ray`` or ``run.cuda_mps=off``, from
    :func:`variant_configs`): train each population in this order, raw envpool at its envs (the
    config's; a variant of ``env.async_batch_size`` at its own batching) measured before the
    first and after each (:class:`RawBrackets`); ``result["variants"]``
    holds each one's rate, ratio to the raw either side of it (``raw_around``) and hosts, and the
    top-level ``population`` / ``ratio`` are the first one's. Empty: ``config`` alone.

    ``repeats``: the whole sequence of populations that many times, in turn (A B A B ...), so
    that a difference between variants can be told from the machine's own drift;
    ``result["runs"]`` holds every run, ``result["repeated"]`` each variant's ratios and rates with
    their medians (:func:`repeat_summary`), and the top-level ``ratio`` is the first variant's median.

    ``say`` gets a progress line as each measurement ends (raw, then each population), so a
    bench cut short (a time limit on a lent machine) still shows what it measured.
    """
    warmup = warmup_seconds if warmup_seconds is not None else default_warmup(seconds)
    variants = tuple(variants) or (("", config),)
    batch_size = _env_batch(config)
    raws = RawBrackets(seconds=min(seconds, 20.0))
    raw = raws.before(config)
    say(f"measured: raw envpool {raw['env_steps_per_second']:,.0f} env steps/s")
    runs = []
    for repeat in range(1, repeats + 1):
        for label, variant in variants:
            before = raws.before(variant)
            run = train_for_bench(variant, seconds, warmup)
            around = raw_around(before, raws.after(variant))
            runs.append({"label": label, "repeat": repeat, **run,
                         "hosts": {**hosts_of(variant), "cuda_mps": run.get("cuda_mps", False)}, "raw_around": around,
                         "ratio": run["population"]["env_steps_per_second"] / around["env_steps_per_second"]})
            say(_progress_line(before, runs[-1], _env_batch(variant), repeats))
    first = runs[0]
    repeated = repeat_summary(runs) if repeats > 1 else None
    return {
        "env": config.env.id,
        "algo": config.agent.algo,
        "population_size": config.pbt.population_size,
        "num_envs_per_member": config.env.num_envs,
        "env_batch_size": batch_size,
        "hosts": first["hosts"],
        "raw": raw,
        "raw_rates": [measured["env_steps_per_second"] for measured in raws.measured],
        "raw_around": first["raw_around"],
        "population": first["population"],
        "ratio": repeated[0]["median_ratio"] if repeated else first["ratio"],
        "exploits": first["exploits"],
        "machine": first["machine"],
        "variants": runs[:len(variants)],
        "runs": runs,
        "repeated": repeated,
    }


def repeat_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant's runs together, in the order the variants first ran: their ratios and rates in
    run order, with the medians (a median, not a mean, so that one run on a drifting machine does
    not carry the row) and the hosts of its first run."""
    labels = list(dict.fromkeys(run["label"] for run in runs))
    summary = []
    for label in labels:
        mine = [run for run in runs if run["label"] == label]
        ratios = [run["ratio"] for run in mine]
        rates = [run["population"]["env_steps_per_second"] for run in mine]
        summary.append({"label": label, "hosts": mine[0].get("hosts"), "ratios": ratios, "rates": rates,
                        "median_ratio": statistics.median(ratios), "median_rate": statistics.median(rates)})
    return summary


def variant_configs(config: ExperimentConfig, overrides: list[list[str]]) -> tuple[tuple[str, ExperimentConfig], ...]:
    """``config`` with each list of overrides applied in turn, labelled by them: the populations a
    bench trains against raw envpool at the config's envs. A variant may change how the population
    trains (backend, hosts, sharing, MPS, agent settings, the members' env threads
    ``env.num_threads``, and how a member batches its envs, ``env.async_batch_size``: raw envpool
    is then measured at that batching too) but not which envs and how many, nor the threads.

    Raises ConfigError for an override that does not apply, or one that changes the envs, the
    population size or the threads.
    """
    from pbt_rl.config import ConfigError, apply_overrides

    base = to_dict(config)
    variants = []
    for texts in overrides:
        label = " ".join(texts)
        try:
            variant = from_dict(apply_overrides(base, texts))  # a copy: base stays as it is
        except ConfigError as exc:
            raise ConfigError(f"--variant {label!r}: {exc}") from None
        raw = to_dict(variant)
        # env.num_threads is the members' envpool threads (raw envpool always runs one per core);
        # env.async_batch_size is how the same envs are batched (raw envpool batches them alike).
        fixed = ([("env", key) for key in base["env"] if key not in ("num_threads", "async_batch_size")]
                 + [("pbt", "population_size"), ("run", "total_threads")])
        changed = [f"{section}.{key}" for section, key in fixed if raw[section][key] != base[section][key]]
        if changed:
            raise ConfigError(f"--variant {label!r} changes {changed[0]}: raw envpool is measured at the config's "
                              "own envs and threads, so every variant keeps the envs, the population size and the threads")
        variants.append((label, variant))
    return tuple(variants)


def train_for_bench(config: ExperimentConfig, seconds: float, warmup: float) -> dict[str, Any]:
    """The population trained (on its ``run.backend``) into a temporary run directory, for
    ``seconds`` after start-up and warm-up: its rate from the metrics
    (:func:`population_rate_from_metrics`), and whether its backend started a CUDA MPS daemon
    for its hosts (runtime/mps.py)."""
    from pbt_rl.runtime import train
    from pbt_rl.runtime.backend import make_backend

    # Members need a while to start (processes, torch, CUDA, envs); the window begins after that.
    # The run stops once its window is measured (WindowWatch); the wall-time limit is a ceiling.
    startup_allowance = max(120.0, 2.0 * config.pbt.population_size)
    with tempfile.TemporaryDirectory(prefix="pbt-rl-bench-") as tmp:
        raw_cfg = to_dict(config)
        raw_cfg["run"].update(dir=str(Path(tmp) / "run"), max_wall_seconds=startup_allowance + warmup + seconds,
                              total_env_steps=10**12)
        raw_cfg["logging"].update(report=False, wandb="disabled", tensorboard=False)
        bench_config = from_dict(raw_cfg)
        backend = make_backend(bench_config.run.backend, bench_config)  # its MPS daemon, if any, is the row's
        try:
            with MachineSampler() as sampler, WindowWatch(bench_config.run_dir, config.pbt.population_size, warmup,
                                                         seconds) as watch:
                train(bench_config, console=False, backend=backend, stop=watch.stop)
        finally:
            backend.close()  # idempotent (the run closes it too)
        population = population_rate_from_metrics(bench_config.run_dir, warmup_seconds=warmup)
        # The run's wall clock starts as the sampler's does (give or take the run directory's
        # creation): machine use over the same window as the rate.
        machine = sampler.summary(population["window_start_seconds"], population["window_end_seconds"])
        exploits = len(RunStore(bench_config.run_dir).read_lineage())
    return {"population": population, "exploits": exploits, "cuda_mps": getattr(backend, "mps", None) is not None,
            "machine": {**machine, "cpu_count": os.cpu_count()}, "stopped_when_measured": watch.stop.is_set()}


def format_population_bench(result: dict[str, Any]) -> str:
    raw, pop, machine = result["raw"], result["population"], result["machine"]
    gpu = (
        f"GPU util {machine['gpu_utilization_percent']:.0f}%, max memory {machine['gpu_memory_mib_max']:.0f} MiB"
        if machine.get("gpu_utilization_percent") is not None else "GPU: none seen"
    )
    cpu = f"CPU busy {100 * machine['cpu_busy_fraction']:.0f}% of {machine['cpu_count']} cores" if machine.get("cpu_busy_fraction") is not None else "CPU: n/a"
    return "\n".join([
        f"{result['env']}  {result['algo']}  population {result['population_size']} x {result['num_envs_per_member']} envs"
        + _format_hosts(result.get("hosts")),
        f"raw envpool ({raw['mode']}, {raw['total_envs']} envs, batch {raw['batch_size']}, {raw['threads']} threads): "
        f"{raw['env_steps_per_second']:,.0f} env steps/s" + _format_raw_after(result.get("raw_around")),
        f"population training ({pop['members']} members, {pop['window_seconds']:.0f} s window): "
        f"{pop['env_steps_per_second']:,.0f} env steps/s" + _format_startup(pop) + _format_memory(machine),
        f"ratio population / raw: {result['ratio']:.3f}{_ratio_note(result)}"
        f"   exploits during the run: {result['exploits']}",
        *([_format_fractions(result["algo"], pop["time_fractions"])] if pop.get("time_fractions") else []),
        f"{cpu}; {gpu}",
        *_format_thread_cores(raw, pop, machine, result.get("env_batch_size")),
        *(_format_repeats(result) if result.get("repeated") else _format_variants(result)),  # after the first's lines
        "json: " + json.dumps(result, default=float),
    ])


def hosts_of(config: ExperimentConfig) -> dict[str, Any]:
    """How the bench's population shares host processes: members per host and ``run.host_sharing``."""
    from pbt_rl.runtime.resources import hosts_layout

    per_host, hosts = hosts_layout(config)
    return {"members_per_host": per_host, "hosts": hosts, "sharing": config.run.host_sharing}


def _format_hosts(hosts: dict[str, Any] | None) -> str:
    mps = ", CUDA MPS" if hosts and hosts.get("cuda_mps") else ""
    if not hosts or hosts["members_per_host"] == 1:
        return "" if not hosts else f", a process each{mps}"
    hosts_word = "host" if hosts["hosts"] == 1 else "hosts"
    return f", {hosts['hosts']} {hosts_word} of {hosts['members_per_host']} ({hosts['sharing']}{mps})"


def _format_startup(population: dict[str, Any]) -> str:
    seconds = population.get("startup_seconds")
    return "" if seconds is None else f"; every member training {seconds:.0f} s after the run's start"


def _format_raw_after(around: dict[str, float] | None) -> str:
    """After the raw rate before the (first) population: the one after it, which the ratio's mean takes in."""
    return "" if around is None else f" before the population, {around['after']:,.0f} after (the ratio is to their mean)"


def _format_memory(machine: dict[str, Any]) -> str:
    memory = machine.get("resident_mib_max")
    return "" if memory is None else f"; resident memory at most {memory:,.0f} MiB (controller and hosts, summed)"


def _env_batch(config: ExperimentConfig) -> int:
    """Envs a member acts on per policy step: its async batch, or all its envs."""
    return config.env.async_batch_size or config.env.num_envs


def _format_thread_cores(raw: dict[str, Any], population: dict[str, Any], machine: dict[str, Any],
                         batch_size: int | None = None) -> list[str]:
    """Where the cores went by OS thread name (machine_use), envpool's CPU time per env step in
    the population against raw stepping (the same work: more means envpool itself ran slower),
    and the members' own threads' CPU per env batch of ``batch_size`` (the per-step cost that
    raw stepping does not pay; for A2C it includes the updates, made by the same thread)."""
    cores = machine.get("cores_by_thread")
    if not cores:
        return []
    shown = [f"{name} {value:.2f}" for name, value in cores.items() if value >= 0.05]
    lines = [f"cores by thread over the window: {', '.join(shown) or 'none above 0.05'} (total {sum(cores.values()):.1f})"]
    if raw.get("envpool_cores") and cores.get(ENVPOOL):
        per_step = [1e6 * c / r for c, r in ((raw["envpool_cores"], raw["env_steps_per_second"]),
                                              (cores[ENVPOOL], population["env_steps_per_second"]))]
        lines.append(f"envpool CPU per env step: raw {per_step[0]:.0f} us, population {per_step[1]:.0f} us")
    members = members_cores(cores)
    if batch_size and members and population.get("env_steps_per_second"):
        per_batch = 1e6 * members * batch_size / population["env_steps_per_second"]
        lines.append(f"members' threads CPU per env batch of {batch_size}: {per_batch:,.0f} us")
    return lines


def _progress_line(raw: dict[str, Any], run: dict[str, Any], batch_size: int, repeats: int = 1) -> str:
    """One measured population as soon as it ends: its rate and ratio, and where the cores went."""
    population = run["population"]
    cores = _format_thread_cores(raw, population, run["machine"], batch_size)
    which = _named(run["label"]) + (f" (run {run['repeat']} of {repeats})" if repeats > 1 else "")
    return (f"measured: {which}: {population['env_steps_per_second']:,.0f} env steps/s, "
            f"ratio to raw {run['ratio']:.3f}{drift_note(run.get('raw_around'))}" + "".join(f"; {line}" for line in cores))


def _named(label: str) -> str:
    """A population's name in the bench's lines: its variant's overrides, or 'the population'."""
    return label or "the population"


def _ratio_note(result: dict[str, Any]) -> str:
    """After the headline ratio: the first run's raw drift, or with repeats the range it is the median of."""
    repeated = result.get("repeated")
    if not repeated:
        return drift_note(result.get("raw_around"))
    ratios = repeated[0]["ratios"]
    return f" (median of {len(ratios)} runs: {min(ratios):.3f} to {max(ratios):.3f})"


def _format_repeats(result: dict[str, Any]) -> list[str]:
    """With repeats: which run the lines above are, then each variant's median ratio, its range and
    its median rate, and the median rate over the first variant's."""
    repeated = result["repeated"]
    first = repeated[0]
    lines = [f"(the lines above: the first run of {_named(first['label'])}; each population ran "
             f"{len(first['ratios'])} times in turn, raw envpool before and after each run)"]
    for entry in repeated:
        ratios = ", ".join(f"{ratio:.3f}" for ratio in entry["ratios"])
        lines.append(f"{_named(entry['label'])}{_format_hosts(entry.get('hosts'))}: median ratio "
                     f"{entry['median_ratio']:.3f} (runs: {ratios}), median {entry['median_rate']:,.0f} env steps/s, "
                     f"over the first's median: {entry['median_rate'] / first['median_rate']:.3f}")
    return lines


def _format_variants(result: dict[str, Any]) -> list[str]:
    """With several variants: which one the lines above are, then one line per other variant with
    its hosts, rate and ratio, and its rate over the first's."""
    variants = result.get("variants", [])
    if len(variants) < 2:
        return []
    first = variants[0]
    lines = [f"(the lines above: {first['label']})"]
    for other in variants[1:]:
        rate = other["population"]["env_steps_per_second"]
        lines.append(f"{other['label']}{_format_hosts(other.get('hosts'))}: {rate:,.0f} env steps/s "
                     f"({other['population']['window_seconds']:.0f} s window), ratio to raw {other['ratio']:.3f}"
                     f"{drift_note(other.get('raw_around'))}, "
                     f"over the first: {rate / first['population']['env_steps_per_second']:.3f}")
    return lines


def _format_fractions(algo: str, fractions: dict[str, float]) -> str:
    """One line: where a member's time goes, as percentages of its wall time in training."""
    pct = {key: 100 * value for key, value in fractions.items()}
    acting = (f"acting {pct.get('act', 0):.0f}% (env wait {pct.get('env', 0):.0f}%, "
              f"inference {pct.get('inference', 0):.0f}%)")
    if algo == "impala":  # actor and learner are parallel threads: fractions of the same wall time
        return f"member time: actor thread {acting}; learner thread updating {pct.get('update', 0):.0f}%"
    other = max(0.0, 100 - pct.get("act", 0) - pct.get("update", 0))
    return f"member time: {acting}, updating {pct.get('update', 0):.0f}%, other {other:.0f}%"


__all__ = ["bench_population", "bench_raw_envpool", "format_population_bench", "population_rate_from_metrics"]
