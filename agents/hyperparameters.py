"""Checking new hyperparameter values before a learner takes them (PBT's explore, a loaded state).

Names and types are the learner's concern (numbers only, numpy numbers included, as a scheduler
draws them); ranges are the config's one rule (:mod:`pbt_rl.config`), so a value a config file
may not hold is refused here with the same message.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pbt_rl.config import check_agent_value, tunable_agent_fields

def coerce_hyperparameters(values: dict[str, Any]) -> dict[str, int | float]:
    """New hyperparameter values as the agent config's types, after checking names, types and ranges.

    Raises:
        KeyError: a name that is not a numeric agent-config field.
        ValueError: a value of the wrong type or outside the field's range.
    """
    tunable = tunable_agent_fields()
    unknown = sorted(set(values) - set(tunable))
    if unknown:
        raise KeyError(f"unknown hyperparameter(s) {unknown}; allowed: {', '.join(sorted(tunable))}")
    converted: dict[str, int | float] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"agent.{name}: expected a number, got {value!r}")
        if tunable[name] is int:
            if not float(value).is_integer():
                raise ValueError(f"agent.{name}: expected an integer, got {value!r}")
            number: int | float = int(value)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"agent.{name}: expected a finite number, got {value!r}")
        check_agent_value(name, number)
        converted[name] = number
    return converted
