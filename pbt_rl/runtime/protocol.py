"""The messages between the controller and its members, as types both ends share.

Every message is a frozen dataclass that pickles (any backend can carry it: a pipe, a Ray actor
call). The member sends what happened; the controller answers a member that waits (after
``Ready``) with a command. Units: env steps summed over the member's envs.

member -> controller
  ``Started``        learner built and restore point applied
  ``Progress``       a training chunk's returns, losses and timings (about once a second)
  ``Ready``          a ready point: checkpoint saved; the member waits for a command
  ``Done``           budget reached, final checkpoint saved; the member ends
  ``Applied``        an exploit applied (donor weights loaded, then the new hyperparameters)
  ``ExploitFailed``  the donor checkpoint was unusable; the member kept its own weights
  ``Failed``         the member stops with an error (the controller restarts it)
  ``Exited``         made by the backend, not the member: the member's process (or actor) ended

controller -> member
  ``Continue``  ``Exploit``  ``Stop``
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Started:
    env_steps: int
    checkpoint: str | None
    hyperparameters: dict
    weights_sha256: str


@dataclass(frozen=True)
class Report:
    """What a member reports of its training since its previous message."""

    env_steps: int
    updates: int
    hyperparameters: dict
    episode_returns: list = field(default_factory=list)
    episode_lengths: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)
    env_steps_per_second: float = 0.0
    timing_seconds: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Progress(Report):
    pass


@dataclass(frozen=True)
class Ready(Report):
    checkpoint: str = ""


@dataclass(frozen=True)
class Done(Report):
    checkpoint: str = ""


@dataclass(frozen=True)
class Applied:
    env_steps: int
    donor_checkpoint: str
    hyperparameters: dict
    weights_sha256: str


@dataclass(frozen=True)
class ExploitFailed:
    donor_checkpoint: str
    error: str


@dataclass(frozen=True)
class Failed:
    error: str
    traceback: str = ""
    diverged: bool = False


@dataclass(frozen=True)
class Exited:
    exitcode: int | None


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Exploit:
    """Load ``checkpoint`` (a donor's), then set ``hyperparameters``."""

    checkpoint: str
    hyperparameters: dict


@dataclass(frozen=True)
class Stop:
    pass


MemberMessage = Started | Progress | Ready | Done | Applied | ExploitFailed | Failed | Exited
Command = Continue | Exploit | Stop
