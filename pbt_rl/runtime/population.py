"""The population's records when a run starts: drawn fresh from the priors, or read back from
``state.json`` and reconciled with the rest of the run directory (:mod:`~pbt_rl.runtime.recovery`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pbt_rl.config import ExperimentConfig, tunable_agent_fields
from pbt_rl.runtime.member import Restore
from pbt_rl.runtime.records import MemberRecord, parse_state
from pbt_rl.runtime.recovery import Event, reconcile
from pbt_rl.runtime.store import RunDirError, RunStore
from pbt_rl.scheduler import Scheduler


def member_seed(run_seed: int, member_id: int) -> int:
    """Independent, reproducible seed per member."""
    return int(np.random.SeedSequence([run_seed, member_id]).generate_state(1)[0])


@dataclass
class Population:
    """What the controller starts from: one record per member, population.json's content, and
    (on resume) the saved wall time, resume count and loggers' states."""

    records: dict[int, MemberRecord]
    info: dict
    wall_seconds: float = 0.0
    resumes: int = 0
    logger_states: list | None = None
    pending: dict[int, dict] | None = None  # exploits state.json saved as pending (resume only)

    def reconcile(self, store: RunStore, event: Event) -> None:
        """Make the records agree with lineage, checkpoints and metrics (:func:`recovery.reconcile`)."""
        reconcile(store, self.records, self.pending or {},
                  lambda member_id: self.info["members"][str(member_id)]["hyperparameters"], event)


def fresh_population(config: ExperimentConfig, scheduler: Scheduler) -> Population:
    """Every member's seed and initial hyperparameters (the scheduler draws them)."""
    base = {name: getattr(config.agent, name) for name in tunable_agent_fields()}
    initial = scheduler.initial_hyperparameters(base, config.pbt.population_size)
    records = {}
    for member_id, values in enumerate(initial):
        record = MemberRecord(member_id, member_seed(config.run.seed, member_id), dict(values))
        record.restore = Restore(None, 0, 0, dict(values))
        records[member_id] = record
    info = {
        "members": {str(i): {"seed": r.seed, "hyperparameters": r.hyperparameters} for i, r in records.items()},
        "search_space": [spec.name for spec in config.pbt.search_space],
        "created": time.time(),
    }
    return Population(records, info)


def read_population(store: RunStore, config: ExperimentConfig, scheduler: Scheduler, state: Any) -> Population:
    """A stopped run's population from its state.json (parsed ``state``) and population.json, all
    checked before anything is written (RunDirError); loads the scheduler's saved state into
    ``scheduler``. The caller then reconciles it with the run directory (:meth:`Population.reconcile`)."""
    path = store.state_path
    parsed = parse_state(state, path, config.pbt.population_size)
    try:
        scheduler.load_state_dict(parsed.scheduler)
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{path}: the scheduler state is not valid ({exc})") from None
    info = store.read_json(store.population_path)
    try:
        for member_id in parsed.records:
            dict(info["members"][str(member_id)]["hyperparameters"])
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"{store.population_path}: not the population of this run "
                          "(no initial hyperparameters for every member)") from None
    return Population(parsed.records, info, parsed.wall_seconds, parsed.resumes + 1, parsed.loggers, parsed.pending)
