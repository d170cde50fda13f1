"""The run directory's formats: file names, checkpoint ids, typed rows, JSON encoding.

Pure: nothing here touches a file. :mod:`pbt_rl.runtime.store` (``RunStore``) builds the paths
from these names and does the reading and writing; readers (report, lineage, replay, eval,
bench, loggers) get the typed rows below from it. The formats themselves are documented in
docs/design.md ("Run directory", "File formats").

A row's ``from_dict`` checks the fields readers rely on and raises :class:`RunDirError` naming
the file and row; every other field is optional (None or empty when absent). Rows are frozen;
their dict fields are copies, to be treated as read-only.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from pbt_rl.config import ConfigError, ExperimentConfig

# -- layout: every name in a run directory (paths are built only by RunStore) ----------------
CONFIG_FILE = "config.yaml"
POPULATION_FILE = "population.json"
STATE_FILE = "state.json"
LINEAGE_FILE = "lineage.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
MEMBERS_DIR = "members"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKSUM_SUFFIX = ".sha256"
REPORT_DIR = "report"
WANDB_DIR = "wandb"  # W&B creates it itself under the directory it is given
TENSORBOARD_DIR = "tensorboard"  # member_<id>/, population/ event files (tensorboard_logger.py)
REPLAY_DIR_PREFIX = "replay-"  # replay-<member>/
LOCK_FILE = ".lock"  # flock'ed by the one writer of the run (run_lock.py)
LOGGING_STAGING_DIR = ".logging-staging"  # donor checkpoints linked for the loggers (loggers.py)

CHECKPOINT_PATTERN = re.compile(r"^(\d{12})\.pt$")

Hyperparameters = dict[str, Any]


class RunDirError(ConfigError):
    """The run directory cannot be used (unwritable, full, not a run, not empty, a damaged file): one line."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or fails its SHA-256 check."""


# -- checkpoint ids ----------------------------------------------------------------------------
def checkpoint_id(member: int, env_steps: int) -> str:
    """Checkpoint ids are paths relative to the run directory, named by the saver's env steps."""
    return f"{MEMBERS_DIR}/{member}/{CHECKPOINTS_DIR}/{env_steps:012d}.pt"


def checkpoint_env_steps(checkpoint: str) -> int:
    match = CHECKPOINT_PATTERN.match(PurePosixPath(checkpoint).name)
    if not match:
        raise CheckpointError(f"not a checkpoint id: {checkpoint}")
    return int(match.group(1))


def checkpoint_member(checkpoint: str) -> int:
    """The member whose env-step clock names the checkpoint (the one that saved it)."""
    parts = PurePosixPath(checkpoint).parts
    if len(parts) != 4 or parts[0] != MEMBERS_DIR or parts[2] != CHECKPOINTS_DIR or not parts[1].isdigit():
        raise CheckpointError(f"not a checkpoint id: {checkpoint}")
    checkpoint_env_steps(checkpoint)
    return int(parts[1])


# -- JSON encoding -----------------------------------------------------------------------------
def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a missing score is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    # numpy scalars and tuples reach the logs through hyperparameters and returns.
    if hasattr(value, "item"):
        return finite_or_none(value.item())
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(row: Any) -> str:
    """One JSONL line (without the newline)."""
    return json.dumps(finite_or_none(row), default=_json_default, allow_nan=False)


def json_bytes(obj: Any) -> bytes:
    """How the run directory's whole JSON files are encoded (NaN as null, numpy unwrapped)."""
    return (json.dumps(finite_or_none(obj), default=_json_default, indent=1) + "\n").encode()


# -- field checks ------------------------------------------------------------------------------
_MISSING = object()


def _field(raw: Mapping, key: str, where: str, kinds: tuple[type, ...], required: bool) -> Any:
    value = raw.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise RunDirError(f"{where} has no valid {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RunDirError(f"{where} has no valid {key!r}")
    return value


def _int(raw: Mapping, key: str, where: str, required: bool = False) -> int | None:
    value = _field(raw, key, where, (numbers.Integral,), required)
    return None if value is None else int(value)


def _float(raw: Mapping, key: str, where: str, required: bool = False) -> float | None:
    value = _field(raw, key, where, (numbers.Real,), required)
    return None if value is None else float(value)


def _str(raw: Mapping, key: str, where: str, required: bool = False) -> str | None:
    return _field(raw, key, where, (str,), required)


def _dict(raw: Mapping, key: str, where: str, required: bool = False) -> dict | None:
    value = _field(raw, key, where, (Mapping,), required)
    return None if value is None else dict(value)


def _numbers(raw: Mapping, key: str, where: str, kind: type) -> tuple:
    value = _field(raw, key, where, (list, tuple), False) or ()
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
        raise RunDirError(f"{where} has no valid {key!r}")
    return tuple(kind(v) for v in value)


def _object(raw: Any, where: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise RunDirError(f"{where} is not a JSON object")
    return raw


# -- typed rows --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineageRow:
    """One exploit, a row of ``lineage.jsonl``: ``member`` at its own ``env_steps`` loaded
    ``donor_checkpoint`` (saved at ``donor_env_steps`` on the saver's clock), then set
    ``new_hyperparameters``. ``generation`` counts the member's exploits, this one included."""

    member: int
    env_steps: int
    generation: int
    donor: int
    donor_checkpoint: str
    donor_env_steps: int
    new_hyperparameters: Hyperparameters
    old_hyperparameters: Hyperparameters = field(default_factory=dict)
    operations: dict[str, str] = field(default_factory=dict)
    member_score: float | None = None
    donor_score: float | None = None
    exploit: str | None = None  # the exploit strategy, or "reseed"
    time: float | None = None
    wall_seconds: float | None = None

    @property
    def saver(self) -> int:
        """The member that saved the copied checkpoint: the donor, or the donor's own donor when the
        donor had not saved a checkpoint since its exploit (docs/lineage.md)."""
        return checkpoint_member(self.donor_checkpoint)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "lineage row") -> "LineageRow":
        raw = _object(raw, where)
        donor_checkpoint = _str(raw, "donor_checkpoint", where, required=True)
        try:
            checkpoint_member(donor_checkpoint)
        except CheckpointError:
            raise RunDirError(f"{where} has no valid 'donor_checkpoint' ({donor_checkpoint!r})") from None
        return cls(
            member=_int(raw, "member", where, True), env_steps=_int(raw, "env_steps", where, True),
            generation=_int(raw, "generation", where, True), donor=_int(raw, "donor", where, True),
            donor_checkpoint=donor_checkpoint, donor_env_steps=_int(raw, "donor_env_steps", where, True),
            new_hyperparameters=_dict(raw, "new_hyperparameters", where, True),
            old_hyperparameters=_dict(raw, "old_hyperparameters", where) or {},
            operations=_dict(raw, "operations", where) or {},
            member_score=_float(raw, "member_score", where), donor_score=_float(raw, "donor_score", where),
            exploit=_str(raw, "exploit", where), time=_float(raw, "time", where),
            wall_seconds=_float(raw, "wall_seconds", where),
        )


@dataclass(frozen=True)
class MetricsRow:
    """One progress report of a member, a row of ``members/<id>/metrics.jsonl``.

    ``fitness`` is None until the member has ``pbt.min_episodes`` finished episodes (and again just
    after an exploit); ``wall_seconds`` counts from the run's start; ``timing_seconds`` says where
    the member's time went since its previous row (docs/design.md, "File formats")."""

    env_steps: int
    member: int | None = None
    updates: int | None = None
    fitness: float | None = None
    episode_returns: tuple[float, ...] = ()
    episode_lengths: tuple[int, ...] = ()
    losses: dict[str, float] = field(default_factory=dict)
    env_steps_per_second: float | None = None
    hyperparameters: Hyperparameters = field(default_factory=dict)
    generation: int | None = None
    timing_seconds: dict[str, float] | None = None
    time: float | None = None
    wall_seconds: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "metrics row") -> "MetricsRow":
        raw = _object(raw, where)
        return cls(
            env_steps=_int(raw, "env_steps", where, True), member=_int(raw, "member", where),
            updates=_int(raw, "updates", where), fitness=_float(raw, "fitness", where),
            episode_returns=_numbers(raw, "episode_returns", where, float),
            episode_lengths=_numbers(raw, "episode_lengths", where, int),
            losses=_dict(raw, "losses", where) or {},
            env_steps_per_second=_float(raw, "env_steps_per_second", where),
            hyperparameters=_dict(raw, "hyperparameters", where) or {},
            generation=_int(raw, "generation", where), timing_seconds=_dict(raw, "timing_seconds", where),
            time=_float(raw, "time", where), wall_seconds=_float(raw, "wall_seconds", where),
        )


@dataclass(frozen=True)
class EventRow:
    """A row of ``events.jsonl``: a failure, restart, hang, resume ... (``event`` names it).
    ``member`` is None for events of the whole run; ``details`` holds the event's own fields."""

    event: str
    member: int | None = None
    time: float | None = None
    wall_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def env_steps(self) -> int | None:
        return self.details.get("env_steps")

    @classmethod
    def from_dict(cls, raw: Any, where: str = "event row") -> "EventRow":
        raw = _object(raw, where)
        _int(raw, "env_steps", where)  # checked: loggers plot events at it
        own = ("time", "wall_seconds", "event", "member")
        return cls(event=_str(raw, "event", where, True), member=_int(raw, "member", where),
                   time=_float(raw, "time", where), wall_seconds=_float(raw, "wall_seconds", where),
                   details={k: v for k, v in raw.items() if k not in own})

    def to_dict(self) -> dict[str, Any]:
        """The row as the controller writes it."""
        return {"time": self.time, "wall_seconds": self.wall_seconds, "event": self.event, "member": self.member,
                **self.details}


@dataclass(frozen=True)
class PopulationMember:
    seed: int | None
    hyperparameters: Hyperparameters


@dataclass(frozen=True)
class Population:
    """``population.json``: each member's seed and initial hyperparameters, and the searched names."""

    members: dict[int, PopulationMember]
    search_space: tuple[str, ...] = ()
    created: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = POPULATION_FILE) -> "Population":
        raw = _object(raw, where)
        members = {}
        for key, info in (_dict(raw, "members", where, True)).items():
            if not str(key).isdigit():
                raise RunDirError(f"{where}: member id {key!r} is not a non-negative integer")
            info = _object(info, f"{where}: member {key}")
            members[int(key)] = PopulationMember(seed=_int(info, "seed", f"{where}: member {key}"),
                                                 hyperparameters=_dict(info, "hyperparameters", f"{where}: member {key}") or {})
        names = _field(raw, "search_space", where, (list, tuple), False) or ()
        return cls(members=dict(sorted(members.items())), search_space=tuple(str(n) for n in names),
                   created=_float(raw, "created", where))


# -- one run, as read at one moment ------------------------------------------------------------
@dataclass(frozen=True)
class RunSnapshot:
    """Everything a reader needs from one run directory, read at one moment (``RunStore.snapshot``).

    A run still in progress has no ``summary`` (summary.json is written when the run stops); its
    logs end at the last complete row."""

    root: Path
    config: ExperimentConfig
    population: Population
    lineage: tuple[LineageRow, ...]  # file order
    metrics: dict[int, tuple[MetricsRow, ...]]  # member -> rows in file order
    checkpoint_steps: dict[int, tuple[int, ...]]  # member -> env steps of its checkpoint files, oldest first
    summary: dict[str, Any] | None = None

    @property
    def members(self) -> list[int]:
        return sorted(set(self.population.members) | set(self.metrics))

    @property
    def initial_hyperparameters(self) -> dict[int, Hyperparameters]:
        return {m: dict(info.hyperparameters) for m, info in self.population.members.items()}

    @property
    def seeds(self) -> dict[int, int]:
        return {m: info.seed for m, info in self.population.members.items() if info.seed is not None}

    @property
    def in_progress(self) -> bool:
        return self.summary is None
