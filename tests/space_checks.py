"""Bounds check of hyperparameter values against ParamSpecs, written from the specs alone.

Independent of pbt_rl.search_space on purpose: tests of the search space and of the scheduler
use it to check that explored values stay inside the space, so it must not share that code.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from pbt_rl.config import ParamSpec


def inside_search_space(specs: Iterable[ParamSpec], values: Mapping[str, Any]) -> bool:
    """True if every spec's name is in ``values`` with a finite real number that is one of its
    choices (categorical) or lies in [low, high] and, for int / log_int, is an ``int``."""
    for spec in specs:
        if spec.name not in values:
            return False
        value = values[spec.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if spec.kind == "categorical":
            if not any(value == float(choice) for choice in spec.choices):
                return False
            continue
        if spec.kind in ("int", "log_int") and not isinstance(value, int):
            return False
        if not float(spec.low) <= value <= float(spec.high):
            return False
    return True
