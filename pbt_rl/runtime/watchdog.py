"""Hang detection: a member that is alive but silent is treated as failed.

A member that is working (not waiting for a command from the controller) sends a message every
few seconds: progress about once a second while it trains (``member.CHUNK_SECONDS`` per training
call), then ``ready``/``done`` with its checkpoint, or ``applied`` after an exploit. A stopped
process (``kill -STOP``), a deadlocked learner or a hung GPU sends nothing, and its pipe stays
open, so no crash is ever seen. The controller therefore allows each member

    max(run.hang_timeout_min_seconds, run.hang_timeout_factor * longest gap seen so far)

seconds of silence while it works, where the longest gap is measured between this member's own
messages (so a slow env or a big network earns itself a longer allowance), and
``run.hang_timeout_factor * run.hang_timeout_min_seconds`` before its first message after a
(re)start, which covers imports, env construction and CUDA start-up. Time the member spends
waiting for the controller (a sync generation, the controller itself busy) never counts: the
clock restarts when the controller sends it a command, and messages that queued while the
controller was busy are read before the clock is looked at.

Pure bookkeeping on timestamps the caller passes in, so the rule is tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Silence:
    """A member found hung: how long it was silent and what it was allowed."""

    member_id: int
    silent_seconds: float
    allowed_seconds: float
    started: bool  # False: it never sent its first message after the (re)start


class SilenceWatch:
    """Per-member clocks of the last message (see the module docstring)."""

    def __init__(self, factor: float, min_seconds: float):
        self.factor = float(factor)
        self.min_seconds = float(min_seconds)
        self._last: dict[int, float] = {}
        self._started: dict[int, bool] = {}
        self._waiting: dict[int, bool] = {}
        self.longest_gap: dict[int, float] = {}  # kept across restarts: the member's own cadence

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def launched(self, member_id: int, now: float) -> None:
        """A (re)started member: the start-up allowance applies until its first message."""
        self._last[member_id] = now
        self._started[member_id] = False
        self._waiting[member_id] = False

    def heard(self, member_id: int, now: float, waits: bool = False) -> None:
        """A message arrived; ``waits``: the member now waits for a command (ready, done)."""
        if member_id not in self._last:
            self.launched(member_id, now)
        if self._started[member_id]:
            gap = now - self._last[member_id]
            self.longest_gap[member_id] = max(self.longest_gap.get(member_id, 0.0), gap)
        self._started[member_id] = True
        self._last[member_id] = now
        self._waiting[member_id] = waits

    def commanded(self, member_id: int, now: float) -> None:
        """The controller sent a command: the member works again from now."""
        if member_id in self._last:
            self._last[member_id] = now
            self._waiting[member_id] = False

    def forget(self, member_id: int) -> None:
        """The member's process is gone (finished, failed, killed)."""
        for table in (self._last, self._started, self._waiting):
            table.pop(member_id, None)

    def allowed(self, member_id: int) -> float:
        if not self._started.get(member_id, False):
            return self.factor * self.min_seconds
        return max(self.min_seconds, self.factor * self.longest_gap.get(member_id, 0.0))

    def hung(self, now: float) -> list[Silence]:
        """Members that work and have been silent for longer than they are allowed."""
        if not self.enabled:
            return []
        found = []
        for member_id, last in sorted(self._last.items()):
            if self._waiting[member_id]:
                continue
            silent, allowed = now - last, self.allowed(member_id)
            if silent > allowed:
                found.append(Silence(member_id, silent, allowed, self._started[member_id]))
        return found
