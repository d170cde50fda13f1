"""A read-only view of a run for notebooks and scripts: :func:`open_run`, and :func:`as_frame`.

Every fact comes from its one owner: the rows from :class:`~pbt_rl.runtime.store.RunStore`
(``snapshot()``), the ancestry, schedules and best member from :mod:`pbt_rl.lineage`, the
best-member rule from :mod:`pbt_rl.runtime.summary`. This module only turns them into plain lists
of flat dicts (one dict per row, JSON-like values), which :func:`as_frame` makes a pandas
DataFrame when pandas is installed (pbt-rl does not depend on it). docs/python_api.md shows it in use.

Column names: nested values are flattened with a prefix: ``hp/<name>`` (hyperparameters),
``losses/<name>``, ``old/<name>`` and ``op/<name>`` (an exploit's previous values and the operation
applied to each); a schedule's rows are ``{"env_steps": ..., <name>: value, ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from pbt_rl import lineage as _lineage
from pbt_rl.runtime.run_format import RunSnapshot
from pbt_rl.runtime.store import RunStore


def _prefixed(prefix: str, values: dict | None) -> dict[str, Any]:
    return {f"{prefix}/{name}": value for name, value in (values or {}).items()}


class RunView:
    """One run directory read at one moment (:meth:`refresh` reads it again). Nothing is written.

    Attributes: ``root`` (absolute path), ``config`` (the resolved :class:`ExperimentConfig`),
    ``summary`` (summary.json, None while the run is in progress), ``snapshot`` (the typed
    :class:`~pbt_rl.runtime.run_format.RunSnapshot` behind it all).
    """

    def __init__(self, snapshot: RunSnapshot) -> None:
        self.snapshot = snapshot
        self.root: Path = snapshot.root
        self.config = snapshot.config
        self.summary = snapshot.summary

    def refresh(self) -> "RunView":
        """The run as it is now (e.g. while it trains)."""
        return open_run(self.root)

    @property
    def members(self) -> list[int]:
        return self.snapshot.members

    @property
    def in_progress(self) -> bool:
        return self.snapshot.in_progress

    @property
    def best_member(self) -> int | None:
        """The run's best member (summary.json's, or the same rule over the last fitness); None if unscored."""
        return _lineage.best_member(self.snapshot)

    def member_id(self, member: str | int = "best") -> int:
        """``"best"`` or a member id -> a member id of this run (ConfigError for an unknown one)."""
        return _lineage.resolve_member(self.snapshot, member)

    def members_table(self) -> list[dict]:
        """One row per member: env steps, last fitness, exploits, seed, initial hyperparameters (``hp/``)."""
        rows = []
        for m in self.members:
            initial = self.snapshot.population.members.get(m)
            rows.append({
                "member": m,
                "env_steps": _lineage.member_env_steps(self.snapshot, m),
                "fitness": _lineage.final_fitness(self.snapshot, m),
                "exploits": sum(1 for row in self.snapshot.lineage if row.member == m),
                "seed": initial.seed if initial else None,
                **_prefixed("hp", initial.hyperparameters if initial else {}),
            })
        return rows

    def metrics(self, member: int | None = None) -> list[dict]:
        """Progress rows (metrics.jsonl) of one member, or of every member in member order."""
        chosen = self.members if member is None else [self.member_id(member)]
        rows = []
        for m in chosen:
            for row in self.snapshot.metrics.get(m, ()):
                rows.append({
                    "member": m, "env_steps": row.env_steps, "wall_seconds": row.wall_seconds,
                    "fitness": row.fitness, "updates": row.updates, "generation": row.generation,
                    "env_steps_per_second": row.env_steps_per_second,
                    "episode_returns": list(row.episode_returns),
                    **_prefixed("losses", row.losses), **_prefixed("hp", row.hyperparameters),
                })
        return rows

    def lineage(self) -> list[dict]:
        """One row per exploit (lineage.jsonl) in file order; ``hp/`` holds the new values."""
        return [{
            "member": row.member, "env_steps": row.env_steps, "generation": row.generation,
            "donor": row.donor, "saver": row.saver, "donor_checkpoint": row.donor_checkpoint,
            "donor_env_steps": row.donor_env_steps, "member_score": row.member_score,
            "donor_score": row.donor_score, "exploit": row.exploit, "wall_seconds": row.wall_seconds,
            **_prefixed("hp", row.new_hyperparameters), **_prefixed("old", row.old_hyperparameters),
            **_prefixed("op", row.operations),
        } for row in self.snapshot.lineage]

    def schedule(self, member: str | int = "best") -> list[dict]:
        """The schedule behind ``member``'s final weights (:func:`pbt_rl.lineage.schedule_of`):
        ``[{"env_steps": s, <name>: value, ...}]`` on the ancestry timeline, from ``s`` on."""
        return [{"env_steps": steps, **values} for steps, values in _lineage.schedule_of(self.snapshot, member)]

    def ancestry(self, member: str | int = "best") -> list[dict]:
        """The segments of training behind ``member``'s final weights, oldest first
        (:func:`pbt_rl.lineage.ancestry`): whose weights, from/to which of its env steps, with which values."""
        return [{
            "member": s.member, "start": s.start, "end": s.end, "timeline_start": s.timeline_start,
            **_prefixed("hp", s.hyperparameters),
        } for s in _lineage.ancestry(self.snapshot, self.member_id(member))]

    def best_fitness_over_time(self, every_seconds: float = 60.0) -> list[dict]:
        """The population's best fitness at regular wall times (:func:`pbt_rl.lineage.best_fitness_over_time`)."""
        return _lineage.best_fitness_over_time(self.snapshot, every_seconds)

    def checkpoint(self, member: str | int = "best") -> Path | None:
        """Path of ``member``'s newest verified checkpoint (RunStore's rule), or None."""
        store = RunStore(self.root)
        found = store.newest_verified_checkpoint(self.member_id(member))
        return None if found is None else store.path(found)

    def __repr__(self) -> str:
        state = "in progress" if self.in_progress else self.summary.get("status")
        return f"RunView({str(self.root)!r}, members={len(self.members)}, {state})"


def open_run(run_dir: str | Path) -> RunView:
    """A read-only view of the run directory ``run_dir`` (RunDirError, one line, if it is not one)."""
    return RunView(RunStore(run_dir).snapshot())


def as_frame(rows: Iterable[dict]):
    """``rows`` (a list of flat dicts, as :class:`RunView` returns them) as a pandas DataFrame.

    pandas is optional: ImportError with the install line when it is missing.
    """
    try:
        import pandas
    except ImportError:
        raise ImportError("as_frame needs pandas (pip install pandas); the rows are plain lists of dicts already") from None
    return pandas.DataFrame(list(rows))
