"""The controller's population records and the one parser of ``state.json``.

``state.json`` is rewritten atomically by the controller after every decision; ``resume`` reads it
back with :func:`parse_state`, which checks the whole file before the controller acts on any of
it, so a damaged or foreign file is one line (:class:`RunDirError`, CLI exit 2) and nothing in
the run directory is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbt_rl.runtime.member import Restore
from pbt_rl.runtime.store import CheckpointError, RunDirError, RunStore
from pbt_rl.scheduler import MemberState

STATE_FORMAT = 1


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
    last_error: str = ""
    # Not saved: live status of the process.
    status: str = "starting"
    env_steps_per_second: float = 0.0

    SAVED = ("member_id", "seed", "hyperparameters", "env_steps", "updates", "last_ready_steps", "episode_returns",
             "score_history", "checkpoint_id", "generation", "failures", "done", "abandoned",
             "last_error")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.SAVED}
        out["restore"] = self.restore.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "MemberRecord":
        record = cls(**{name: raw[name] for name in cls.SAVED if name in raw})
        record.restore = Restore.from_dict(raw.get("restore") or {})
        record.score_history = [(int(s), f) for s, f in record.score_history]
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
            checkpoint_env_steps=self.checkpoint_env_steps,
        )

    @property
    def checkpoint_env_steps(self) -> int | None:
        """Env steps at which the weights in ``checkpoint_id`` were saved (the id says: store.py)."""
        return None if self.checkpoint_id is None else RunStore.checkpoint_env_steps(self.checkpoint_id)


# ------------------------------------------------------------------------------------------ parsing

_TYPES = {
    "member_id": int, "seed": int, "hyperparameters": dict, "env_steps": int, "updates": int,
    "last_ready_steps": int, "episode_returns": list, "score_history": list, "checkpoint_id": (str, type(None)),
    "generation": int, "failures": int, "done": bool,
    "abandoned": bool, "last_error": str,
}
_REQUIRED = ("member_id", "seed", "hyperparameters", "env_steps", "generation", "restore")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_member(key: str, raw: Any, where: str) -> MemberRecord:
    if not isinstance(raw, dict):
        raise RunDirError(f"{where}: members.{key} must be a mapping, got {_kind(raw)}")
    for name in _REQUIRED:
        if name not in raw:
            raise RunDirError(f"{where}: members.{key} has no {name!r}")
    for name, expected in _TYPES.items():
        value = raw.get(name)
        if name in raw and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            raise RunDirError(f"{where}: members.{key}.{name} has the wrong type ({_kind(value)})")
    if raw.get("checkpoint_id") is not None:
        try:
            RunStore.checkpoint_env_steps(raw["checkpoint_id"])
        except CheckpointError:
            raise RunDirError(f"{where}: members.{key}.checkpoint_id {raw['checkpoint_id']!r} is not a checkpoint id") from None
    if str(raw["member_id"]) != key:
        raise RunDirError(f"{where}: members.{key} holds member_id {raw['member_id']!r}")
    restore = raw["restore"]
    if not isinstance(restore, dict) or not isinstance(restore.get("checkpoint"), (str, type(None))) \
            or not isinstance(restore.get("env_steps", 0), int) \
            or not isinstance(restore.get("hyperparameters"), (dict, type(None))):
        raise RunDirError(f"{where}: members.{key}.restore is not a restore point")
    for entry in raw.get("score_history", []):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                and isinstance(entry[1], (int, float, type(None)))):
            raise RunDirError(f"{where}: members.{key}.score_history has an entry that is not [env_steps, score]")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in raw.get("episode_returns", [])):
        raise RunDirError(f"{where}: members.{key}.episode_returns must be numbers")
    return MemberRecord.from_dict(raw)


@dataclass
class ParsedState:
    records: dict[int, MemberRecord]
    scheduler: dict
    pending: dict[int, dict]
    wall_seconds: float
    resumes: int
    loggers: list


def parse_state(raw: Any, path: Path, population_size: int) -> ParsedState:
    """Check and convert the content of ``state.json``; :class:`RunDirError` names what is wrong."""
    where = str(path)
    if not isinstance(raw, dict):
        raise RunDirError(f"{where}: not a pbt-rl state file (expected a mapping, got {_kind(raw)})")
    if raw.get("format") != STATE_FORMAT:
        raise RunDirError(f"{where}: unknown state format {raw.get('format')!r} (this pbt-rl reads {STATE_FORMAT})")
    members = raw.get("members")
    if not isinstance(members, dict) or not members:
        raise RunDirError(f"{where}: 'members' must be a non-empty mapping of member ids, got {_kind(members)}")
    expected_ids = {str(i) for i in range(population_size)}
    if set(members) != expected_ids:
        raise RunDirError(f"{where}: members {sorted(members)} do not match pbt.population_size={population_size}")
    records = {int(key): _check_member(key, value, where) for key, value in members.items()}
    scheduler = raw.get("scheduler")
    if not isinstance(scheduler, dict):
        raise RunDirError(f"{where}: 'scheduler' must be a mapping, got {_kind(scheduler)}")
    pending = raw.get("pending", {})
    if not isinstance(pending, dict) or not all(
            k in members and isinstance(v, dict) and isinstance(v.get("generation"), int) for k, v in pending.items()):
        raise RunDirError(f"{where}: 'pending' is not a mapping of member ids to decisions")
    wall_seconds, resumes, loggers = raw.get("wall_seconds", 0.0), raw.get("resumes", 0), raw.get("loggers", [])
    if not isinstance(wall_seconds, (int, float)) or not isinstance(resumes, int) or not isinstance(loggers, list):
        raise RunDirError(f"{where}: wall_seconds, resumes or loggers has the wrong type")
    return ParsedState(records, scheduler, {int(k): v for k, v in pending.items()}, float(wall_seconds), resumes,
                       loggers)
