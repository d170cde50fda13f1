"""The PBT search space: the rules of a ParamSpec, priors, perturbation and resampling of hyperparameters.

Pure numpy; every random choice comes from the ``numpy.random.Generator`` the caller passes in,
so the same generator state gives the same values and operations.

Values are plain Python numbers: ``int`` for ``int`` / ``log_int`` parameters (and categorical
parameters of integer agent fields), ``float`` otherwise.

Rules of a parameter (this module owns them; :func:`pbt_rl.config.validate` adds only how a
parameter relates to the agent config, and reaches these through :meth:`SearchSpace.from_config`):
- ``kind`` and ``perturb`` are among the ``choices`` of those ``ParamSpec`` fields;
  ``factors``, and the space's default factors (``pbt.perturb_factors``), are finite and > 0,
  and the default factors are not empty;
- a categorical parameter has a non-empty list of ``choices`` and no ``low`` / ``high``; every
  other kind has ``low`` and ``high`` and no ``choices``; ``int`` / ``log_int`` bounds are integers;
- ``low <= high``; the log kinds need ``low > 0``; ``perturb: one_minus`` needs ``0 <= low`` and
  ``high < 1``;
- ``init`` lies inside the bounds (an integer for the integer kinds), or is one of the choices;
- each name is declared once.
A broken rule is one :class:`~pbt_rl.config.ConfigError` naming the key
(``pbt.search_space.<name>.<field>``).

Priors (``ParamSpec.kind``):
- ``uniform``: uniform on [low, high].
- ``log_uniform``: log x uniform on [log low, log high].
- ``int``: uniform over the integers low..high.
- ``log_int``: floor of a log-uniform draw on [low, high + 1), so integer k has probability
  proportional to log((k + 1) / k).
- ``categorical``: uniform over ``choices``.
``sample`` returns ``init`` instead of a draw where a parameter sets it; a resample in
``explore`` always draws from the prior (``init`` is an initial value, not a prior).

Perturbation (the explore step of Jaderberg et al. 2017):
- numeric: multiply by a factor picked uniformly from the parameter's ``factors`` (empty = the
  space's default factors, ``pbt.perturb_factors``). ``perturb: one_minus`` multiplies 1 - x
  instead (x' = 1 - (1 - x) * f), which suits discounts such as gamma.
- integers are rounded half up; if rounding leaves the value unchanged although the factor is not 1,
  the value steps by 1 in the factor's direction, so a perturbation moves whenever the bounds allow.
- categorical: step to a neighbouring choice (in the order the choices are listed), picked
  uniformly; at either end the only neighbour. A value that is not a choice steps from the
  nearest choice.
- the result is always clamped to [low, high].
A value of exactly 0 cannot move multiplicatively; a float stays at 0 (an integer steps by 1).

Operation strings (one per parameter explored; lineage rows carry them):
``"*1.2"``, ``"1-x *0.8"``, ``"*1.2 step +1"`` (integer step after rounding), any of those with
``" clamped"`` appended when the bounds cut the result, ``"neighbour +1"`` / ``"neighbour -1"`` /
``"neighbour none"`` (a categorical with one choice), and ``"resample"``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from pbt_rl.config import ConfigError, ParamSpec, PBTConfig, tunable_agent_fields

Value = float | int


def _choices(config_class: type, field_name: str) -> tuple[str, ...]:
    """The ``choices`` metadata of a config field: config.py lists the allowed values once."""
    return next(f for f in dataclasses.fields(config_class) if f.name == field_name).metadata["choices"]


KINDS = _choices(ParamSpec, "kind")
PERTURB_RULES = _choices(ParamSpec, "perturb")
EXPLORE_MODES = tuple(m for m in _choices(PBTConfig, "explore") if m != "pb2")
"""The explore modes this module carries out ('pb2' is the scheduler's: :mod:`pbt_rl.pb2`)."""
INTEGER_KINDS = ("int", "log_int")
"""Kinds whose values are integers (the other numeric kinds take real numbers)."""
LOG_KINDS = ("log_uniform", "log_int")


@dataclass(frozen=True)
class _Param:
    """A ParamSpec that keeps the rules, its numbers converted to the type its values take."""

    name: str
    kind: str
    value_type: type  # int or float: the type of every value this parameter takes
    low: Value | None
    high: Value | None
    choices: tuple[Value, ...]
    init: Value | None
    perturb: str
    factors: tuple[float, ...]  # its own; empty = the space's default factors


def _as_type(value: Any, value_type: type, what: str) -> Value:
    """float(value) / int(value), refusing non-numbers and non-integral ints."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    try:
        as_float = float(value)  # also reads YAML 1.1 strings such as "3e-4"
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(as_float):
        raise ConfigError(f"{what}: expected a finite number, got {value!r}")
    if value_type is int:
        if not as_float.is_integer():
            raise ConfigError(f"{what}: expected an integer, got {value!r}")
        return int(as_float)
    return as_float


def _factors(factors: Sequence[Any], what: str) -> tuple[float, ...]:
    """The factors as floats, refusing any that is not a finite number > 0."""
    as_floats = []
    for factor in factors:
        try:
            as_floats.append(float(factor))
        except (TypeError, ValueError):
            as_floats.append(math.nan)
    if any(not f > 0 or not math.isfinite(f) for f in as_floats):
        raise ConfigError(f"{what}: every factor must be > 0 and finite, got {list(factors)}")
    return tuple(as_floats)


def _resolve(spec: ParamSpec) -> _Param:
    """The parameter, or a ConfigError for the first rule of the module docstring it breaks."""
    key = f"pbt.search_space.{spec.name}"
    if spec.kind not in KINDS:
        raise ConfigError(f"{key}.kind: {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.perturb not in PERTURB_RULES:
        raise ConfigError(f"{key}.perturb: {spec.perturb!r} is not one of {', '.join(PERTURB_RULES)}")
    factors = _factors(spec.factors, f"{key}.factors")
    if spec.kind == "categorical":
        if not spec.choices:
            raise ConfigError(f"{key}.choices: a categorical parameter needs a non-empty list of choices")
        if spec.low is not None or spec.high is not None:
            raise ConfigError(f"{key}: a categorical parameter takes choices, not low/high")
        field_type = tunable_agent_fields().get(spec.name)
        if field_type is None:  # not an agent field (tests, other callers): ints stay ints
            integral = all(isinstance(c, int) and not isinstance(c, bool) for c in spec.choices)
            field_type = int if integral else float
        choices = tuple(_as_type(c, field_type, f"{key}.choices[{i}]") for i, c in enumerate(spec.choices))
        init = None if spec.init is None else _as_type(spec.init, field_type, f"{key}.init")
        if init is not None and init not in choices:
            raise ConfigError(f"{key}.init: {spec.init!r} is not one of the choices {list(choices)}")
        return _Param(spec.name, spec.kind, field_type, None, None, choices, init, spec.perturb, factors)
    if spec.choices:
        raise ConfigError(f"{key}.choices: only a categorical parameter takes choices")
    value_type = int if spec.kind in INTEGER_KINDS else float
    if spec.low is None or spec.high is None:
        raise ConfigError(f"{key}: kind {spec.kind} needs both low and high")
    low = _as_type(spec.low, value_type, f"{key}.low")
    high = _as_type(spec.high, value_type, f"{key}.high")
    if low > high:
        raise ConfigError(f"{key}: inverted bounds, low ({low}) > high ({high})")
    if spec.kind in LOG_KINDS and low <= 0:
        raise ConfigError(f"{key}.low: {spec.kind} needs low > 0, got {low}")
    if spec.perturb == "one_minus" and not (0 <= low and high < 1):
        raise ConfigError(f"{key}.perturb: one_minus needs bounds inside [0, 1), got [{low}, {high}]")
    init = None if spec.init is None else _as_type(spec.init, value_type, f"{key}.init")
    if init is not None and not low <= init <= high:
        raise ConfigError(f"{key}.init: {init} is outside its bounds [{low}, {high}]")
    return _Param(spec.name, spec.kind, value_type, low, high, (), init, spec.perturb, factors)


class SearchSpace:
    """The hyperparameters PBT evolves, in the order the config lists them.

    ``default_factors`` are the perturbation factors of a parameter without its own
    (``pbt.perturb_factors``; :meth:`from_config` passes them).
    """

    def __init__(self, specs: Sequence[ParamSpec], default_factors: Sequence[float]):
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.default_factors: tuple[float, ...] = _factors(default_factors, "pbt.perturb_factors")
        if not self.default_factors:
            raise ConfigError("pbt.perturb_factors: needs at least one factor")
        params = [_resolve(spec) for spec in self.specs]
        names = [p.name for p in params]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"pbt.search_space.{duplicates[0]}: declared twice")
        self._params: dict[str, _Param] = {p.name: p for p in params}

    @classmethod
    def from_config(cls, pbt_cfg: PBTConfig) -> "SearchSpace":
        return cls(pbt_cfg.search_space, default_factors=pbt_cfg.perturb_factors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return f"SearchSpace({', '.join(self._params)})"

    # ------------------------------------------------------------------ priors

    def sample(self, rng: np.random.Generator) -> dict[str, Value]:
        """One value per parameter: its ``init`` where set, otherwise a draw from its prior."""
        return {p.name: (p.init if p.init is not None else self._draw(p, rng)) for p in self._params.values()}

    # ------------------------------------------------------------------ explore

    def explore(
        self,
        values: Mapping[str, Any],
        rng: np.random.Generator,
        mode: str,
        resample_probability: float,
        only: Collection[str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The explore step after an exploit: every search-space parameter gets one operation.

        mode 'perturb': perturb all; 'resample': redraw all from the prior; 'perturb_or_resample'
        (the paper's combination): each parameter independently is redrawn with probability
        ``resample_probability`` (``pbt.resample_probability``) and perturbed otherwise. Keys
        outside the space pass through, and so do the space's parameters not in ``only`` (when
        given). Returns (new values, {name: operation string}).
        """
        if mode not in EXPLORE_MODES:
            raise ValueError(f"explore mode {mode!r} is not one of {', '.join(EXPLORE_MODES)}")
        self._require_names(values)
        new = dict(values)
        operations: dict[str, str] = {}
        for p in self._params.values():
            if only is not None and p.name not in only:
                continue
            redraw = mode == "resample" or (mode == "perturb_or_resample" and rng.random() < resample_probability)
            if redraw:
                new[p.name], operations[p.name] = self._draw(p, rng), "resample"
            else:
                new[p.name], operations[p.name] = self._perturb_one(p, values[p.name], rng)
        return new, operations

    # ------------------------------------------------------------------ the unit cube (PB2)

    @property
    def numeric_names(self) -> tuple[str, ...]:
        """The parameters that are not categorical (real or integer), in the config's order."""
        return tuple(p.name for p in self._params.values() if p.kind != "categorical")

    def to_unit(self, name: str, value: Any) -> float:
        """A numeric parameter's value mapped onto [0, 1]: linear in the value for ``uniform`` /
        ``int``, in its logarithm for the log kinds (0 when low == high); clamped first."""
        p = self._numeric(name)
        x, _ = self._clamp_one(p, value)
        low, high, x = (math.log(v) for v in (p.low, p.high, x)) if p.kind in LOG_KINDS else (p.low, p.high, x)
        return 0.0 if high == low else min(1.0, max(0.0, (x - low) / (high - low)))

    def from_unit(self, name: str, unit: float) -> Value:
        """The inverse of :meth:`to_unit`: a value inside the bounds (integers rounded half up)."""
        p = self._numeric(name)
        u = min(1.0, max(0.0, float(unit)))
        if p.kind in LOG_KINDS:
            raw = math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low)))
        else:
            raw = p.low + u * (p.high - p.low)
        return self._clamp_one(p, raw)[0]

    def _numeric(self, name: str) -> _Param:
        p = self._params[name]
        if p.kind == "categorical":
            raise ValueError(f"{name} is categorical: it has no place on the unit interval")
        return p

    # ------------------------------------------------------------------ one parameter

    def _require_names(self, values: Mapping[str, Any]) -> None:
        missing = [name for name in self._params if name not in values]
        if missing:
            raise KeyError(f"hyperparameters {missing} of the search space are missing from {sorted(values)}")

    @staticmethod
    def _draw(p: _Param, rng: np.random.Generator) -> Value:
        if p.kind == "categorical":
            return p.choices[int(rng.integers(len(p.choices)))]
        if p.kind == "uniform":
            value: Value = float(rng.uniform(p.low, p.high))
        elif p.kind == "log_uniform":
            value = float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
        elif p.kind == "int":
            value = int(rng.integers(p.low, p.high + 1))
        else:  # log_int
            value = int(math.floor(math.exp(rng.uniform(math.log(p.low), math.log(p.high + 1)))))
        # exp(log(x)) can land one ulp outside the bounds.
        return min(max(value, p.low), p.high)

    @staticmethod
    def _clamp_one(p: _Param, value: Any) -> tuple[Value, bool]:
        """(value inside the bounds, whether it had to be moved)."""
        number = float(value)
        if math.isnan(number):
            raise ValueError(f"{p.name}: cannot clamp NaN")
        if p.kind == "categorical":
            if value in p.choices:
                return p.choices[p.choices.index(value)], False
            nearest = min(range(len(p.choices)), key=lambda i: abs(p.choices[i] - number))
            return p.choices[nearest], True
        if p.value_type is int:
            number = math.floor(number + 0.5) if math.isfinite(number) else number
        clamped = min(max(number, p.low), p.high)
        return p.value_type(clamped), clamped != number

    def _perturb_one(self, p: _Param, value: Any, rng: np.random.Generator) -> tuple[Value, str]:
        if p.kind == "categorical":
            current, _ = self._clamp_one(p, value)
            index = p.choices.index(current)
            neighbours = [i for i in (index - 1, index + 1) if 0 <= i < len(p.choices)]
            if not neighbours:
                return current, "neighbour none"
            chosen = neighbours[int(rng.integers(len(neighbours)))]
            return p.choices[chosen], f"neighbour {chosen - index:+d}"

        factors = p.factors or self.default_factors
        factor = factors[int(rng.integers(len(factors)))]
        x = float(value)
        if p.perturb == "one_minus":
            raw = 1.0 - (1.0 - x) * factor
            operation = f"1-x *{factor:g}"
        else:
            raw = x * factor
            operation = f"*{factor:g}"
        if p.value_type is int:
            start = math.floor(x + 0.5)
            moved = math.floor(raw + 0.5)
            if moved == start and factor != 1.0:
                if raw != x:
                    direction = 1 if raw > x else -1
                else:  # x == 0 under multiply (or 1 under one_minus): go where the factor points
                    grows = (factor > 1.0) == (p.perturb == "multiply")
                    direction = 1 if grows else -1
                moved = start + direction
                operation += f" step {direction:+d}"
            raw = moved
        result, clamped = self._clamp_one(p, raw)
        if clamped:
            operation += " clamped"
        return result, operation
