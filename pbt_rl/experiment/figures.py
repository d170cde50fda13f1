"""The experiment's figures (matplotlib on Agg): best fitness vs env steps per arm, and the
schedules the compared arm's best members discovered.

``best_fitness.png``: per arm, the mean over seeds of each run's best-fitness curve
(:func:`pbt_rl.experiment.results.best_fitness_curve`, a member's own env steps on the x axis)
with a 95% bootstrap band at each point (where every seed has a value; none for one seed).
``schedules.png``: for each seed of the compared arm, the hyperparameter schedule behind its best
member's final weights (:func:`pbt_rl.lineage.schedule_of`, ancestry env steps), one panel per
search-space parameter.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pbt_rl.config import ConfigError
from pbt_rl.experiment.spec import ExperimentSpec
from pbt_rl.lineage import schedule_of
from pbt_rl.runtime.store import RunStore

LOG_KINDS = ("log_uniform", "log_int")


def write_figures(spec: ExperimentSpec, results: dict, root: Path) -> dict[str, str]:
    """Write the figures into ``root``; return {title: file name}."""
    from pbt_rl.report import pyplot_agg

    plt = pyplot_agg()
    figures = {"best fitness vs env steps": "best_fitness.png"}
    _best_fitness(plt, spec, results, root / figures["best fitness vs env steps"])
    if _schedules(plt, spec, root / "schedules.png"):
        figures[f"schedules of the best {spec.compare} member per seed"] = "schedules.png"
    return figures


def _band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap bounds of the mean over axis 0 (seeds), per column."""
    import scipy.stats

    from pbt_rl.experiment.results import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = scipy.stats.bootstrap((values,), np.mean, axis=0, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                                   rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
    return np.asarray(ci.low), np.asarray(ci.high)


def _best_fitness(plt, spec: ExperimentSpec, results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for arm, by_seed in results["runs"].items():
        curves = [r["curve"] for r in by_seed.values() if r["status"] != "missing"]
        if not curves:
            continue
        steps = np.asarray(curves[0]["env_steps"], dtype=np.float64)
        values = np.array([[np.nan if v is None else v for v in c["best_fitness"]] for c in curves], dtype=np.float64)
        complete = ~np.isnan(values).any(axis=0)
        if not complete.any():
            continue
        mean = values[:, complete].mean(axis=0)
        (line,) = ax.plot(steps[complete], mean, linewidth=2, label=f"{arm} (n={len(curves)})")
        if len(curves) >= 2:
            low, high = _band(values[:, complete])
            ax.fill_between(steps[complete], low, high, color=line.get_color(), alpha=0.2)
    low, high = ax.get_ylim()
    for threshold in spec.thresholds:  # only those inside the data's range (others would squash it)
        if low <= threshold <= high:
            ax.axhline(threshold, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("env steps per member")
    ax.set_ylabel("best member's fitness")
    ax.set_title(f"{spec.name}: best fitness (mean over seeds, 95% bootstrap band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _schedules(plt, spec: ExperimentSpec, path: Path) -> bool:
    plans = [p for p in spec.runs_of(spec.compare) if RunStore(p.dir).config_path.is_file()]
    params = list(spec.runs_of(spec.compare)[0].config.pbt.search_space)
    if not plans or not params:
        return False
    fig, axes = plt.subplots(len(params), 1, figsize=(9, 2.6 * len(params)), dpi=100, sharex=True, squeeze=False)
    drawn = False
    for plan in plans:
        run = RunStore(plan.dir).snapshot()
        try:
            schedule = schedule_of(run, "best")
        except ConfigError:  # no scored member yet: nothing to draw for this seed
            continue
        end = plan.config.run.total_env_steps
        steps = [s for s, _ in schedule] + [max(end, schedule[-1][0])]
        for ax, spec_param in zip(axes[:, 0], params):
            ys = [values.get(spec_param.name) for _, values in schedule]
            ax.step(steps, ys + ys[-1:], where="post", label=f"seed {plan.seed}")
            drawn = True
    for ax, spec_param in zip(axes[:, 0], params):
        ax.set_ylabel(spec_param.name)
        if spec_param.kind in LOG_KINDS:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title(f"{spec.name}: schedules of the best {spec.compare} member per seed")
    axes[-1, 0].set_xlabel("ancestry env steps")
    fig.tight_layout()
    if drawn:
        fig.savefig(path)
    plt.close(fig)
    return drawn
