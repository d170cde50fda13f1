"""``pbt-rl report``: plots and summary.md of what the population did, in ``<run.dir>/report/``.

Rendering only: the numbers come from :mod:`pbt_rl.lineage` (ancestry, schedules, best member,
best fitness over wall time), computed from the run's rows as ``load_run`` (``RunStore.snapshot``) reads them
(docs/lineage.md). Works on a finished run, on one still in progress and on one with no exploits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pbt_rl.lineage import (
    Segment,
    ancestry,
    ancestry_length,
    best_fitness_over_time,
    best_member,
    final_fitness,
    member_env_steps,
    own_hyperparameter_history,
    schedule_of,
    timed_rows,
)
from pbt_rl.runtime.run_format import SUMMARY_FILE, RunSnapshot
from pbt_rl.runtime.store import RunStore, load_run


# Intervals (wall seconds) the report's time table steps through to stay at most MAX_TIME_TABLE_ROWS long.
TIME_TABLE_INTERVALS = (60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0)
MAX_TIME_TABLE_ROWS = 30


def time_table_interval(last_wall_seconds: float, max_rows: int = MAX_TIME_TABLE_ROWS) -> float:
    """The smallest interval (wall seconds) of TIME_TABLE_INTERVALS giving at most ``max_rows``
    entries up to ``last_wall_seconds``; beyond a day, a whole number of days."""
    for interval in TIME_TABLE_INTERVALS:
        if math.ceil(last_wall_seconds / interval) <= max_rows:
            return interval
    return math.ceil(last_wall_seconds / max_rows / 86400.0) * 86400.0


def _format_wall_time(seconds: float) -> str:
    """Wall seconds as minutes:seconds, e.g. 60 -> "1:00", 125.4 -> "2:05", 5400 -> "90:00"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def pyplot_agg():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _format_steps(value: float) -> str:
    value = float(value)
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _member_colors(members: list[int]) -> dict[int, Any]:
    plt = pyplot_agg()
    cmap = plt.get_cmap("tab10" if len(members) <= 10 else "viridis")
    if len(members) <= 10:
        return {m: cmap(i % 10) for i, m in enumerate(members)}
    return {m: cmap(i / max(1, len(members) - 1)) for i, m in enumerate(members)}


def _plot_lineage(run: RunSnapshot, best: int | None, best_segments: list[Segment], path: Path) -> None:
    plt = pyplot_agg()
    members = run.members
    colors = _member_colors(members)
    fig, ax = plt.subplots(figsize=(10, max(3.5, 0.45 * len(members) + 2)), dpi=100)
    for m in members:
        end = member_env_steps(run, m)
        ax.hlines(m, 0, end, color=colors[m], linewidth=2, alpha=0.5)
    for row in run.lineage:
        child = row.member
        ax.annotate(  # from the copied checkpoint, on the clock of its saver (usually the donor)
            "",
            xy=(row.env_steps, child),
            xytext=(row.donor_env_steps, row.saver),
            arrowprops=dict(arrowstyle="->", color="0.45", linewidth=0.9, shrinkA=2, shrinkB=2),
        )
        ax.plot(row.env_steps, child, marker="o", color=colors[child], markersize=4)
    if best is not None:
        for i, segment in enumerate(best_segments):
            ax.hlines(segment.member, segment.start, segment.end, color="crimson", linewidth=4,
                      label="best member's ancestry" if i == 0 else None)
            if segment.exploit is not None:
                row = segment.exploit
                ax.annotate(
                    "",
                    xy=(row.env_steps, row.member),
                    xytext=(row.donor_env_steps, row.saver),
                    arrowprops=dict(arrowstyle="-|>", color="crimson", linewidth=2, shrinkA=2, shrinkB=2),
                )
        ax.plot([], [], color="0.45", linewidth=0.9, label="exploit: donor checkpoint -> child")
        ax.plot(member_env_steps(run, best), best, marker="*", color="crimson", markersize=14, linestyle="none",
                label=f"best member ({best})")
    ax.set_yticks(members)
    ax.set_yticklabels([f"member {m}" for m in members])
    ax.set_ylim(min(members) - 0.7, max(members) + 0.7)
    ax.set_xlabel("env steps (each member's own counter)")
    ax.set_ylabel("member")
    ax.set_title(f"{run.config.run.name}: lineage ({len(run.lineage)} exploits)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _log_scale_names(run: RunSnapshot) -> set[str]:
    return {spec.name for spec in run.config.pbt.search_space if spec.kind in ("log_uniform", "log_int")}


def _plot_hyperparameter(run: RunSnapshot, name: str, best: int | None, best_schedule, best_length: int, path: Path) -> None:
    plt = pyplot_agg()
    colors = _member_colors(run.members)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    plotted = False
    for m in run.members:
        history = [(step, values[name]) for step, values in own_hyperparameter_history(run, m) if name in values]
        if not history:
            continue
        end = max(member_env_steps(run, m), history[-1][0])
        xs = [step for step, _ in history] + [end]
        ys = [value for _, value in history] + [history[-1][1]]
        ax.step(xs, ys, where="post", color=colors[m], alpha=0.8, linewidth=1.3, label=f"member {m}")
        plotted = True
    if best is not None and best_schedule and all(name in values for _, values in best_schedule):
        xs = [step for step, _ in best_schedule] + [max(best_length, best_schedule[-1][0])]
        ys = [values[name] for _, values in best_schedule] + [best_schedule[-1][1][name]]
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=2,
                label=f"best member {best}: inherited schedule (ancestry env steps)")
    if name in _log_scale_names(run) and plotted:
        ax.set_yscale("log")
    ax.set_xlabel("env steps")
    ax.set_ylabel(name)
    ax.set_title(f"{run.config.run.name}: {name} per member")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", ncol=2 if len(run.members) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_returns(run: RunSnapshot, best: int | None, path: Path) -> None:
    plt = pyplot_agg()
    colors = _member_colors(run.members)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), dpi=100, sharex=True)
    for m in run.members:
        rows = run.metrics.get(m, ())
        points = [(r.env_steps, sum(r.episode_returns) / len(r.episode_returns)) for r in rows if r.episode_returns]
        width = 2.5 if m == best else 1.2
        if points:
            top.plot([p[0] for p in points], [p[1] for p in points], color=colors[m], linewidth=width,
                     alpha=0.85, label=f"member {m}" + (" (best)" if m == best else ""))
        fitness = [(r.env_steps, r.fitness) for r in rows if r.fitness is not None]
        if fitness:
            bottom.plot([p[0] for p in fitness], [p[1] for p in fitness], color=colors[m], linewidth=width,
                        alpha=0.85, label=f"member {m}" + (" (best)" if m == best else ""))
    for row in run.lineage:
        bottom.axvline(row.env_steps, color=colors.get(row.member, "0.5"), alpha=0.25, linewidth=0.8)
    top.set_ylabel("episodic return (mean per report)")
    top.set_title(f"{run.config.run.name}: episodic return (true game score)")
    bottom.set_ylabel(f"fitness (mean of last {run.config.pbt.fitness_window})")
    bottom.set_xlabel("env steps")
    bottom.set_title("fitness PBT ranks on; vertical lines: exploits")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", ncol=2 if len(run.members) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _time_table_markdown(run: RunSnapshot) -> list[str]:
    """The "Best fitness over wall time" section; no lines when there are no metrics rows."""
    times = [row.wall_seconds for rows in timed_rows(run).values() for row in rows]
    if not times:
        return []
    every = time_table_interval(max(times))
    lines = ["## Best fitness over wall time", "",
             f"Best current fitness over members every {_format_wall_time(every)} (min:s) of wall time since "
             "the run started; each member counts with its latest progress row at that time.", "",
             "| wall time (min:s) | best fitness | member | env steps of that member |", "|---|---|---|---|"]
    for entry in best_fitness_over_time(run, every):
        if entry["member"] is None:
            lines.append(f"| {_format_wall_time(entry['wall_seconds'])} | - | - | - |")
        else:
            lines.append(f"| {_format_wall_time(entry['wall_seconds'])} | {_format_value(entry['best_fitness'])} | "
                         f"{entry['member']} | {entry['env_steps']} |")
    lines.append("")
    return lines


def _summary_markdown(run: RunSnapshot, best: int | None, segments: list[Segment], schedule) -> str:
    lines = [f"# {run.config.run.name}: PBT report", ""]
    # summary.json's own status (pbt_rl/runtime/summary.py); files written before it had none.
    status = f"in progress (no {SUMMARY_FILE} yet)" if run.in_progress else run.summary.get("status", "finished")
    lines += [f"- run directory: `{run.root}`", f"- status: {status}",
              f"- members: {len(run.members)}, exploits: {len(run.lineage)}",
              f"- budget per member: {run.config.run.total_env_steps} env steps", ""]
    if best is None:
        lines += ["No member has a fitness yet.", ""]
    else:
        fitness = final_fitness(run, best)
        lines += ["## Best member", "",
                  f"- member: {best}",
                  f"- fitness: {_format_value(fitness)} (mean of the last {run.config.pbt.fitness_window} episodic returns)",
                  f"- env steps: {member_env_steps(run, best)}",
                  f"- env steps of training behind its weights (ancestry): {ancestry_length(segments)}", ""]
        chain = " <- ".join(
            f"member {s.member} [{_format_steps(s.start)}, {_format_steps(s.end)})" for s in reversed(segments)
        )
        lines += ["## Ancestry (newest first; own env steps)", "", chain, ""]
        names = [spec.name for spec in run.config.pbt.search_space]
        names = names or sorted({name for _, values in schedule for name in values})
        lines += ["## Schedule (ancestry env steps)", "",
                  "| from env step | to env step | member | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for segment in segments:
            if segment.length == 0:
                continue
            cells = [_format_value(segment.hyperparameters.get(n, "")) for n in names]
            lines.append(f"| {segment.timeline_start} | {segment.timeline_start + segment.length} | "
                         f"{segment.member} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _time_table_markdown(run)
    lines += ["## Members", "", "| member | env steps | fitness | exploits |", "|---|---|---|---|"]
    for m in run.members:
        exploits = sum(1 for row in run.lineage if row.member == m)
        lines.append(f"| {m} | {member_env_steps(run, m)} | {_format_value(final_fitness(run, m))} | {exploits} |")
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write lineage.png, hp_<name>.png, returns.png and summary.md to the run's report directory.

    Returns the report directory. Works on a run still in progress and on one with no exploits.
    """
    run = load_run(run_dir)
    out = RunStore(run.root).report_dir
    out.mkdir(parents=True, exist_ok=True)
    best = best_member(run)
    segments = ancestry(run, best) if best is not None else []
    schedule = schedule_of(run, best) if best is not None else []

    _plot_lineage(run, best, segments, out / "lineage.png")
    # One plot per evolved hyperparameter; without a search space, every value population.json names.
    names = [spec.name for spec in run.config.pbt.search_space]
    if not names:
        for values in run.initial_hyperparameters.values():
            names += [n for n in values if n not in names and isinstance(values[n], (int, float))]
    for name in names:
        _plot_hyperparameter(run, name, best, schedule, ancestry_length(segments), out / f"hp_{_safe_name(name)}.png")
    _plot_returns(run, best, out / "returns.png")
    (out / "summary.md").write_text(_summary_markdown(run, best, segments, schedule), encoding="utf-8")
    return out
