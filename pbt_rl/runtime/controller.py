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
   row per applied exploit, and state.json never claims an exploit lineage lacks.

Members restart from their restore point: the checkpoint they last saved (or the donor checkpoint
of their last exploit, with its explored hyperparameters). Progress reported after that point is
lost on a crash; resume drops those metrics rows so every step counter in the files only grows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pbt_rl.config import ExperimentConfig, dump_yaml, load_config, tunable_agent_fields
from pbt_rl.runtime.backend import Backend, MemberHandle, make_backend
from pbt_rl.runtime.console import ConsoleProgress, format_hyperparameters, format_score
from pbt_rl.runtime.member import DEFAULT_LEARNER_FACTORY, MemberSpec, Restore
from pbt_rl.runtime.resources import cuda_device_count, member_device, threads_per_member
from pbt_rl.runtime.store import RunDirError, RunStore, atomic_write_bytes, read_jsonl, repair_jsonl, rewrite_jsonl
from pbt_rl.scheduler import Continue, Exploit, MemberState, Scheduler

STATE_FORMAT = 1
MAX_RESTARTS = 3  # restarts from the same checkpoint before the member is re-seeded from a donor
MAX_FAILURES = 10  # consecutive failures after which a member is abandoned (the run goes on)
POLL_SECONDS = 0.2


def member_seed(run_seed: int, member_id: int) -> int:
    """Independent, reproducible seed per member."""
    return int(np.random.SeedSequence([run_seed, member_id]).generate_state(1)[0])


@dataclass
class MemberRecord:
    """The controller's bookkeeping for one member (what state.json stores per member)."""

    member_id: int
    seed: int
    hyperparameters: dict
    env_steps: int = 0
    updates: int = 0
    last_ready_steps: int = 0
    episode_returns: list = field(default_factory=list)
    score_history: list = field(default_factory=list)
    checkpoint_id: str | None = None  # what a copier loads (own latest, or the donor's after an exploit)
    restore: Restore = field(default_factory=Restore)
    generation: int = 0
    failures: int = 0
    done: bool = False
    abandoned: bool = False
    # Not saved: live status of the process.
    status: str = "starting"
    env_steps_per_second: float = 0.0
    last_error: str = ""

    SAVED = ("member_id", "seed", "hyperparameters", "env_steps", "updates", "last_ready_steps", "episode_returns",
             "score_history", "checkpoint_id", "generation", "failures", "done", "abandoned")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.SAVED}
        out["restore"] = self.restore.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "MemberRecord":
        record = cls(**{name: raw[name] for name in cls.SAVED if name in raw})
        record.restore = Restore.from_dict(raw.get("restore") or {})
        record.score_history = [tuple(entry) for entry in record.score_history]
        return record

    def member_state(self) -> MemberState:
        return MemberState(
            member_id=self.member_id,
            env_steps=self.env_steps,
            last_ready_steps=self.last_ready_steps,
            episode_returns=tuple(self.episode_returns),
            score_history=tuple((int(s), math.nan if f is None else float(f)) for s, f in self.score_history),
            hyperparameters=dict(self.hyperparameters),
            checkpoint_id=self.checkpoint_id,
        )


class Controller:
    """Runs one population to its budget (see the module docstring for the consistency rules)."""

    def __init__(
        self,
        config: ExperimentConfig,
        store: RunStore,
        *,
        state: dict | None = None,
        console: bool = True,
        loggers: Iterable[Any] = (),
        backend: Backend | None = None,
        learner_factory: str = DEFAULT_LEARNER_FACTORY,
    ):
        self.config = config
        self.store = store
        self.loggers = list(loggers)
        self.backend = backend or make_backend(config.run.backend)
        self.learner_factory = learner_factory
        self.scheduler = Scheduler(config.pbt, seed=config.run.seed)
        self.names = tuple(spec.name for spec in config.pbt.search_space)
        self.window = max(config.pbt.fitness_window, config.pbt.min_episodes)
        self.handles: dict[int, MemberHandle] = {}
        self.pending: dict[int, Exploit] = {}
        self.pending_kind: dict[int, str] = {}
        self.started = time.monotonic()
        self.wall_offset = 0.0
        self.population_info: dict = {}
        self.stopping = False
        self.resumes = 0
        self.loggers_started = False
        self.console = ConsoleProgress(config.logging.console_interval_seconds, config.run.total_env_steps,
                                       self.names, enabled=console, max_wall_seconds=config.run.max_wall_seconds)
        self.cuda_count = cuda_device_count() if config.agent.device != "cpu" else 0
        self.threads = threads_per_member(config.pbt.population_size, config.run.total_threads, config.env.num_threads)
        if state is None:
            self.records = self._fresh_records()
            self.resumed = False
        else:
            self._load_state(state)
            self.resumed = True

    # ------------------------------------------------------------------ set-up

    def _fresh_records(self) -> dict[int, MemberRecord]:
        base = {name: getattr(self.config.agent, name) for name in tunable_agent_fields()}
        initial = self.scheduler.initial_hyperparameters(base, self.config.pbt.population_size)
        records = {}
        for member_id, values in enumerate(initial):
            records[member_id] = MemberRecord(member_id, member_seed(self.config.run.seed, member_id), dict(values))
            records[member_id].restore = Restore(None, 0, 0, dict(values))
        self.population_info = {
            "members": {str(i): {"seed": r.seed, "hyperparameters": r.hyperparameters} for i, r in records.items()},
            "search_space": list(self.names),
            "created": time.time(),
        }
        return records

    def _load_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise RunDirError(f"{self.store.state_path}: unknown state format {state.get('format')!r}")
        self.records = {int(k): MemberRecord.from_dict(v) for k, v in state["members"].items()}
        self.scheduler.load_state_dict(state["scheduler"])
        self.wall_offset = float(state.get("wall_seconds", 0.0))
        self.resumes = int(state.get("resumes", 0)) + 1
        self._logger_states = state.get("loggers", [])
        self.population_info = self.store.read_json(self.store.population_path)
        pending = {int(k): v for k, v in state.get("pending", {}).items()}
        self._reconcile(pending)

    def _reconcile(self, pending: dict[int, dict]) -> None:
        """Make the state agree with lineage.jsonl and the checkpoints on disk after a stop."""
        for path in [self.store.lineage_path, self.store.events_path] + [self.store.metrics_path(i) for i in self.records]:
            repair_jsonl(path)
        for row in read_jsonl(self.store.lineage_path):
            record = self.records.get(int(row["member"]))
            if record is not None and int(row["generation"]) > record.generation:
                self._commit_to_record(record, row)
                self._event("exploit_recovered", record.member_id, generation=row["generation"],
                            detail="lineage row written just before the stop; applied to the state")
        for member_id, raw in pending.items():
            record = self.records[member_id]
            if int(raw["generation"]) > record.generation:
                self._event("exploit_dropped", member_id, donor=raw.get("donor_id"),
                            detail="decided but not applied before the stop; the member continues from its checkpoint")
        for record in self.records.values():
            if record.done or record.abandoned:
                continue
            self._ensure_restorable(record)
            # Work reported after the restore point is lost: drop it so step counters only grow.
            restore_steps = record.restore.env_steps
            record.env_steps = restore_steps
            record.updates = record.restore.updates
            record.last_ready_steps = min(record.last_ready_steps, restore_steps)
            record.score_history = [e for e in record.score_history if e[0] <= restore_steps]
            metrics_path = self.store.metrics_path(record.member_id)
            rows = read_jsonl(metrics_path)
            kept = [r for r in rows if r["env_steps"] <= restore_steps]
            if len(kept) < len(rows):
                rewrite_jsonl(metrics_path, kept)

    def _ensure_restorable(self, record: MemberRecord) -> None:
        """Fall back to the newest good own checkpoint when the restore checkpoint is damaged."""
        checkpoint = record.restore.checkpoint
        if checkpoint is None or self.store.verify_checkpoint(checkpoint):
            return
        self._event("checkpoint_corrupt", record.member_id, checkpoint=checkpoint)
        older = [c for c in self.store.list_checkpoints(record.member_id)
                 if c != checkpoint and RunStore.checkpoint_env_steps(c) <= record.restore.env_steps]
        for candidate in reversed(older):
            if self.store.verify_checkpoint(candidate):
                meta = self.store.load_checkpoint(candidate)["member"]
                record.restore = Restore(candidate, int(meta["env_steps"]), int(meta.get("updates", 0)), None)
                record.hyperparameters = dict(meta["hyperparameters"])
                record.checkpoint_id = candidate
                record.episode_returns = []
                self._event("checkpoint_fallback", record.member_id, checkpoint=candidate)
                return
        initial = self.population_info["members"][str(record.member_id)]["hyperparameters"]
        record.restore = Restore(None, 0, 0, dict(initial))
        record.hyperparameters = dict(initial)
        record.checkpoint_id = None
        record.episode_returns = []
        record.last_ready_steps = 0
        self._event("checkpoint_fallback", record.member_id, checkpoint=None, detail="no good checkpoint: restarting fresh")

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
            "loggers": [self._call_logger(lg, "state_dict") or {} for lg in self.loggers],
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
        for logger in self.loggers if self.loggers_started else ():
            self._call_logger(logger, "log_event", row)

    def _call_logger(self, logger: Any, method: str, *args: Any) -> Any:
        """A logger failure (network, W&B quota) must not stop training; it is reported once per method."""
        try:
            return getattr(logger, method)(*args)
        except Exception as exc:  # noqa: BLE001
            key = (id(logger), method)
            warned = self.__dict__.setdefault("_logger_warned", set())
            if key not in warned:
                warned.add(key)
                print(f"pbt-rl: warning: {type(logger).__name__}.{method} failed: {type(exc).__name__}: {exc}")
            return None

    # ------------------------------------------------------------------ members

    def _spec(self, record: MemberRecord) -> MemberSpec:
        device = member_device(self.config.agent.device, record.member_id, self.config.run.members_per_gpu,
                               self.cuda_count)
        return MemberSpec(member_id=record.member_id, seed=record.seed, config=self.config,
                          run_dir=str(self.store.root), restore=record.restore, device=device,
                          num_threads=self.threads, learner_factory=self.learner_factory)

    def _launch(self, record: MemberRecord) -> None:
        record.status = "starting"
        self.handles[record.member_id] = self.backend.start(self._spec(record))

    def _send(self, member_id: int, message: tuple) -> None:
        handle = self.handles.get(member_id)
        if handle is None or not handle.send(message):
            self._on_failure(member_id, "the member's pipe is closed")

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict:
        try:
            self._start()
            while not self._finished():
                live = [h for h in self.handles.values()]
                self.backend.wait(live, POLL_SECONDS)
                for member_id in list(self.handles):
                    handle = self.handles.get(member_id)
                    if handle is None:
                        continue
                    for message in handle.poll():
                        self._handle(member_id, *message)
                        if self.handles.get(member_id) is not handle:
                            break  # the member was restarted; later messages were from the old one
                if self.config.pbt.mode == "sync":
                    self._maybe_decide_generation()
                self.console.maybe_print(self.wall_seconds(), self._table())
                limit = self.config.run.max_wall_seconds
                if limit and time.monotonic() - self.started >= limit:
                    self._event("wall_time_limit", seconds=limit)
                    break
            return self._finish()
        finally:
            self.stopping = True
            self.backend.close()
            self.handles.clear()
            for logger in self.loggers:
                self._call_logger(logger, "close")

    def _start(self) -> None:
        if self.resumed:
            for logger, state in zip(self.loggers, getattr(self, "_logger_states", [])):
                self._call_logger(logger, "load_state_dict", state)
        else:
            self.store.write_json(self.store.population_path, self.population_info)
        for logger in self.loggers:
            self._call_logger(logger, "start", self.population_info)
        self.loggers_started = True
        if self.resumed:
            self._event("resumed", steps={str(i): r.env_steps for i, r in self.records.items()})
        self._save_state()
        self.console.start(sum(r.env_steps for r in self.records.values()))
        for record in self.records.values():
            if not (record.done or record.abandoned):
                self._launch(record)
            else:
                record.status = "done" if record.done else "abandoned"

    def _finished(self) -> bool:
        return all(r.done or r.abandoned for r in self.records.values())

    def _table(self) -> list[dict]:
        return [{"member": r.member_id, "env_steps": r.env_steps, "score": self._fitness(r),
                 "generation": r.generation, "status": r.status, "hyperparameters": r.hyperparameters}
                for r in self.records.values()]

    def _fitness(self, record: MemberRecord) -> float:
        return self.scheduler.fitness(record.member_state())

    # ------------------------------------------------------------------ messages

    def _handle(self, member_id: int, kind: str, payload: dict) -> None:
        record = self.records[member_id]
        if kind == "started":
            record.status = "training"
            if self.pending_kind.get(member_id) == "reseed":
                self._commit(member_id, payload)
        elif kind == "progress":
            self._record_progress(record, payload)
        elif kind in ("ready", "done"):
            self._record_progress(record, payload)
            record.checkpoint_id = payload["checkpoint"]
            record.restore = Restore(payload["checkpoint"], record.env_steps, record.updates, None)
            record.failures = 0
            if kind == "done":
                record.done, record.status = True, "done"
                record.score_history.append((record.env_steps, self._fitness(record)))
                self._save_state()
                self._prune(member_id)
                self.handles.pop(member_id, None)
            else:
                self._on_ready(record)
        elif kind == "applied":
            self._commit(member_id, payload)
        elif kind == "exploit_failed":
            self.pending.pop(member_id, None)
            self.pending_kind.pop(member_id, None)
            record.status = "training"
            self._event("exploit_failed", member_id, **payload)
            self._save_state()
        elif kind == "failed":
            record.last_error = payload.get("error", "")
            self._on_failure(member_id, record.last_error, diverged=bool(payload.get("diverged")),
                             traceback=payload.get("traceback", ""))
        elif kind == "exited":
            if not (record.done or self.stopping):
                self._on_failure(member_id, f"member process exited (exit code {payload.get('exitcode')})")

    def _record_progress(self, record: MemberRecord, payload: dict) -> None:
        record.env_steps = int(payload["env_steps"])
        record.updates = int(payload["updates"])
        record.hyperparameters = dict(payload["hyperparameters"])
        record.env_steps_per_second = float(payload.get("env_steps_per_second", 0.0))
        record.episode_returns = (record.episode_returns + list(payload["episode_returns"]))[-self.window:]
        fitness = self._fitness(record)
        row = {"time": time.time(), "wall_seconds": self.wall_seconds(), "member": record.member_id,
               "env_steps": record.env_steps, "updates": record.updates,
               "fitness": fitness if math.isfinite(fitness) else None,
               "episode_returns": list(payload["episode_returns"]), "episode_lengths": list(payload["episode_lengths"]),
               "losses": payload.get("losses", {}), "env_steps_per_second": record.env_steps_per_second,
               "hyperparameters": record.hyperparameters, "generation": record.generation}
        if "timing_seconds" in payload:
            row["timing_seconds"] = payload["timing_seconds"]
        self.store.append(self.store.metrics_path(record.member_id), row)
        for logger in self.loggers:
            self._call_logger(logger, "log_progress", row)

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

    def _apply(self, decision: Continue | Exploit) -> None:
        member_id = decision.member_id
        if isinstance(decision, Exploit):
            self.pending[member_id] = decision
            self.pending_kind[member_id] = "exploit"
            self.records[member_id].status = "exploiting"
            self._save_state()  # pins the donor checkpoint before the member may load it
            self._send(member_id, ("exploit", {"checkpoint": decision.donor_checkpoint,
                                               "hyperparameters": decision.new_hyperparameters}))
        else:
            self.records[member_id].status = "training"
            self._save_state()
            self._send(member_id, ("continue", {}))

    def _commit(self, member_id: int, payload: dict) -> None:
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
            "applied_hyperparameters": payload.get("hyperparameters"),
            "weights_sha256": payload.get("weights_sha256"),
        }
        self.store.append(self.store.lineage_path, row)
        self._commit_to_record(record, row)
        record.status = "training"
        self._save_state()
        for logger in self.loggers:
            self._call_logger(logger, "log_exploit", row, self.store.path(decision.donor_checkpoint))

    def _commit_to_record(self, record: MemberRecord, row: dict) -> None:
        record.generation = int(row["generation"])
        record.hyperparameters = dict(row["new_hyperparameters"])
        record.episode_returns = []
        record.checkpoint_id = row["donor_checkpoint"]
        record.env_steps = int(row["env_steps"])
        record.restore = Restore(row["donor_checkpoint"], int(row["env_steps"]), record.updates,
                                 dict(row["new_hyperparameters"]))

    # ------------------------------------------------------------------ failures

    def _on_failure(self, member_id: int, error: str, diverged: bool = False, traceback: str = "") -> None:
        handle = self.handles.pop(member_id, None)
        if handle is not None:
            handle.kill()
        record = self.records[member_id]
        if record.done or self.stopping:
            return
        record.failures += 1
        dropped = self.pending.pop(member_id, None)
        kind = self.pending_kind.pop(member_id, None)
        self._event("member_failed", member_id, env_steps=record.env_steps, error=error, diverged=diverged,
                    failures=record.failures, traceback=traceback[-4000:],
                    dropped_exploit=None if dropped is None else kind)
        if record.failures >= MAX_FAILURES:
            record.abandoned, record.status = True, "abandoned"
            self._event("member_abandoned", member_id, failures=record.failures)
            self._save_state()
            return
        if diverged or record.failures > MAX_RESTARTS or record.restore.checkpoint is None and record.failures > 1:
            reseed = self._reseed_decision(record)
            if reseed is not None:
                self.pending[member_id] = reseed
                self.pending_kind[member_id] = "reseed"
                self._save_state()
                saved = record.restore
                record.restore = Restore(reseed.donor_checkpoint, record.restore.env_steps, record.restore.updates,
                                         dict(reseed.new_hyperparameters))
                self._event("member_reseeded", member_id, donor=reseed.donor_id, checkpoint=reseed.donor_checkpoint)
                self._launch(record)
                record.restore = saved  # the new restore point counts only once the member confirms it
                return
        # Roll back to the restore point (what a restarted member will report from).
        record.env_steps = record.restore.env_steps
        record.updates = record.restore.updates
        self._event("member_restarted", member_id, checkpoint=record.restore.checkpoint,
                    env_steps=record.restore.env_steps)
        self._save_state()
        self._launch(record)

    def _reseed_decision(self, record: MemberRecord) -> Exploit | None:
        """Copy the best other member (by current fitness) that has a checkpoint, explored."""
        candidates = [(self._fitness(r), r) for r in self.records.values()
                      if r.member_id != record.member_id and r.checkpoint_id and not r.abandoned]
        candidates = [(f if math.isfinite(f) else -math.inf, r) for f, r in candidates]
        if not candidates:
            return None
        score, donor = max(candidates, key=lambda c: (c[0], -c[1].member_id))
        rng = np.random.default_rng([self.config.run.seed, record.member_id, record.failures, record.generation])
        new, operations = self.scheduler.search_space.explore(
            donor.hyperparameters, rng, self.config.pbt.explore, self.config.pbt.resample_probability)
        return Exploit(member_id=record.member_id, env_steps=record.restore.env_steps, donor_id=donor.member_id,
                       donor_checkpoint=donor.checkpoint_id, donor_env_steps=donor.env_steps,
                       old_hyperparameters=dict(record.hyperparameters), new_hyperparameters=new,
                       operations=operations, member_score=self._fitness(record), donor_score=score)

    # ------------------------------------------------------------------ end

    def _summary(self) -> dict:
        members = {}
        for r in self.records.values():
            score = self._fitness(r)
            members[str(r.member_id)] = {
                "score": score if math.isfinite(score) else None, "env_steps": r.env_steps,
                "generation": r.generation, "hyperparameters": r.hyperparameters,
                "checkpoint": r.checkpoint_id, "status": "done" if r.done else ("abandoned" if r.abandoned else "stopped"),
            }
        scored = [(v["score"], int(k)) for k, v in members.items() if v["score"] is not None]
        best = max(scored, key=lambda s: (s[0], -s[1]))[1] if scored else None
        lineage = read_jsonl(self.store.lineage_path)
        return {
            "best_member": best,
            "best_score": None if best is None else members[str(best)]["score"],
            "best_env_steps": None if best is None else members[str(best)]["env_steps"],
            "best_hyperparameters": None if best is None else members[str(best)]["hyperparameters"],
            "best_checkpoint": None if best is None else members[str(best)]["checkpoint"],
            "finished": self._finished(),
            "exploits": len(lineage),
            "wall_seconds": self.wall_seconds(),
            "members": members,
        }

    def _finish(self) -> dict:
        self.stopping = True
        for member_id, handle in list(self.handles.items()):
            handle.send(("stop", {}))
        self._save_state()
        summary = self._summary()
        self.store.write_json(self.store.summary_path, summary)
        self.console.print_table(self.wall_seconds(), self._table(), final=True)
        if self.console.enabled:
            if summary["best_member"] is None:
                print("No member has a score yet (too few finished episodes).")
            else:
                print(f"Best member: {summary['best_member']} score {format_score(summary['best_score']).strip()} "
                      f"at {summary['best_env_steps']:,} env steps "
                      f"({format_hyperparameters(summary['best_hyperparameters'], self.names)}); "
                      f"{summary['exploits']} exploits; run directory {self.store.root}")
        if summary["finished"] and self.config.logging.report:
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


# ---------------------------------------------------------------------- entry points


def default_loggers(config: ExperimentConfig, run_dir: Path) -> list[Any]:
    """The W&B logger when ``logging.wandb`` is on (imported only then)."""
    if config.logging.wandb == "disabled":
        return []
    try:
        from pbt_rl.wandb_logger import WandbPopulationLogger
    except ImportError as exc:
        print(f"pbt-rl: warning: W&B logging is off: {exc}")
        return []
    return [WandbPopulationLogger(config, run_dir)]


def train(config: ExperimentConfig, console: bool = True, *, loggers: Iterable[Any] | None = None,
          backend: Backend | None = None, learner_factory: str = DEFAULT_LEARNER_FACTORY) -> dict:
    """Train a population from scratch into ``config.run_dir``; return the summary (summary.json)."""
    store = RunStore(config.run_dir)
    store.create(config.pbt.population_size)
    atomic_write_bytes(store.config_path, dump_yaml(config).encode())
    if loggers is None:
        loggers = default_loggers(config, store.root)
    controller = Controller(config, store, console=console, loggers=loggers, backend=backend,
                            learner_factory=learner_factory)
    if console:
        print(f"Training {config.pbt.population_size} members ({config.agent.algo} on {config.env.id}), "
              f"{config.run.total_env_steps:,} env steps each, {controller.threads} env thread(s) per member; "
              f"run directory {store.root}")
    return controller.run()


def resume(run_dir: Path | str, console: bool = True, *, loggers: Iterable[Any] | None = None,
           backend: Backend | None = None, learner_factory: str = DEFAULT_LEARNER_FACTORY) -> dict:
    """Continue a stopped or killed run from its run directory; return the summary."""
    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise RunDirError(f"{store.root} is not a pbt-rl run directory (no config.yaml)")
    config = load_config(store.config_path)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(store.root)))
    store.check_writable()
    if not store.state_path.is_file():
        raise RunDirError(f"{store.root} has no state.json: the run stopped before it started; "
                          "delete the directory and train again")
    state = store.read_json(store.state_path)
    if loggers is None:
        loggers = default_loggers(config, store.root)
    controller = Controller(config, store, state=state, console=console, loggers=loggers, backend=backend,
                            learner_factory=learner_factory)
    if console:
        steps = ", ".join(f"{i}: {r.env_steps:,}" for i, r in controller.records.items())
        print(f"Resuming {store.root} (env steps per member {steps})")
    return controller.run()
