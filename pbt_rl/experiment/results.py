"""results.json and results.md of an experiment: what a paper would print, from the runs' rows.

Per arm and seed (one run): the best member's final fitness (the best-member rule of
runtime/summary.py over each member's last reported fitness), the median of the members' final
fitness, the env steps spent (summed over members) and, per score threshold, the first metrics
row of any member at or above it (that member's own env steps, and wall seconds since the run
started; ``lineage.first_time_reaching``). Per arm: the mean over seeds with a 95% bootstrap
confidence interval (``scipy.stats.bootstrap``, percentile method, 2000 resamples, a generator
seeded with :data:`BOOTSTRAP_SEED`: the same runs give the same interval). The compared arm
(``compare`` in the spec, default ``pbt``) against each other arm: Welch's t-test
(``scipy.stats.ttest_ind(equal_var=False)``) and the Mann-Whitney U test
(``scipy.stats.mannwhitneyu``), both two-sided, on the best final fitness per seed. A statistic
that needs more runs than there are (a CI needs two seeds; a test two per arm) is null.

Runs are read through :class:`~pbt_rl.runtime.store.RunStore` only; missing runs are listed as
such and left out of the statistics. The replay arm's rows (``replay``, marked
``one_member_budget``) come from :func:`pbt_rl.experiment.replay_arm.replay_result`.
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pbt_rl.experiment.spec import REPLAY_ARM, ExperimentSpec, RunPlan, budget
from pbt_rl.lineage import best_member, final_fitness, first_time_reaching, member_env_steps
from pbt_rl.runtime.file_io import atomic_write_bytes, atomic_write_json
from pbt_rl.runtime.run_format import RunSnapshot
from pbt_rl.runtime.store import RunStore

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 2000
CURVE_POINTS = 50


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def best_fitness_curve(run: RunSnapshot, grid: Sequence[int]) -> list[float | None]:
    """At each env-step point g (a member's own env steps), the best of the members' latest
    reported fitness at <= g (None before any member has one)."""
    rows = {m: [(r.env_steps, r.fitness) for r in rs if r.fitness is not None] for m, rs in run.metrics.items()}
    curve = []
    for g in grid:
        latest = [next((f for s, f in reversed(points) if s <= g), None) for points in rows.values()]
        scored = [f for f in latest if f is not None and math.isfinite(f)]
        curve.append(max(scored) if scored else None)
    return curve


def curve_grid(plan: RunPlan) -> list[int]:
    steps = plan.config.run.total_env_steps
    return [round(steps * k / CURVE_POINTS) for k in range(1, CURVE_POINTS + 1)]


def run_result(plan: RunPlan, thresholds: Sequence[float]) -> dict:
    """One run's row of results.json (``{"status": "missing"}`` while it has no run directory)."""
    store = RunStore(plan.dir)
    if not store.config_path.is_file():
        return {"status": "missing"}
    run = store.snapshot()
    finals = [f for m in run.members if (f := _finite(final_fitness(run, m))) is not None]
    best = best_member(run)
    summary = run.summary or {}
    reached = {}
    for threshold in thresholds:
        first = first_time_reaching(run, threshold)
        reached[f"{threshold:g}"] = None if first is None else {
            "env_steps": first["env_steps"], "wall_seconds": first["wall_seconds"], "member": first["member"]}
    return {
        "status": summary.get("status", "in progress"),
        "best_member": best,
        "best_final_fitness": None if best is None else _finite(final_fitness(run, best)),
        "median_final_fitness": statistics.median(finals) if finals else None,
        "env_steps": sum(member_env_steps(run, m) for m in run.members),
        "wall_seconds": summary.get("wall_seconds"),
        "exploits": len(run.lineage),
        "thresholds": reached,
        "curve": {"env_steps": curve_grid(plan), "best_fitness": best_fitness_curve(run, curve_grid(plan))},
    }


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and 95% percentile-bootstrap interval (null bounds with fewer than two values)."""
    import scipy.stats

    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    out = {"n": int(data.size), "mean": float(data.mean()) if data.size else None, "ci_low": None, "ci_high": None}
    if data.size >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical values: a degenerate (zero-width) interval
            ci = scipy.stats.bootstrap((data,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                                       method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
        out["ci_low"], out["ci_high"] = _finite(ci.low), _finite(ci.high)
    return out


def compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided Welch t and Mann-Whitney U p-values of samples a vs b (null with < 2 each)."""
    import scipy.stats

    a = [v for v in a if v is not None]
    b = [v for v in b if v is not None]
    out = {"n": [len(a), len(b)], "mean_difference": (np.mean(a) - np.mean(b)) if a and b else None,
           "welch_t_p": None, "mann_whitney_u_p": None}
    if len(a) >= 2 and len(b) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant samples: t is undefined (NaN -> null)
            out["welch_t_p"] = _finite(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
            out["mann_whitney_u_p"] = _finite(scipy.stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    out["mean_difference"] = _finite(out["mean_difference"])
    return out


def collect(spec: ExperimentSpec) -> dict:
    """The whole results.json object."""
    runs = {arm: {f"seed_{p.seed}": run_result(p, spec.thresholds) for p in spec.runs_of(arm)} for arm in spec.arms}
    budgets = {arm: budget(spec.runs_of(arm)[0].config) for arm in spec.arms}
    if spec.replay is not None:
        from pbt_rl.experiment.replay_arm import replay_result, source_run

        source = source_run(spec)
        runs[REPLAY_ARM] = {f"seed_{m}": replay_result(spec, m, spec.thresholds, source) for m in spec.replay.seeds}
        budgets[REPLAY_ARM] = spec.runs_of(spec.replay.arm)[0].config.run.total_env_steps  # one member's
    arms = {}
    for arm, by_seed in runs.items():
        present = [r for r in by_seed.values() if r["status"] != "missing"]
        arms[arm] = {
            "runs": len(present),
            "budget_env_steps_per_run": budgets[arm],
            "one_member_budget": arm == REPLAY_ARM,
            "best_final_fitness": mean_ci([r["best_final_fitness"] for r in present]),
            "median_final_fitness": mean_ci([r["median_final_fitness"] for r in present]),
            "thresholds": {
                key: {"reached": sum(r["thresholds"][key] is not None for r in present),
                      "mean_env_steps": _mean([r["thresholds"][key]["env_steps"] for r in present if r["thresholds"][key]]),
                      "mean_wall_seconds": _mean([r["thresholds"][key]["wall_seconds"] for r in present if r["thresholds"][key]])}
                for key in (f"{t:g}" for t in spec.thresholds)
            },
        }
    best = {arm: [r.get("best_final_fitness") for r in by_seed.values()] for arm, by_seed in runs.items()}
    comparisons = {arm: compare(best[spec.compare], best[arm]) for arm in runs if arm != spec.compare}
    return {"experiment": spec.name, "spec": str(spec.path), "base": str(spec.base), "seeds": list(spec.seeds),
            "thresholds": list(spec.thresholds), "compare": spec.compare, "arms": arms, "comparisons": comparisons,
            "runs": runs}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]  # a replay's curve has no wall times
    return float(np.mean(values)) if values else None


def write_results(spec: ExperimentSpec) -> Path:
    """Write results.json, results.md and the figures at the experiment root; return results.json's path."""
    from pbt_rl.experiment.figures import write_figures

    root = spec.dir.absolute()
    root.mkdir(parents=True, exist_ok=True)
    results = collect(spec)
    results["figures"] = write_figures(spec, results, root)
    atomic_write_json(root / "results.json", results)
    atomic_write_bytes(root / "results.md", render_markdown(results).encode())
    return root / "results.json"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _ci(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["ci_low"] is None:
        return f"{_fmt(stat['mean'])} (n={stat['n']})"
    return f"{_fmt(stat['mean'])} [{_fmt(stat['ci_low'])}, {_fmt(stat['ci_high'])}]"


def render_markdown(results: dict) -> str:
    lines = [f"# Experiment {results['experiment']}", "",
             f"Spec `{results['spec']}`, base config `{results['base']}`, seeds {results['seeds']}. "
             "Means over seeds with 95% bootstrap confidence intervals (percentile, 2000 resamples). "
             "Every arm spends the same budget per run: population size x env steps per member.", "",
             "| arm | runs | env steps per run | best member's final fitness | population median |"
             + "".join(f" reached {t:g} (runs, mean env steps) |" for t in results["thresholds"]),
             "|---|---|---|---|---|" + "---|" * len(results["thresholds"])]
    for arm, stats in results["arms"].items():
        spent = f"{stats['budget_env_steps_per_run']:,}" + (" (one member's budget)" if stats["one_member_budget"] else "")
        cells = [arm, str(stats["runs"]), spent, _ci(stats["best_final_fitness"]),
                 _ci(stats["median_final_fitness"])]
        for key in (f"{t:g}" for t in results["thresholds"]):
            reached = stats["thresholds"][key]
            cells.append(f"{reached['reached']}/{stats['runs']}, {_fmt(reached['mean_env_steps'], 3)}")
        lines.append("| " + " | ".join(cells) + " |")
    if results["comparisons"]:
        lines += ["", f"{results['compare']} against each other arm (best member's final fitness per seed; "
                      "two-sided p-values):", "",
                  "| arm | mean difference | Welch's t p | Mann-Whitney U p |", "|---|---|---|---|"]
        for arm, c in results["comparisons"].items():
            lines.append(f"| {arm} | {_fmt(c['mean_difference'])} | {_fmt(c['welch_t_p'], 3)} | "
                         f"{_fmt(c['mann_whitney_u_p'], 3)} |")
    lines += ["", "Per run:", "", "| arm | seed | status | best final fitness | median | env steps | wall s | exploits |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, by_seed in results["runs"].items():
        for seed, r in by_seed.items():
            if r["status"] == "missing":
                lines.append(f"| {arm} | {seed} | missing | - | - | - | - | - |")
                continue
            lines.append(f"| {arm} | {seed} | {r['status']} | {_fmt(r['best_final_fitness'])} | "
                         f"{_fmt(r['median_final_fitness'])} | {r['env_steps']:,} | {_fmt(r['wall_seconds'], 3)} | "
                         f"{r['exploits']} |")
    for title, name in results.get("figures", {}).items():
        lines += ["", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"
