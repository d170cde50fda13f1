"""What the scheduler reads (:class:`MemberState`) and what it returns (:class:`Continue`,
:class:`Exploit`): frozen records, JSON-safe through ``to_dict``. The rules that produce them are
in :mod:`pbt_rl.scheduler`'s docstring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pbt_rl.search_space import Value


@dataclass(frozen=True)
class MemberState:
    """What the scheduler knows about one member at one moment.

    episode_returns: finished-episode returns (true game score) since the member's last exploit,
        oldest first; the runtime empties it after an exploit.
    score_history: (env_steps, fitness) at each of this member's ready points, in order.
    hyperparameters: the member's current values (at least every search-space name).
    checkpoint_id: the member's latest checkpoint (what a copier loads); None before the first.
        After an exploit, the donor checkpoint it loaded until it saves its own next one.
    checkpoint_env_steps: the env steps at which the weights in ``checkpoint_id`` were saved (the
        donor's, after an exploit); None when unknown, and then the member is never a donor.
    """

    member_id: int
    env_steps: int
    last_ready_steps: int
    episode_returns: tuple[float, ...]
    score_history: tuple[tuple[int, float], ...]
    hyperparameters: Mapping[str, Value]
    checkpoint_id: str | None
    checkpoint_env_steps: int | None = None


def _json_value(value: Any) -> Any:
    """Plain JSON value: numpy scalars unwrapped, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Continue:
    """The member keeps training with its own weights and hyperparameters."""

    member_id: int
    env_steps: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "continue", **{f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}}


@dataclass(frozen=True)
class Exploit:
    """The member loads ``donor_checkpoint``, then sets ``new_hyperparameters``.

    new_hyperparameters: the donor's hyperparameters after exploration (search-space names
        explored, every other key copied from the donor). operations: name -> what explore did.
    donor_env_steps: the env steps of the copied weights (the donor's ``checkpoint_env_steps``).
    member_score / donor_score: the scores the decision compared (NaN member score = diverged or,
        for a reseed, unscored); see the module docstring.
    """

    member_id: int
    env_steps: int
    donor_id: int
    donor_checkpoint: str
    donor_env_steps: int
    old_hyperparameters: dict[str, Value]
    new_hyperparameters: dict[str, Value]
    operations: dict[str, str]
    member_score: float
    donor_score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite scores become None)."""
        return {"decision": "exploit", **{f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}}


Decision = Continue | Exploit
