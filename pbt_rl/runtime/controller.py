"""The population controller: one process that owns the scheduler, the population table and
every file of the run directory except checkpoints (members write their own).

Exploit consistency (kill -9 at any point)
------------------------------------------
1. A ready member saves a checkpoint, then reports it. The controller records the ready point,
   asks the scheduler, and for an exploit writes the *pending* exploit into state.json before
   sending it (so the donor checkpoint stays pinned on disk).
2. The member loads the donor checkpoint, then sets the explored hyperparameters, and replies
   ``applied``. Only then does the controller append the lineage row (fsynced), then rewrite
   state.json with the member's new restore point (donor checkpoint + new hyperparameters).
3. On resume, lineage rows newer than a member's generation in state.json (a kill between the
   two writes) are applied to the state; a pending exploit with no lineage row is dropped (the
   member restarts from its own checkpoint, as if it had continued). So lineage has exactly one
   row per applied exploit, and state.json never claims an exploit lineage lacks (recovery.py).

Members restart from their restore point: the checkpoint they last saved (or the donor checkpoint
of their last exploit, with its explored hyperparameters). Progress reported after that point is
lost on a crash; resume drops those metrics rows so every step counter in the files only grows.

A run directory is created whole (store.py) and held by one controller at a time (run_lock.py);
a member that stops sending messages is treated as crashed (watchdog.py), and failures.py
restarts, re-seeds or abandons a member that failed.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Iterable

from pbt_rl.config import ExperimentConfig, dump_yaml
from pbt_rl.runtime.backend import Backend, MemberHandle, make_backend
from pbt_rl.runtime.console import ConsoleProgress
from pbt_rl.runtime import protocol
from pbt_rl.runtime.member import MemberSpec, Restore
from pbt_rl.runtime.population import fresh_population, read_population
from pbt_rl.runtime.records import STATE_FORMAT, MemberRecord
from pbt_rl.runtime.failures import FailureHandling
from pbt_rl.runtime.recovery import apply_lineage_row
from pbt_rl.runtime.loggers import Loggers
from pbt_rl.runtime.resources import member_devices, threads_per_member
from pbt_rl.runtime.store import RunStore
from pbt_rl.runtime.summary import build_summary, outcome_lines, population_row
from pbt_rl.runtime.watchdog import SilenceWatch
from pbt_rl.scheduler import Continue, Exploit, Scheduler

POLL_SECONDS = 0.2


class Controller(FailureHandling):
    """Runs one population to its budget (see the module docstring for the consistency rules;
    failures.py for what happens to a member that fails or goes silent)."""

    def __init__(
        self,
        config: ExperimentConfig,
        store: RunStore,
        *,
        state: dict | None = None,
        console: bool = True,
        loggers: Iterable[Any] = (),
        backend: Backend | None = None,
        stop: threading.Event | None = None,
    ):
        self.config = config
        self.stop = stop  # set by another thread: the run ends as at its wall-time limit
        self.store = store
        self.loggers = Loggers(loggers, store.logging_staging_dir)
        self.backend = backend or make_backend(config.run.backend, config)
        self.scheduler = Scheduler(config.pbt, seed=config.run.seed)
        self.names = tuple(spec.name for spec in config.pbt.search_space)
        self.window = max(config.pbt.fitness_window, config.pbt.min_episodes)
        self.handles: dict[int, MemberHandle] = {}
        self.pending: dict[int, Exploit] = {}
        self.pending_kind: dict[int, str] = {}
        self.started = time.monotonic()
        self.stopping = False
        self.watch = SilenceWatch(config.run.hang_timeout_factor, config.run.hang_timeout_min_seconds)
        self.console = ConsoleProgress(config.logging.console_interval_seconds, config.run.total_env_steps,
                                       self.names, enabled=console, max_wall_seconds=config.run.max_wall_seconds)
        self.devices = member_devices(config)
        self.threads = threads_per_member(config.pbt.population_size, config.run.total_threads, config.env.num_threads)
        self.resumed = state is not None
        population = (read_population(store, config, self.scheduler, state) if self.resumed
                      else fresh_population(config, self.scheduler))
        self.records = population.records
        self.population_info = population.info
        self.wall_offset = population.wall_seconds
        self.resumes = population.resumes
        self._logger_states = population.logger_states or []
        if self.resumed:
            population.reconcile(store, self._event)

    # ------------------------------------------------------------------ set-up

    def initial_files(self) -> dict[str, bytes]:
        """What a fresh run directory holds before any member starts (RunStore.create writes it whole)."""
        return self.store.initial_files(dump_yaml(self.config), self.population_info, self._state())

    # ------------------------------------------------------------------ persistence

    def wall_seconds(self) -> float:
        return self.wall_offset + time.monotonic() - self.started

    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "time": time.time(),
            "wall_seconds": self.wall_seconds(),
            "resumes": self.resumes,
            "members": {str(i): r.to_dict() for i, r in self.records.items()},
            "pending": {str(i): {**d.to_dict(), "generation": self.records[i].generation + 1,
                                 "kind": self.pending_kind.get(i, "exploit")} for i, d in self.pending.items()},
            "scheduler": self.scheduler.state_dict(),
            "loggers": self.loggers.state_dicts(),
        }

    def _save_state(self) -> None:
        self.store.write_json(self.store.state_path, self._state())

    def _pinned(self) -> set[str]:
        pinned = {c for r in self.records.values() for c in (r.checkpoint_id, r.restore.checkpoint) if c}
        pinned.update(d.donor_checkpoint for d in self.pending.values())
        return pinned

    def _prune(self, member_id: int) -> None:
        self.store.prune_checkpoints(member_id, self.config.run.checkpoint_keep, self._pinned())

    def _event(self, event: str, member: int | None = None, **fields: Any) -> None:
        row = {"time": time.time(), "wall_seconds": self.wall_seconds(), "event": event, "member": member, **fields}
        self.store.append(self.store.events_path, row)
        self.loggers.event(row)

    # ------------------------------------------------------------------ members

    def _spec(self, record: MemberRecord) -> MemberSpec:
        return MemberSpec(member_id=record.member_id, seed=record.seed, config=self.config,
                          run_dir=str(self.store.root), restore=record.restore, device=self.devices[record.member_id],
                          num_threads=self.threads)

    def _launch(self, record: MemberRecord) -> None:
        record.status = "starting"
        self.handles[record.member_id] = self.backend.start(self._spec(record))
        self.watch.launched(record.member_id, time.monotonic())

    def _send(self, member_id: int, message: tuple) -> None:
        handle = self.handles.get(member_id)
        if handle is None or not handle.send(message):
            self._on_failure(member_id, "the member's pipe is closed")
        else:
            self.watch.commanded(member_id, time.monotonic())

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict:
        try:
            self._start()
            while not self._over():
                live = [h for h in self.handles.values()]
                self.backend.wait(live, POLL_SECONDS)
                for member_id in list(self.handles):
                    handle = self.handles.get(member_id)
                    if handle is None:
                        continue
                    for message in handle.poll():
                        self._handle(member_id, message)
                        if self.handles.get(member_id) is not handle:
                            break  # the member was restarted; later messages were from the old one
                self._check_silence()
                if self.config.pbt.mode == "sync":
                    self._maybe_decide_generation()
                self.console.maybe_print(self.wall_seconds(), self._table())
                limit = self.config.run.max_wall_seconds
                if limit and time.monotonic() - self.started >= limit:
                    self._event("wall_time_limit", seconds=limit)
                    break
                if self.stop is not None and self.stop.is_set():
                    self._event("stop_requested")
                    break
            return self._finish()
        finally:
            self.stopping = True
            self.console.close()  # gives the terminal back (the live view) before anything else
            self.backend.close()
            self.handles.clear()
            self.loggers.close()

    def _start(self) -> None:
        self.loggers.start(self.population_info, self._logger_states if self.resumed else None)
        if self.resumed:
            self._event("resumed", steps={str(i): r.env_steps for i, r in self.records.items()})
            for record in self.records.values():
                if record.abandoned:  # a resume is the user's "try again"
                    record.abandoned, record.failures = False, 0
                    self._event("member_retried", record.member_id, detail="abandoned before; resume retries it")
        self._save_state()
        self.console.start(sum(r.env_steps for r in self.records.values()))
        for record in self.records.values():
            if not (record.done or record.abandoned):
                self._launch(record)
            else:
                record.status = "done" if record.done else "abandoned"

    def _over(self) -> bool:
        """No member is left to train (each one finished or was abandoned)."""
        return all(r.done or r.abandoned for r in self.records.values())

    def _table(self) -> list[dict]:
        return [{"member": r.member_id, "env_steps": r.env_steps, "score": self._fitness(r),
                 "generation": r.generation, "status": r.status, "hyperparameters": r.hyperparameters}
                for r in self.records.values()]

    def _fitness(self, record: MemberRecord) -> float:
        return self.scheduler.fitness(record.member_state())

    # ------------------------------------------------------------------ messages

    def _handle(self, member_id: int, message: protocol.MemberMessage) -> None:
        record = self.records[member_id]
        if not isinstance(message, (protocol.Started, protocol.Exited, protocol.Failed)):
            # Started does not end the start-up allowance: the first training call (env reset,
            # first kernels, cuDNN autotuning) belongs to start-up too (watchdog.py).
            self.watch.heard(member_id, time.monotonic(), waits=isinstance(message, (protocol.Ready, protocol.Done)))
        if isinstance(message, protocol.Started):
            record.status = "training"
            if self.pending_kind.get(member_id) == "reseed":
                self._commit(member_id, message.hyperparameters, message.weights_sha256)
        elif isinstance(message, protocol.Progress):
            self._record_progress(record, message)
        elif isinstance(message, (protocol.Ready, protocol.Done)):
            self._record_progress(record, message)
            record.checkpoint_id = message.checkpoint
            record.restore = Restore(message.checkpoint, record.env_steps, record.updates, None)
            record.failures = 0
            if isinstance(message, protocol.Done):
                record.done, record.status = True, "done"
                record.score_history.append((record.env_steps, self._fitness(record)))
                self._save_state()
                self._prune(member_id)
                self.handles.pop(member_id, None)
                self.watch.forget(member_id)
            else:
                self._on_ready(record)
        elif isinstance(message, protocol.Applied):
            self._commit(member_id, message.hyperparameters, message.weights_sha256)
        elif isinstance(message, protocol.ExploitFailed):
            self.pending.pop(member_id, None)
            self.pending_kind.pop(member_id, None)
            record.status = "training"
            self._event("exploit_failed", member_id, donor_checkpoint=message.donor_checkpoint, error=message.error)
            self._save_state()
        elif isinstance(message, protocol.Failed):
            self._on_failure(member_id, message.error, diverged=message.diverged, traceback=message.traceback)
        elif isinstance(message, protocol.Exited):
            if not (record.done or self.stopping):
                self._on_failure(member_id, f"member process exited (exit code {message.exitcode})")

    def _record_progress(self, record: MemberRecord, report: protocol.Report) -> None:
        record.env_steps = int(report.env_steps)
        record.updates = int(report.updates)
        record.hyperparameters = dict(report.hyperparameters)
        record.env_steps_per_second = float(report.env_steps_per_second)
        record.episode_returns = (record.episode_returns + list(report.episode_returns))[-self.window:]
        fitness = self._fitness(record)
        row = {"time": time.time(), "wall_seconds": self.wall_seconds(), "member": record.member_id,
               "env_steps": record.env_steps, "updates": record.updates,
               "fitness": fitness if math.isfinite(fitness) else None,
               "episode_returns": list(report.episode_returns), "episode_lengths": list(report.episode_lengths),
               "losses": report.losses, "env_steps_per_second": record.env_steps_per_second,
               "hyperparameters": record.hyperparameters, "generation": record.generation}
        if report.timing_seconds:
            row["timing_seconds"] = report.timing_seconds
        self.store.append(self.store.metrics_path(record.member_id), row)
        self.loggers.progress(row)

    def _mark_ready_point(self, record: MemberRecord) -> bool:
        """Scheduler contract: when ready, record (env_steps, fitness) and the ready point."""
        state = record.member_state()
        if not self.scheduler.is_ready(state):
            return False
        record.score_history.append((record.env_steps, self.scheduler.fitness(state)))
        record.last_ready_steps = record.env_steps
        return True

    def _on_ready(self, record: MemberRecord) -> None:
        if self.config.pbt.mode == "sync":
            record.status = "waiting"
            self._save_state()
            self._prune(record.member_id)
            return
        if self._mark_ready_point(record):
            decision = self.scheduler.decide(record.member_id, {i: r.member_state() for i, r in self.records.items()})
        else:
            decision = Continue(record.member_id, record.env_steps, "not ready")
        self._apply(decision)
        self._prune(record.member_id)
        self._log_population()

    def _maybe_decide_generation(self) -> None:
        active = [r for r in self.records.values() if not (r.done or r.abandoned)]
        if not active or any(r.status != "waiting" for r in active):
            return
        ready = {r.member_id for r in active if self._mark_ready_point(r)}
        decisions = self.scheduler.decide_generation({i: r.member_state() for i, r in self.records.items()})
        for record in active:
            decision = decisions.get(record.member_id)
            if record.member_id not in ready or decision is None:
                decision = Continue(record.member_id, record.env_steps, "not ready")
            self._apply(decision)
        self._log_population()

    def _log_population(self) -> None:
        if self.loggers.started:
            self.loggers.population(population_row(self.records, self._fitness, self.wall_seconds()))

    def _apply(self, decision: Continue | Exploit) -> None:
        member_id = decision.member_id
        if isinstance(decision, Exploit):
            self.pending[member_id] = decision
            self.pending_kind[member_id] = "exploit"
            self.records[member_id].status = "exploiting"
            self._save_state()  # pins the donor checkpoint before the member may load it
            self._send(member_id, protocol.Exploit(decision.donor_checkpoint, decision.new_hyperparameters))
        else:
            self.records[member_id].status = "training"
            self._save_state()
            self._send(member_id, protocol.Continue())

    def _commit(self, member_id: int, applied_hyperparameters: dict, weights_sha256: str) -> None:
        """The member confirmed the exploit: lineage row first, then the state (see module doc)."""
        decision = self.pending.pop(member_id)
        kind = self.pending_kind.pop(member_id, "exploit")
        record = self.records[member_id]
        row = {
            "time": time.time(), "wall_seconds": self.wall_seconds(), "member": member_id,
            "env_steps": decision.env_steps, "generation": record.generation + 1,
            "donor": decision.donor_id, "donor_checkpoint": decision.donor_checkpoint,
            "donor_env_steps": decision.donor_env_steps,
            "old_hyperparameters": decision.old_hyperparameters, "new_hyperparameters": decision.new_hyperparameters,
            "operations": decision.operations,
            "member_score": decision.member_score, "donor_score": decision.donor_score,
            "exploit": self.config.pbt.exploit if kind == "exploit" else kind,
            "applied_hyperparameters": applied_hyperparameters,
            "weights_sha256": weights_sha256,
        }
        self.store.append(self.store.lineage_path, row)
        apply_lineage_row(record, row)
        record.status = "training"
        self._save_state()
        self.loggers.exploit(row, self.store.path(decision.donor_checkpoint))

    # ------------------------------------------------------------------ end

    def _finish(self) -> dict:
        self.stopping = True
        for member_id, handle in list(self.handles.items()):
            handle.send(protocol.Stop())
        self._save_state()
        summary = build_summary(self.records, self._fitness, len(self.store.read_lineage()),
                                self.wall_seconds())
        self.store.write_json(self.store.summary_path, summary)
        self.console.print_table(self.wall_seconds(), self._table(), final=True)
        if self.console.enabled:
            print("\n".join(outcome_lines(summary, self.names, str(self.store.root))))
        if self._over() and self.config.logging.report:
            self._write_report()
        return summary

    def _write_report(self) -> None:
        try:
            from pbt_rl.report import write_report
        except ImportError:
            return
        try:
            write_report(self.store.root)
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded; the plots are extra
            print(f"pbt-rl: warning: report not written: {type(exc).__name__}: {exc}")
