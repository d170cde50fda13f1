"""TensorBoard logging for a population: one event file stream per member, one for the population.

:class:`TensorBoardPopulationLogger` implements the ``PopulationLogger`` protocol of docs/design.md
(the controller calls it through ``runtime.loggers.Loggers``). Under ``<run.dir>/tensorboard/``:

- ``member_<id>/``: the member's curves, the global step being **the member's env steps** (summed
  over its envs, as everywhere in pbt-rl): ``charts/episodic_return`` and ``charts/episodic_length``
  (means over the episodes that ended since the member's previous report), ``charts/SPS`` (the
  member's env steps per second in that report), ``charts/fitness`` (PBT's score, once it exists),
  ``losses/<name>`` (what the learner reported), ``hp/<name>`` for each searched hyperparameter (its
  value at each report, so the discovered schedule is a curve) and ``pbt/generation``;
- ``population/``: ``pbt/best_fitness``, ``pbt/median_fitness`` (over the members that have a
  fitness) and ``pbt/exploits`` (lineage rows so far), the global step being the **population's env
  steps** (the sum over members), written whenever that sum grows.

Resume. The reader takes a run directory's event files as one stream in file-name order, so each
session writes a new file whose name sorts after every older one. A resumed member continues from
its restore point, and everything it logged after that point is stale (resume dropped those rows
from metrics.jsonl). The new file opens with a ``SessionLog.START`` event at the last row that the
older files surely hold (the last flush state.json recorded, at most the restore point; step 0 when
unknown): TensorBoard drops every older event at that step or later (``purge_orphaned_data``).
The file then holds, again, every metrics.jsonl row from that step on. A member restarted during a
run (its steps go back) gets a ``START`` at its first new step in the same way.

Writing uses TensorBoard's own record writer on the thread that calls the logger (``Loggers``'
worker, never the control loop): a report is one small protobuf record appended to a buffered
file (no thread per file); files are flushed every :data:`FLUSH_SECONDS` and at each
:meth:`~TensorBoardPopulationLogger.state_dict`, whose flushed steps state.json keeps.
"""

from __future__ import annotations

import importlib
import math
import re
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from pbt_rl.config import ConfigError, ExperimentConfig
from pbt_rl.runtime.run_format import LineageRow, MetricsRow, Population
from pbt_rl.runtime.store import RunStore

POPULATION_DIR = "population"
FLUSH_SECONDS = 10.0
EVENT_FILE_PREFIX = "events.out.tfevents."
_EVENT_FILE_TIME = re.compile(r"^events\.out\.tfevents\.(\d+)\.")
WRITER_MODULES = ("tensorboard.compat.proto.event_pb2", "tensorboard.compat.proto.summary_pb2",
                  "tensorboard.summary.writer.record_writer")


def member_dir_name(member: int) -> str:
    return f"member_{member}"


def require_tensorboard() -> None:
    """The ConfigError a run with ``logging.tensorboard: true`` would hit: called before anything is written."""
    try:
        for module in WRITER_MODULES:
            importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"logging.tensorboard is true but TensorBoard cannot be imported ({exc}); "
                          "install it with `pip install 'pbt-rl[tensorboard]'` or set logging.tensorboard=false") from None


class EventFile:
    """A new event file in one writer directory, opened at the first write or restart."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.last_step: int | None = None  # the step of the last point written
        self.flushed_step: int | None = None  # ... and of the last one flushed to the OS
        self._writer: Any = None
        self._flushed_at = time.monotonic()

    def _open(self) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        # A name that sorts after every older file, whatever the clock did (the reader goes in name order).
        older = [int(m.group(1)) for p in self.directory.iterdir() if (m := _EVENT_FILE_TIME.match(p.name))]
        stamp = max([int(time.time())] + [t + 1 for t in older])
        path = self.directory / f"{EVENT_FILE_PREFIX}{stamp:010d}.{socket.gethostname()}.pbt-rl"
        self._writer = RecordWriter(open(path, "ab"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def restart_at(self, step: int) -> None:
        """A ``SessionLog.START`` at ``step``: readers drop what was logged before at ``step`` or later."""
        from tensorboard.compat.proto import event_pb2

        if self._writer is None:
            self._open()
        self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self.last_step = self.flushed_step = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One point of each curve in ``values`` at ``step``; a step not after the last one restarts there."""
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._writer is None:
            self._open()
        if self.last_step is not None and step <= self.last_step:
            self.restart_at(step)  # the member went back (restarted from its checkpoint)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                             for tag, value in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.last_step = step
        if time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self.flushed_step = self.last_step
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def member_scalars(row: MetricsRow, search_space: tuple[str, ...]) -> dict[str, float]:
    """The member's points at ``row.env_steps`` (names in the module docstring)."""
    values: dict[str, float] = {}
    if row.episode_returns:
        values["charts/episodic_return"] = statistics.fmean(row.episode_returns)
    if row.episode_lengths:
        values["charts/episodic_length"] = statistics.fmean(row.episode_lengths)
    if _finite(row.env_steps_per_second):
        values["charts/SPS"] = row.env_steps_per_second
    if _finite(row.fitness):
        values["charts/fitness"] = row.fitness
    for name, value in row.losses.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[f"losses/{name}"] = value
    for name in search_space:
        value = row.hyperparameters.get(name)
        if isinstance(value, (int, float)):
            values[f"hp/{name}"] = value
    if row.generation is not None:
        values["pbt/generation"] = row.generation
    return values


class TensorBoardPopulationLogger:
    """PopulationLogger writing TensorBoard event files (see the module docstring).

    Args:
        config: the experiment; uses ``pbt.search_space`` (the ``hp/*`` curves).
        run_dir: the run directory; files go under ``<run_dir>/tensorboard/``.
    """

    def __init__(self, config: ExperimentConfig, run_dir: Path) -> None:
        require_tensorboard()
        self.store = RunStore(run_dir)
        self.root = self.store.tensorboard_dir
        self.search_space = tuple(spec.name for spec in config.pbt.search_space)
        self._members: dict[int, EventFile] = {}
        self._population: EventFile | None = None
        self._saved_flushed: dict[int, int] = {}  # from state.json: steps surely in the older files
        self._steps: dict[int, int] = {}  # each member's latest env steps ...
        self._fitness: dict[int, float | None] = {}  # ... and fitness
        self._exploits = 0
        self._population_step = -1
        self._started = False

    # -- PopulationLogger -----------------------------------------------------------------

    def start(self, population: dict) -> None:
        """Open one writer per member and the population writer; on resume continue the files."""
        if self._started:
            return
        members = Population.from_dict(population, where="population")
        self.search_space = tuple(members.search_space or self.search_space)
        earlier = self.root.is_dir()  # an earlier session wrote here: this one continues it
        for member in members.members:
            rows = self.store.read_metrics(member) if earlier else []
            self._members[member] = self._continue_member(member, rows, earlier)
            self._steps[member] = rows[-1].env_steps if rows else 0
            self._fitness[member] = rows[-1].fitness if rows else None
        self._exploits = len(self.store.read_lineage()) if earlier else 0
        self._population = EventFile(self.root / POPULATION_DIR)
        if earlier:
            # The population's steps went back with its members: restart at the current sum.
            if self._population.directory.is_dir():
                self._population.restart_at(sum(self._steps.values()))
            self._write_population(force=True)
        self._started = True

    def _continue_member(self, member: int, rows: list[MetricsRow], earlier: bool) -> EventFile:
        events = EventFile(self.root / member_dir_name(member))
        if not earlier:
            return events
        # Rows up to the last flush that state.json recorded are in the older files: restart at the
        # last of them (or at 0 when none is known) and write again from there.
        flushed = self._saved_flushed.get(member, -1)
        trusted = [i for i, row in enumerate(rows) if row.env_steps <= flushed]
        first = trusted[-1] if trusted else 0
        if events.directory.is_dir():
            events.restart_at(rows[first].env_steps if trusted else 0)
        for row in rows[first:]:
            events.scalars(row.env_steps, member_scalars(row, self.search_space))
        return events

    def log_progress(self, row: dict) -> None:
        """One metrics.jsonl row: the member's points at its env steps, and a population point."""
        if not self._started:
            return
        progress = MetricsRow.from_dict(row)
        member = progress.member
        events = self._members.get(member) if member is not None else None
        if events is None:
            return
        events.scalars(progress.env_steps, member_scalars(progress, self.search_space))
        self._steps[member] = progress.env_steps
        self._fitness[member] = progress.fitness
        self._write_population()

    def log_exploit(self, row: dict, checkpoint_path: Path) -> None:
        """A lineage row: one more exploit (the member's new hyperparameters show in its next report)."""
        if not self._started:
            return
        LineageRow.from_dict(row)
        self._exploits += 1

    def log_event(self, row: dict) -> None:
        """Events are not drawn (a restart shows as the member's curve starting again from its step)."""

    def state_dict(self) -> dict:
        """Flush every file; the steps surely on disk, per member (state.json keeps them for resume)."""
        for events in self._files():
            events.flush()
        # Only this session's: its restarts dropped what older files hold past them.
        return {"flushed_env_steps": {str(m): e.flushed_step for m, e in self._members.items()
                                      if e.flushed_step is not None}}

    def load_state_dict(self, state: dict) -> None:
        """Called before start() on resume."""
        raw = state.get("flushed_env_steps") or {}
        self._saved_flushed = {int(m): int(s) for m, s in raw.items()}

    def close(self) -> None:
        for events in self._files():
            events.close()
        self._members, self._population = {}, None
        self._started = False

    # -- helpers ----------------------------------------------------------------------------

    def _files(self) -> list[EventFile]:
        return list(self._members.values()) + ([self._population] if self._population else [])

    def _write_population(self, force: bool = False) -> None:
        step = sum(self._steps.values())
        if self._population is None or (step <= self._population_step and not force):
            return
        self._population_step = step
        values: dict[str, float] = {"pbt/exploits": self._exploits}
        scores = [f for f in self._fitness.values() if _finite(f)]
        if scores:
            values["pbt/best_fitness"] = max(scores)
            values["pbt/median_fitness"] = statistics.median(scores)
        self._population.scalars(step, values)
