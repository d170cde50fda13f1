"""What the population did, computed from a run's rows: ancestry, schedules, best member, time-to-score.

Pure: every function takes a :class:`~pbt_rl.runtime.run_format.RunSnapshot`
(``pbt_rl.runtime.store.load_run(run_dir)``) and reads nothing else; the report plots these numbers and replay follows
:func:`schedule_of`. The rules are in docs/lineage.md; in short:

A member's final weights were produced by a chain of *segments*: after its last exploit at its
own env step ``s`` (donor checkpoint saved at ``t`` on its saver's clock) the member trained from
``s`` to its end with the new hyperparameters; the weights it started that segment from were the
saver's at ``t``, produced by the saver's own chain up to ``t``, and so on back to a member's
initial weights. Laid end to end, the segments give the *ancestry timeline* in env steps: the env
steps of training behind the weights at that point. An exploit at step ``s`` happens after that
member's checkpoint at ``s`` was saved, so a checkpoint at ``t`` holds the weights from *before*
any exploit of its saver at ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbt_rl.config import ConfigError
from pbt_rl.runtime.run_format import Hyperparameters, LineageRow, MetricsRow, RunSnapshot
from pbt_rl.runtime.summary import best_member as best_scored_member  # the one best-member rule


# -- members -----------------------------------------------------------------------------------
def final_fitness(run: RunSnapshot, member: int) -> float | None:
    """The member's last reported fitness (None until it had enough finished episodes)."""
    for row in reversed(run.metrics.get(member, ())):
        if row.fitness is not None:
            return row.fitness
    return None


def member_env_steps(run: RunSnapshot, member: int) -> int:
    """How far the member got: its last progress row, checkpoint or exploit, in env steps."""
    steps = [row.env_steps for row in run.metrics.get(member, ())[-1:]]
    steps += list(run.checkpoint_steps.get(member, ())[-1:])
    steps += [row.env_steps for row in run.lineage if row.member == member]
    return max(steps, default=0)


def best_member(run: RunSnapshot) -> int | None:
    """summary.json's best member once written; before that the same rule (summary.best_member)
    over the members' last fitness. None when no member has a fitness."""
    if run.summary is not None:
        chosen = run.summary.get("best_member")
        if isinstance(chosen, int) and not isinstance(chosen, bool):
            return chosen
    return best_scored_member({m: final_fitness(run, m) for m in run.members})


def resolve_member(run: RunSnapshot, member: str | int) -> int:
    """'best' or a member id -> a member id of this run; ConfigError for an unknown one."""
    if member == "best":
        best = best_member(run)
        if best is None:
            raise ConfigError(f"{run.root}: no member has a fitness yet, so there is no best member; pass a member id")
        return best
    try:
        member_id = int(member)
    except (TypeError, ValueError):
        raise ConfigError(f"member: expected 'best' or a member id, got {member!r}") from None
    if member_id not in run.members:
        known = ", ".join(str(m) for m in run.members)
        raise ConfigError(f"member {member_id} is not in this run (members: {known})")
    return member_id


# -- ancestry and schedules --------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Training of one member that the final weights went through.

    ``start``/``end`` are the member's own env steps; ``timeline_start`` is where the segment
    begins on the ancestry timeline. ``exploit`` is the lineage row that started the segment
    (None for a member's initial weights).
    """

    member: int
    start: int
    end: int
    timeline_start: int
    hyperparameters: Hyperparameters
    exploit: LineageRow | None

    @property
    def length(self) -> int:
        return max(0, self.end - self.start)


def ancestry(run: RunSnapshot, member: int, until: int | None = None) -> list[Segment]:
    """The segments behind ``member``'s weights at its own env step ``until`` (default: its end).

    Oldest segment first; consecutive segments are joined by exploits (``segment.exploit``).
    """
    member = int(member)
    cutoff = member_env_steps(run, member) if until is None else int(until)
    include_exploit_at_cutoff = True  # the member's own end: an exploit there replaced its weights
    backwards: list[tuple[int, int, int, Hyperparameters, LineageRow | None]] = []
    used: set[int] = set()
    while True:
        candidates = [
            (row.env_steps, index, row) for index, row in enumerate(run.lineage)
            if row.member == member and (row.env_steps <= cutoff if include_exploit_at_cutoff else row.env_steps < cutoff)
        ]
        if not candidates:
            initial = run.population.members.get(member)
            if initial is None:
                raise ConfigError(f"{run.root}: member {member} has no initial hyperparameters in the population")
            backwards.append((member, 0, cutoff, dict(initial.hyperparameters), None))
            break
        step, index, row = max(candidates, key=lambda c: (c[0], c[1]))
        if index in used:  # a malformed lineage would loop forever
            raise ConfigError(f"{run.root}: the lineage's exploit rows form a cycle at member {member}")
        used.add(index)
        backwards.append((member, step, cutoff, dict(row.new_hyperparameters), row))
        # The copied weights are the checkpoint's, on the clock of the member that saved it: the
        # donor itself, or, when the donor had exploited since its last checkpoint, its donor.
        member, cutoff, include_exploit_at_cutoff = row.saver, row.donor_env_steps, False

    segments = []
    timeline = 0
    for seg_member, start, end, hyperparameters, exploit in reversed(backwards):
        segment = Segment(seg_member, start, end, timeline, hyperparameters, exploit)
        segments.append(segment)
        timeline += segment.length
    return segments


def ancestry_length(segments: list[Segment]) -> int:
    """Env steps of training behind the weights at the end of ``segments``."""
    return segments[-1].timeline_start + segments[-1].length if segments else 0


def schedule_of(run: RunSnapshot, member: str | int) -> list[tuple[int, Hyperparameters]]:
    """The hyperparameter schedule that produced ``member``'s final weights (``member`` may be "best").

    ``[(env_steps, hyperparameters), ...]`` on the ancestry timeline, starting at 0: from each
    ``env_steps`` on the given values were in force, until the next entry. Consecutive entries
    with equal values are merged.
    """
    schedule: list[tuple[int, Hyperparameters]] = []
    for segment in ancestry(run, resolve_member(run, member)):
        if schedule and schedule[-1][1] == segment.hyperparameters:
            continue
        if schedule and schedule[-1][0] == segment.timeline_start:
            schedule[-1] = (segment.timeline_start, segment.hyperparameters)  # a zero-length segment
            continue
        schedule.append((segment.timeline_start, segment.hyperparameters))
    return schedule


def own_hyperparameter_history(run: RunSnapshot, member: int) -> list[tuple[int, Hyperparameters]]:
    """(env_steps, values) of the member's own hyperparameters on its own env-step clock."""
    initial = run.population.members.get(member)
    history = [(0, dict(initial.hyperparameters) if initial else {})]
    history += [(row.env_steps, dict(row.new_hyperparameters)) for row in run.lineage if row.member == member]
    return history


# -- best fitness over wall time (time-to-score) -----------------------------------------------
def timed_rows(run: RunSnapshot) -> dict[int, list[MetricsRow]]:
    """Each member's metrics rows that have ``wall_seconds``, oldest first (file order on ties)."""
    return {member: sorted((row for row in rows if row.wall_seconds is not None), key=lambda row: row.wall_seconds)
            for member, rows in run.metrics.items()}


def best_fitness_over_time(run: RunSnapshot, every_seconds: float = 60.0) -> list[dict]:
    """The population's best fitness at regular wall times, for "score X after N minutes".

    Times are ``every_seconds``, ``2 * every_seconds``, ... (wall seconds since the run started)
    up to and including the last metrics row's ``wall_seconds``, plus one final entry at that last
    time when it is not a multiple of ``every_seconds``. At time ``t`` a member's fitness is the
    one in its latest metrics row with ``wall_seconds <= t`` (not a later row, not its best ever);
    a member whose latest row has a null fitness (too few episodes, e.g. just after an exploit) or
    that has no row yet does not count. The best is chosen by the best-member rule (ties: the
    lowest member id).

    Returns one dict per time, in time order: ``{"wall_seconds": t, "best_fitness": float | None,
    "member": int | None, "env_steps": int | None}``, ``env_steps`` being that member's own env
    steps in that row. Empty when there are no metrics rows.
    """
    if not every_seconds > 0:
        raise ValueError(f"every_seconds must be positive, got {every_seconds!r}")
    timed = timed_rows(run)
    times = [row.wall_seconds for rows in timed.values() for row in rows]
    if not times:
        return []
    last = max(times)
    moments = [k * every_seconds for k in range(1, int(last // every_seconds) + 1)]
    if not moments or moments[-1] < last:
        moments.append(last)

    entries = []
    position = {member: -1 for member in timed}  # index of each member's latest row at or before t
    for t in moments:
        latest: dict[int, MetricsRow] = {}
        for member, rows in timed.items():
            i = position[member]
            while i + 1 < len(rows) and rows[i + 1].wall_seconds <= t:
                i += 1
            position[member] = i
            if i >= 0:
                latest[member] = rows[i]
        best = best_scored_member({member: row.fitness for member, row in latest.items()})
        entries.append({
            "wall_seconds": t,
            "best_fitness": None if best is None else latest[best].fitness,
            "member": best,
            "env_steps": None if best is None else latest[best].env_steps,
        })
    return entries


def first_time_reaching(run: RunSnapshot, score: float) -> dict | None:
    """The first metrics row, over all members, whose fitness is at least ``score``.

    "First" is the smallest ``wall_seconds``; ties go to the lowest member id, then the member's
    earlier row. Returns ``{"wall_seconds", "member", "env_steps", "fitness"}`` (``env_steps`` on
    that member's own counter), or None if no member ever reported a fitness of ``score`` or more.
    """
    found: tuple[float, int, int, float] | None = None
    for member, rows in sorted(timed_rows(run).items()):
        for row in rows:
            if row.fitness is None or row.fitness < score:
                continue
            candidate = (row.wall_seconds, member, row.env_steps, row.fitness)
            if found is None or candidate[:2] < found[:2]:
                found = candidate
            break  # rows are in time order: later rows of this member are no earlier
    if found is None:
        return None
    return {"wall_seconds": found[0], "member": found[1], "env_steps": found[2], "fitness": found[3]}
