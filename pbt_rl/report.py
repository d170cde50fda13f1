"""Read a run directory and plot what the population did: lineage, schedules, returns.

Everything here is derived from the files the runtime writes (docs/design.md, "Run directory"):
``population.json`` (initial hyperparameters), ``lineage.jsonl`` (one row per exploit: the single
source of truth for ancestry and schedules), ``members/<id>/metrics.jsonl`` (progress rows) and
``summary.json`` (best member, once written). Replay and eval use the same readers.

Ancestry and schedules (see docs/lineage.md). A member's final weights were produced by a chain of
*segments*: after its last exploit at its own env step ``s`` (donor ``d``, donor checkpoint at the
donor's env step ``t``) the member trained from ``s`` to its end with the new hyperparameters; the
weights it started that segment from were ``d``'s at ``t``, produced by ``d``'s own chain up to
``t``, and so on back to a member's initial weights. Laid end to end, the segments give the
*ancestry timeline* in env steps: the number of env steps of training behind the weights at that
point. :func:`schedule_of` returns the hyperparameters in force along that timeline; it is what
``pbt-rl replay`` follows and what the report tabulates.

An exploit at step ``s`` of a member happens after that member's checkpoint at ``s`` was saved, so
a donor checkpoint at ``t`` holds the weights from *before* any exploit of the donor at ``t``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbt_rl.config import ConfigError, ExperimentConfig, load_config
from pbt_rl.runtime.store import CheckpointError, RunStore

Hyperparameters = dict[str, Any]


# ----------------------------------------------------------------------------------------
# Reading a run directory
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """The parsed contents of one run directory (a finished run or one still in progress)."""

    run_dir: Path
    config: ExperimentConfig
    initial_hyperparameters: dict[int, Hyperparameters]  # member -> population.json values
    seeds: dict[int, int]
    lineage: list[dict]  # lineage.jsonl rows in file order
    metrics: dict[int, list[dict]]  # member -> metrics.jsonl rows in file order
    summary: dict | None  # summary.json, None while the run is in progress

    @property
    def members(self) -> list[int]:
        return sorted(set(self.initial_hyperparameters) | set(self.metrics))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a writer killed mid-row) is ignored."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ConfigError(f"{path}: line {number} is not valid JSON") from None
    return rows


def load_run(run_dir: str | Path) -> RunFiles:
    """Parse a run directory; ConfigError (one line) if it is missing or not a pbt-rl run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a pbt-rl run directory (no config.yaml)")
    config = load_config(config_path)

    metrics: dict[int, list[dict]] = {}
    members_dir = run_dir / "members"
    if members_dir.is_dir():
        for child in members_dir.iterdir():
            if child.is_dir() and child.name.isdigit():
                metrics[int(child.name)] = _read_jsonl(child / "metrics.jsonl")

    initial: dict[int, Hyperparameters] = {}
    seeds: dict[int, int] = {}
    population_path = run_dir / "population.json"
    if population_path.exists():
        population = _read_json(population_path)
        for key, info in population.get("members", {}).items():
            initial[int(key)] = dict(info.get("hyperparameters", {}))
            if "seed" in info:
                seeds[int(key)] = int(info["seed"])
    else:
        # A run from before population.json existed: the first progress row is the best record.
        for member, rows in metrics.items():
            if rows:
                initial[member] = dict(rows[0].get("hyperparameters", {}))
    if not initial and not metrics:
        raise ConfigError(f"{run_dir} has no population.json and no member metrics yet")

    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else None
    return RunFiles(
        run_dir=run_dir,
        config=config,
        initial_hyperparameters=initial,
        seeds=seeds,
        lineage=_read_jsonl(run_dir / "lineage.jsonl"),
        metrics=metrics,
        summary=summary,
    )


def _as_run(run: str | Path | RunFiles) -> RunFiles:
    return run if isinstance(run, RunFiles) else load_run(run)


def checkpoints(run_dir: str | Path, member: int) -> list[tuple[int, Path]]:
    """(env_steps, path) of a member's checkpoint files, oldest first."""
    folder = Path(run_dir) / "members" / str(member) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.pt"):
        if path.stem.isdigit():
            found.append((int(path.stem), path))
    return sorted(found)


def final_fitness(run: RunFiles, member: int) -> float | None:
    """The member's last reported fitness (null until it had enough finished episodes)."""
    for row in reversed(run.metrics.get(member, [])):
        if row.get("fitness") is not None:
            return float(row["fitness"])
    return None


def member_env_steps(run: RunFiles, member: int) -> int:
    """How far the member got: its last progress row, checkpoint or exploit, in env steps."""
    steps = [int(row["env_steps"]) for row in run.metrics.get(member, [])[-1:]]
    steps += [step for step, _ in checkpoints(run.run_dir, member)[-1:]]
    steps += [int(row["env_steps"]) for row in run.lineage if int(row["member"]) == member]
    return max(steps, default=0)


def best_member(run: str | Path | RunFiles) -> int:
    """summary.json's best member when written; else the member with the highest last fitness."""
    run = _as_run(run)
    if run.summary is not None:
        for key in ("best_member", "best"):
            value = run.summary.get(key)
            if isinstance(value, dict):
                value = value.get("member")
            if isinstance(value, (int, str)) and str(value).isdigit():
                return int(value)
    scored = [(final_fitness(run, m), m) for m in run.members]
    scored = [(f, m) for f, m in scored if f is not None]
    if not scored:
        raise ConfigError(f"{run.run_dir}: no member has a fitness yet, so there is no best member; pass a member id")
    # Highest fitness; ties go to the lowest member id.
    return max(scored, key=lambda fm: (fm[0], -fm[1]))[1]


def resolve_member(run: str | Path | RunFiles, member: str | int) -> int:
    """'best' or a member id -> a member id of this run; ConfigError for an unknown one."""
    run = _as_run(run)
    if member == "best":
        return best_member(run)
    try:
        member_id = int(member)
    except (TypeError, ValueError):
        raise ConfigError(f"member: expected 'best' or a member id, got {member!r}") from None
    if member_id not in run.members:
        known = ", ".join(str(m) for m in run.members)
        raise ConfigError(f"member {member_id} is not in this run (members: {known})")
    return member_id


# ----------------------------------------------------------------------------------------
# Ancestry and schedules
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Training of one member that the final weights went through.

    ``start``/``end`` are the member's own env steps; ``timeline_start`` is where the segment
    begins on the ancestry timeline (env steps of training behind the weights). ``exploit`` is the
    lineage row that started the segment (None for a member's initial weights).
    """

    member: int
    start: int
    end: int
    timeline_start: int
    hyperparameters: Hyperparameters
    exploit: dict | None

    @property
    def length(self) -> int:
        return max(0, self.end - self.start)


def ancestry(run: str | Path | RunFiles, member: int, until: int | None = None) -> list[Segment]:
    """The segments behind ``member``'s weights at its own env step ``until`` (default: its end).

    Oldest segment first; consecutive segments are joined by exploits (``segment.exploit``).
    """
    run = _as_run(run)
    member = int(member)
    cutoff = member_env_steps(run, member) if until is None else int(until)
    include_exploit_at_cutoff = True  # the member's own end: an exploit there replaced its weights
    indexed = list(enumerate(run.lineage))
    reversed_segments: list[tuple[int, int, int, Hyperparameters, dict | None]] = []
    used: set[int] = set()
    while True:
        candidates = [
            (int(row["env_steps"]), index, row)
            for index, row in indexed
            if int(row["member"]) == member
            and (int(row["env_steps"]) <= cutoff if include_exploit_at_cutoff else int(row["env_steps"]) < cutoff)
        ]
        if not candidates:
            initial = run.initial_hyperparameters.get(member)
            if initial is None:
                raise ConfigError(f"member {member} has no initial hyperparameters in population.json")
            reversed_segments.append((member, 0, cutoff, dict(initial), None))
            break
        step, index, row = max(candidates, key=lambda c: (c[0], c[1]))
        if index in used:  # a malformed lineage would loop forever
            raise ConfigError(f"{run.run_dir / 'lineage.jsonl'}: exploit rows form a cycle at member {member}")
        used.add(index)
        reversed_segments.append((member, step, cutoff, dict(row["new_hyperparameters"]), row))
        # The copied weights are the donor checkpoint's, on the clock of the member that saved it:
        # the donor itself, or, when the donor had exploited since its last checkpoint, its donor.
        member = _checkpoint_owner(run, row)
        cutoff, include_exploit_at_cutoff = int(row["donor_env_steps"]), False

    segments = []
    timeline = 0
    for seg_member, start, end, hyperparameters, exploit in reversed(reversed_segments):
        segment = Segment(seg_member, start, end, timeline, hyperparameters, exploit)
        segments.append(segment)
        timeline += segment.length
    return segments


def _checkpoint_owner(run: "RunFiles", row: dict) -> int:
    try:
        return RunStore.checkpoint_member(row["donor_checkpoint"])
    except CheckpointError as exc:
        raise ConfigError(f"{run.run_dir / 'lineage.jsonl'}: {exc}") from None


def schedule_of(run_dir: str | Path | RunFiles, member: str | int) -> list[tuple[int, Hyperparameters]]:
    """The hyperparameter schedule that produced ``member``'s final weights.

    Returns ``[(env_steps, hyperparameters), ...]`` sorted by env steps, starting at 0: from each
    ``env_steps`` on (on the ancestry timeline, see the module docstring) the given values were in
    force, until the next entry. Consecutive entries with equal values are merged.
    ``member`` may be ``"best"``.
    """
    run = _as_run(run_dir)
    member_id = resolve_member(run, member)
    schedule: list[tuple[int, Hyperparameters]] = []
    for segment in ancestry(run, member_id):
        if schedule and schedule[-1][1] == segment.hyperparameters:
            continue
        if schedule and schedule[-1][0] == segment.timeline_start:
            schedule[-1] = (segment.timeline_start, segment.hyperparameters)  # a zero-length segment
            continue
        schedule.append((segment.timeline_start, segment.hyperparameters))
    return schedule


def own_hyperparameter_history(run: RunFiles, member: int) -> list[tuple[int, Hyperparameters]]:
    """(env_steps, values) of the member's own hyperparameters on its own env-step clock."""
    history = [(0, dict(run.initial_hyperparameters.get(member, {})))]
    for row in run.lineage:
        if int(row["member"]) == member:
            history.append((int(row["env_steps"]), dict(row["new_hyperparameters"])))
    return history


def ancestry_length(segments: list[Segment]) -> int:
    return segments[-1].timeline_start + segments[-1].length if segments else 0


# ----------------------------------------------------------------------------------------
# Best fitness over wall time (time-to-score)
# ----------------------------------------------------------------------------------------


def _timed_rows(run: RunFiles) -> dict[int, list[dict]]:
    """Each member's metrics rows that have ``wall_seconds``, oldest first (file order on ties)."""
    timed = {}
    for member, rows in run.metrics.items():
        with_time = [row for row in rows if row.get("wall_seconds") is not None]
        timed[member] = sorted(with_time, key=lambda row: float(row["wall_seconds"]))  # stable sort
    return timed


def best_fitness_over_time(run: str | Path | RunFiles, every_seconds: float = 60.0) -> list[dict]:
    """The population's best fitness at regular wall times, for "score X after N minutes".

    Checkpoint times are ``every_seconds``, ``2 * every_seconds``, ... (wall seconds since the run
    started) up to and including the last metrics row's ``wall_seconds``, plus one final entry at
    that last time when it is not a multiple of ``every_seconds``. At time ``t`` a member's fitness
    is the one in its latest metrics row with ``wall_seconds <= t`` (not a later row, not its best
    ever); a member whose latest row has a null fitness (too few episodes, e.g. just after an
    exploit) or that has no row yet does not count. Ties go to the lowest member id.

    Returns one dict per checkpoint time, in time order: ``{"wall_seconds": t, "best_fitness":
    float | None, "member": int | None, "env_steps": int | None}``, ``env_steps`` being that
    member's own env steps in that row. Empty when there are no metrics rows.
    """
    if not every_seconds > 0:
        raise ValueError(f"every_seconds must be positive, got {every_seconds!r}")
    run = _as_run(run)
    timed = _timed_rows(run)
    times = [float(row["wall_seconds"]) for rows in timed.values() for row in rows]
    if not times:
        return []
    last = max(times)
    checkpoints_at = [k * every_seconds for k in range(1, int(last // every_seconds) + 1)]
    if not checkpoints_at or checkpoints_at[-1] < last:
        checkpoints_at.append(last)

    entries = []
    position = {member: -1 for member in timed}  # index of each member's latest row at or before t
    for t in checkpoints_at:
        best: tuple[float, int, int] | None = None  # (fitness, member, env_steps)
        for member in sorted(timed):
            rows = timed[member]
            i = position[member]
            while i + 1 < len(rows) and float(rows[i + 1]["wall_seconds"]) <= t:
                i += 1
            position[member] = i
            if i < 0 or rows[i].get("fitness") is None:
                continue
            fitness = float(rows[i]["fitness"])
            if best is None or fitness > best[0]:
                best = (fitness, member, int(rows[i]["env_steps"]))
        entries.append({
            "wall_seconds": t,
            "best_fitness": best[0] if best else None,
            "member": best[1] if best else None,
            "env_steps": best[2] if best else None,
        })
    return entries


def first_time_reaching(run: str | Path | RunFiles, score: float) -> dict | None:
    """The first metrics row, over all members, whose fitness is at least ``score``.

    "First" is the smallest ``wall_seconds`` (wall seconds since the run started); ties go to the
    lowest member id, then the member's earlier row. Returns ``{"wall_seconds", "member",
    "env_steps", "fitness"}`` (``env_steps`` on that member's own counter), or None if no member
    ever reported a fitness of ``score`` or more.
    """
    run = _as_run(run)
    found: tuple[float, int, int, float] | None = None
    for member, rows in sorted(_timed_rows(run).items()):
        for row in rows:
            if row.get("fitness") is None or float(row["fitness"]) < score:
                continue
            candidate = (float(row["wall_seconds"]), member, int(row["env_steps"]), float(row["fitness"]))
            if found is None or candidate[:2] < found[:2]:
                found = candidate
            break  # rows are in time order: later rows of this member are no earlier
    if found is None:
        return None
    return {"wall_seconds": found[0], "member": found[1], "env_steps": found[2], "fitness": found[3]}


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


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


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


def _plot_lineage(run: RunFiles, best: int | None, best_segments: list[Segment], path: Path) -> None:
    plt = pyplot_agg()
    members = run.members
    colors = _member_colors(members)
    fig, ax = plt.subplots(figsize=(10, max(3.5, 0.45 * len(members) + 2)), dpi=100)
    for m in members:
        end = member_env_steps(run, m)
        ax.hlines(m, 0, end, color=colors[m], linewidth=2, alpha=0.5)
    for row in run.lineage:
        child, donor = int(row["member"]), int(row["donor"])
        ax.annotate(
            "",
            xy=(int(row["env_steps"]), child),
            xytext=(int(row["donor_env_steps"]), donor),
            arrowprops=dict(arrowstyle="->", color="0.45", linewidth=0.9, shrinkA=2, shrinkB=2),
        )
        ax.plot(int(row["env_steps"]), child, marker="o", color=colors[child], markersize=4)
    if best is not None:
        for i, segment in enumerate(best_segments):
            ax.hlines(segment.member, segment.start, segment.end, color="crimson", linewidth=4,
                      label="best member's ancestry" if i == 0 else None)
            if segment.exploit is not None:
                row = segment.exploit
                ax.annotate(
                    "",
                    xy=(int(row["env_steps"]), int(row["member"])),
                    xytext=(int(row["donor_env_steps"]), int(row["donor"])),
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


def _log_scale_names(run: RunFiles) -> set[str]:
    return {spec.name for spec in run.config.pbt.search_space if spec.kind in ("log_uniform", "log_int")}


def _plot_hyperparameter(run: RunFiles, name: str, best: int | None, best_schedule, best_length: int, path: Path) -> None:
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


def _plot_returns(run: RunFiles, best: int | None, path: Path) -> None:
    plt = pyplot_agg()
    colors = _member_colors(run.members)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), dpi=100, sharex=True)
    for m in run.members:
        rows = run.metrics.get(m, [])
        points = [(int(r["env_steps"]), sum(r["episode_returns"]) / len(r["episode_returns"]))
                  for r in rows if r.get("episode_returns")]
        width = 2.5 if m == best else 1.2
        if points:
            top.plot([p[0] for p in points], [p[1] for p in points], color=colors[m], linewidth=width,
                     alpha=0.85, label=f"member {m}" + (" (best)" if m == best else ""))
        fitness = [(int(r["env_steps"]), r["fitness"]) for r in rows if r.get("fitness") is not None]
        if fitness:
            bottom.plot([p[0] for p in fitness], [p[1] for p in fitness], color=colors[m], linewidth=width,
                        alpha=0.85, label=f"member {m}" + (" (best)" if m == best else ""))
    for row in run.lineage:
        bottom.axvline(int(row["env_steps"]), color=colors.get(int(row["member"]), "0.5"), alpha=0.25, linewidth=0.8)
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


def _time_table_markdown(run: RunFiles) -> list[str]:
    """The "Best fitness over wall time" section; no lines when there are no metrics rows."""
    times = [float(row["wall_seconds"]) for rows in _timed_rows(run).values() for row in rows]
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


def _summary_markdown(run: RunFiles, best: int | None, segments: list[Segment], schedule) -> str:
    lines = [f"# {run.config.run.name}: PBT report", ""]
    # summary.json's own status (pbt_rl/runtime/summary.py); files written before it had none.
    status = (run.summary.get("status", "finished") if isinstance(run.summary, dict)
              else "in progress (no summary.json yet)")
    lines += [f"- run directory: `{run.run_dir}`", f"- status: {status}",
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
        exploits = sum(1 for row in run.lineage if int(row["member"]) == m)
        lines.append(f"| {m} | {member_env_steps(run, m)} | {_format_value(final_fitness(run, m))} | {exploits} |")
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write lineage.png, hp_<name>.png, returns.png and summary.md to <run_dir>/report/.

    Returns the report directory. Works on a run still in progress and on one with no exploits.
    """
    run = load_run(run_dir)
    out = run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        best: int | None = best_member(run)
    except ConfigError:
        best = None
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
