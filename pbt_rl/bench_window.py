"""The bench's measured window: a running or finished population's env-step rate read back from
its members' ``metrics.jsonl`` (:func:`population_rate_from_metrics`), and :class:`WindowWatch`,
which asks the run to stop as soon as that window is as long as the bench wants.

Why a watch and not a wall-time limit alone: members need a while to start (processes, torch,
CUDA, envs), and how long depends on the machine and the population. A limit of "start-up
allowance + warm-up + seconds" either wastes wall time (a fast start measures a longer window
than asked for) or, when start-up takes longer than its allowance, leaves the window empty (it
did: Pong IMPALA at 8 members with ``--seconds 8`` on the H100 machine, 2026-12-06). With the
watch the limit is only a ceiling.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pbt_rl.runtime.run_format import MetricsRow, RunDirError
from pbt_rl.runtime.store import RunStore


def population_rate_from_metrics(run_dir: Path, warmup_seconds: float) -> dict[str, Any]:
    """Population env steps/s from every member's metrics.jsonl, after a warm-up.

    The window starts ``warmup_seconds`` after the last member's first report (``startup_seconds``
    of the run's wall clock: process start-up, CUDA initialisation and the first updates stay out
    of it) and ends at the earliest last
    report. Each member's env-step count is interpolated linearly in wall time, so members that
    report at different moments are compared over the same window. The rows are read while the run
    may still be writing them: a torn last line is left out.
    """
    store = RunStore(run_dir)
    series = []
    all_rows: list[MetricsRow] = []
    for member in store.member_ids():
        rows = [row for row in store.read_metrics(member) if row.wall_seconds is not None]
        all_rows.extend(rows)
        points = sorted((row.wall_seconds, row.env_steps) for row in rows)
        if len(points) >= 2:
            series.append(np.array(points, dtype=np.float64))
    if not series:
        raise RuntimeError(f"no member reported progress twice in {run_dir}; run the benchmark longer")
    start = max(s[0, 0] for s in series) + warmup_seconds
    end = min(s[-1, 0] for s in series)
    if end <= start:
        raise RuntimeError("the measured window is empty; run the benchmark longer (--seconds)")
    steps = sum(np.interp(end, s[:, 0], s[:, 1]) - np.interp(start, s[:, 0], s[:, 1]) for s in series)
    return {"env_steps_per_second": steps / (end - start), "window_seconds": end - start, "members": len(series),
            "window_start_seconds": start, "window_end_seconds": end,
            "startup_seconds": max(s[0, 0] for s in series),
            "time_fractions": time_fractions(row for row in all_rows if start < row.wall_seconds <= end)}


def time_fractions(rows: Iterable[MetricsRow]) -> dict[str, float] | None:
    """Where the members' training time went, summed over metrics rows: each ``timing_seconds``
    part as a fraction of their ``wall`` seconds (None when the rows carry no timing)."""
    totals: dict[str, float] = {}
    for row in rows:
        for key, value in (row.timing_seconds or {}).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    wall = totals.pop("wall", 0.0)
    if wall <= 0:
        return None
    return {key: value / wall for key, value in totals.items()}


def default_warmup(seconds: float) -> float:
    """Seconds of training left out of the measured window after every member reports: a third
    of the window, between 5 and 30 s (first updates, allocator and cuDNN warm-up)."""
    return min(30.0, max(5.0, seconds / 3))


class WindowWatch:
    """Sets :attr:`stop` (a ``threading.Event`` for :func:`pbt_rl.runtime.train`'s ``stop``) once
    the metrics under ``run_dir`` hold a window of at least ``seconds`` after ``warmup_seconds``
    over all ``members`` (:func:`population_rate_from_metrics`), checking every ``poll_seconds``
    from a thread of its own while used as a context manager. Metrics not there yet, members
    not yet reporting, or a window still too short are waited for: it never stops a run before
    the whole population's window is measured."""

    def __init__(self, run_dir: Path, members: int, warmup_seconds: float, seconds: float,
                 poll_seconds: float = 1.0) -> None:
        self.run_dir, self.members = Path(run_dir), members
        self.warmup_seconds, self.seconds, self.poll_seconds = warmup_seconds, seconds, poll_seconds
        self.stop = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pbt-bench-window", daemon=True)

    def measured(self) -> bool:
        """Whether the window is measured already (as the metrics are now)."""
        try:
            rate = population_rate_from_metrics(self.run_dir, self.warmup_seconds)
        except (RuntimeError, OSError, RunDirError):  # no metrics yet, the window still empty
            return False
        return rate["members"] >= self.members and rate["window_seconds"] >= self.seconds

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_seconds):
            if self.measured():
                self.stop.set()
                return

    def __enter__(self) -> "WindowWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed.set()
        self._thread.join()
