"""Resume: make the controller's records agree with the run directory after any stop.

Called once by ``resume`` with the records parsed from ``state.json``. Everything is read and
checked first (lineage rows, metrics rows); only then are files changed, so a damaged run file
is one line (:class:`RunDirError`) and nothing is touched. The rules (module docstring of
controller.py): a lineage row newer than the member's generation is applied (``exploit_recovered``);
a pending exploit without its row is dropped (``exploit_dropped``); a damaged restore checkpoint
falls back to the member's newest good older one (``checkpoint_corrupt``, ``checkpoint_fallback``);
a finished member whose final checkpoint is damaged points at its newest good one; metrics rows
past each member's restore point are dropped so every step counter only grows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pbt_rl.runtime.member import Restore
from pbt_rl.runtime.records import MemberRecord
from pbt_rl.runtime.store import RunDirError, RunStore, read_jsonl, repair_jsonl, rewrite_jsonl

Event = Callable[..., None]

MAX_RESTARTS = 3  # restarts from the same checkpoint before the member is re-seeded from a donor
MAX_FAILURES = 10  # consecutive failures after which a member is abandoned (the run goes on)


def after_failure(failures: int, diverged: bool, has_checkpoint: bool) -> str:
    """What becomes of a member after its ``failures``-th failure in a row: ``"abandon"`` (the run
    goes on without it; ``pbt-rl resume`` retries it), ``"reseed"`` (restart from a donor's
    checkpoint: its weights diverged, its own restore point failed ``MAX_RESTARTS`` times, or it has
    no checkpoint yet and failed twice; the scheduler picks the donor) or ``"restart"`` (from its own
    restore point). A reseed the scheduler cannot serve (no donor) is a restart."""
    if failures >= MAX_FAILURES:
        return "abandon"
    if diverged or failures > MAX_RESTARTS or (not has_checkpoint and failures > 1):
        return "reseed"
    return "restart"


def _checked_rows(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict]:
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        problem = None if isinstance(row, dict) else "is not a JSON object"
        for key, kind in required.items():
            if problem is None and (not isinstance(row.get(key), kind) or isinstance(row.get(key), bool)):
                problem = f"has no valid {key!r}"
        if problem:
            raise RunDirError(f"{path}: row {number} {problem}")
    return rows


def apply_lineage_row(record: MemberRecord, row: dict) -> None:
    """The member's state after the exploit that ``row`` records (also used by the controller)."""
    record.generation = int(row["generation"])
    record.hyperparameters = dict(row["new_hyperparameters"])
    record.episode_returns = []
    record.checkpoint_id = row["donor_checkpoint"]
    record.env_steps = int(row["env_steps"])
    record.restore = Restore(row["donor_checkpoint"], int(row["env_steps"]), record.updates,
                             dict(row["new_hyperparameters"]))


def reconcile(store: RunStore, records: dict[int, MemberRecord], pending: dict[int, dict],
              initial_hyperparameters: Callable[[int], dict], event: Event) -> None:
    lineage = _checked_rows(store.lineage_path, {"member": int, "generation": int, "env_steps": int,
                                                 "donor_checkpoint": str, "new_hyperparameters": dict})
    for row in lineage:
        if row["member"] not in records:
            raise RunDirError(f"{store.lineage_path}: a row names member {row['member']}, not in this population")
    metrics = {i: _checked_rows(store.metrics_path(i), {"env_steps": int}) for i in records}
    _checked_rows(store.events_path, {})
    # Everything is readable: from here on files may change.
    for path in [store.lineage_path, store.events_path] + [store.metrics_path(i) for i in records]:
        repair_jsonl(path)
    for row in lineage:
        record = records[row["member"]]
        if row["generation"] > record.generation:
            apply_lineage_row(record, row)
            event("exploit_recovered", record.member_id, generation=row["generation"],
                  detail="lineage row written just before the stop; applied to the state")
    for member_id, raw in pending.items():
        if raw["generation"] > records[member_id].generation:
            event("exploit_dropped", member_id, donor=raw.get("donor_id"),
                  detail="decided but not applied before the stop; the member continues from its checkpoint")
    for record in records.values():
        if record.done:
            _verify_final_checkpoint(store, record, event)
            continue
        _ensure_restorable(store, record, initial_hyperparameters, event)
        # Work reported after the restore point is lost: drop it so step counters only grow.
        restore_steps = record.restore.env_steps
        record.env_steps = restore_steps
        record.updates = record.restore.updates
        record.last_ready_steps = min(record.last_ready_steps, restore_steps)
        record.score_history = [e for e in record.score_history if e[0] <= restore_steps]
        kept = [r for r in metrics[record.member_id] if r["env_steps"] <= restore_steps]
        if len(kept) < len(metrics[record.member_id]):
            rewrite_jsonl(store.metrics_path(record.member_id), kept)


def _newest_good(store: RunStore, member_id: int, at_most_steps: int, skip: str | None) -> str | None:
    return store.newest_verified_checkpoint(member_id, at_most_env_steps=at_most_steps,
                                            exclude={skip} if skip else (), skip_corrupt=True)


def _verify_final_checkpoint(store: RunStore, record: MemberRecord, event: Event) -> None:
    """A finished member's checkpoint is what summary.json, eval and export point at."""
    checkpoint = record.checkpoint_id
    if checkpoint is None or store.verify_checkpoint(checkpoint):
        return
    event("checkpoint_corrupt", record.member_id, checkpoint=checkpoint)
    record.checkpoint_id = _newest_good(store, record.member_id, record.env_steps, checkpoint)
    event("checkpoint_fallback", record.member_id, checkpoint=record.checkpoint_id,
          detail="the finished member's final checkpoint is damaged; the summary names its newest good one")


def _ensure_restorable(store: RunStore, record: MemberRecord, initial_hyperparameters: Callable[[int], dict],
                       event: Event) -> None:
    """Fall back to the newest good own checkpoint when the restore checkpoint is damaged."""
    checkpoint = record.restore.checkpoint
    if checkpoint is None or store.verify_checkpoint(checkpoint):
        return
    event("checkpoint_corrupt", record.member_id, checkpoint=checkpoint)
    candidate = _newest_good(store, record.member_id, record.restore.env_steps, checkpoint)
    record.episode_returns = []
    if candidate is not None:
        meta: dict[str, Any] = store.load_checkpoint(candidate)["member"]
        record.restore = Restore(candidate, int(meta["env_steps"]), int(meta.get("updates", 0)), None)
        record.hyperparameters = dict(meta["hyperparameters"])
        record.checkpoint_id = candidate
        event("checkpoint_fallback", record.member_id, checkpoint=candidate)
        return
    initial = initial_hyperparameters(record.member_id)
    record.restore = Restore(None, 0, 0, dict(initial))
    record.hyperparameters = dict(initial)
    record.checkpoint_id = None
    record.last_ready_steps = 0
    event("checkpoint_fallback", record.member_id, checkpoint=None, detail="no good checkpoint: restarting fresh")
