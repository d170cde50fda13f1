"""The controller's fault handling: a member that failed (its exception, a dead host, a closed
pipe) or went silent past its allowance (watchdog.py) is killed and then restarted from its
restore point, re-seeded from a donor's checkpoint, or abandoned, by the one rule
:func:`pbt_rl.runtime.recovery.after_failure`; every step is an event in events.jsonl and
state.json is rewritten before the member is launched again (controller.py's consistency rules).
"""

from __future__ import annotations

import time

from pbt_rl.runtime.member import Restore
from pbt_rl.runtime.recovery import after_failure


class FailureHandling:
    """Part of :class:`~pbt_rl.runtime.controller.Controller` (a base class of it): uses its
    records, handles, silence watch, pending exploits, scheduler, events and launches."""

    def _check_silence(self) -> None:
        for silence in self.watch.hung(time.monotonic()):
            if silence.member_id not in self.handles:
                self.watch.forget(silence.member_id)
                continue
            self._event("member_hung", silence.member_id, silent_seconds=round(silence.silent_seconds, 1),
                        allowed_seconds=round(silence.allowed_seconds, 1), started=silence.started)
            self._on_failure(silence.member_id, f"hung: no message for {silence.silent_seconds:.0f} s "
                                                f"(allowed {silence.allowed_seconds:.0f} s, run.hang_timeout_*)")

    def _on_failure(self, member_id: int, error: str, diverged: bool = False, traceback: str = "") -> None:
        handle = self.handles.pop(member_id, None)
        if handle is not None:
            handle.kill()
        self.watch.forget(member_id)
        record = self.records[member_id]
        if record.done or self.stopping:
            return
        record.failures += 1
        record.last_error = error
        dropped = self.pending.pop(member_id, None)
        kind = self.pending_kind.pop(member_id, None)
        self._event("member_failed", member_id, env_steps=record.env_steps, error=error, diverged=diverged,
                    failures=record.failures, traceback=traceback[-4000:],
                    dropped_exploit=None if dropped is None else kind)
        action = after_failure(record.failures, diverged, record.restore.checkpoint is not None)
        if action == "abandon":
            record.abandoned, record.status = True, "abandoned"
            self._event("member_abandoned", member_id, failures=record.failures, error=error)
            self._save_state()
            return
        # Roll back to the restore point (what a restarted member will report from).
        record.env_steps = record.restore.env_steps
        record.updates = record.restore.updates
        if action == "reseed":
            excluded = [r.member_id for r in self.records.values() if r.abandoned]
            reseed = self.scheduler.reseed(member_id, {i: r.member_state() for i, r in self.records.items()},
                                           excluded=excluded)
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
        self._event("member_restarted", member_id, checkpoint=record.restore.checkpoint,
                    env_steps=record.restore.env_steps)
        self._save_state()
        self._launch(record)
