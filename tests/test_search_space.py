"""Search space: the rules of a parameter, priors, perturbation, resampling, explore modes, bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.config import ConfigError, ParamSpec, from_dict
from pbt_rl.search_space import SearchSpace
from space_checks import inside_search_space

SPECS = (
    ParamSpec(name="lr", kind="log_uniform", low=1e-4, high=1e-2),
    ParamSpec(name="entropy_cost", kind="uniform", low=0.0, high=0.05),
    ParamSpec(name="unroll_length", kind="int", low=1, high=20),
    ParamSpec(name="learner_batch_unrolls", kind="log_int", low=1, high=64),
    ParamSpec(name="gamma", kind="uniform", low=0.9, high=0.999, perturb="one_minus"),
    ParamSpec(name="value_cost", kind="categorical", choices=(0.25, 0.5, 1.0)),
)
FACTORS = (0.8, 1.2)
SPACE = SearchSpace(SPECS, default_factors=FACTORS)
INT_NAMES = ("unroll_length", "learner_batch_unrolls")


def rng(seed=0):
    return np.random.default_rng(seed)


def space_of(*specs, factors=FACTORS):
    return SearchSpace(specs, default_factors=factors)


def inside(values, specs=SPECS):
    return inside_search_space(specs, values)


def perturb(space, values, generator):
    """explore in mode perturb (where the resample probability plays no part)."""
    return space.explore(values, generator, "perturb", resample_probability=0.0)


def resample(space, values, generator):
    return space.explore(values, generator, "resample", resample_probability=0.0)


# ---------------------------------------------------------------------------- priors


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_samples_lie_inside_the_space_with_the_field_types(seed):
    values = SPACE.sample(rng(seed))
    assert inside(values)
    assert set(values) == set(SPACE.names)
    for name in INT_NAMES:
        assert type(values[name]) is int
    for name in ("lr", "entropy_cost", "gamma", "value_cost"):
        assert type(values[name]) is float


def test_log_uniform_prior_is_uniform_in_log_space():
    space = space_of(ParamSpec(name="lr", kind="log_uniform", low=1e-5, high=1e-1))
    generator = rng(1)
    logs = np.log10([space.sample(generator)["lr"] for _ in range(4000)])
    # Each decade holds a quarter of the mass (a uniform prior would put ~90% in the top decade).
    counts = np.histogram(logs, bins=[-5, -4, -3, -2, -1])[0] / len(logs)
    np.testing.assert_allclose(counts, 0.25, atol=0.03)


def test_degenerate_log_uniform_bounds_are_respected_exactly():
    # exp(log(0.001)) is one ulp above 0.001: the draw must still lie inside [low, high].
    space = space_of(ParamSpec(name="lr", kind="log_uniform", low=0.001, high=0.001))
    assert space.sample(rng()) == {"lr": 0.001}


def test_integer_priors_cover_both_bounds():
    space = space_of(ParamSpec(name="unroll_length", kind="int", low=3, high=6),
                     ParamSpec(name="queue_size", kind="log_int", low=1, high=8))
    generator = rng(2)
    draws = [space.sample(generator) for _ in range(2000)]
    assert {d["unroll_length"] for d in draws} == {3, 4, 5, 6}
    log_ints = [d["queue_size"] for d in draws]
    assert set(log_ints) == set(range(1, 9))
    # log_int: P(k) is proportional to log((k+1)/k), so 1 is drawn log(2)/log(9) ~ 32% of the time.
    assert log_ints.count(1) / len(log_ints) == pytest.approx(math.log(2) / math.log(9), abs=0.03)


def test_categorical_prior_draws_every_choice():
    generator = rng(3)
    assert {SPACE.sample(generator)["value_cost"] for _ in range(200)} == {0.25, 0.5, 1.0}


def test_init_overrides_sampling_but_not_resampling():
    space = space_of(ParamSpec(name="lr", kind="log_uniform", low=1e-4, high=1e-2, init=3e-4),
                     ParamSpec(name="value_cost", kind="categorical", choices=(0.25, 0.5), init=0.5))
    generator = rng(4)
    assert all(space.sample(generator) == {"lr": 3e-4, "value_cost": 0.5} for _ in range(20))
    redrawn = [resample(space, {"lr": 3e-4, "value_cost": 0.5}, generator)[0] for _ in range(40)]
    assert len({values["lr"] for values in redrawn}) == 40
    assert {values["value_cost"] for values in redrawn} == {0.25, 0.5}


def test_same_generator_state_gives_the_same_values():
    values = SPACE.sample(rng(5))
    assert SPACE.sample(rng(9)) == SPACE.sample(rng(9))
    assert SPACE.explore(values, rng(9), "perturb_or_resample", 0.5) == SPACE.explore(values, rng(9), "perturb_or_resample", 0.5)


# ---------------------------------------------------------------------------- perturbation


def test_multiply_perturbation_and_its_operation_string():
    space = space_of(ParamSpec(name="lr", kind="log_uniform", low=1e-4, high=1e-2), factors=(1.2,))
    new, ops = perturb(space, {"lr": 1e-3, "other": "kept"}, rng())
    assert new == {"lr": pytest.approx(1.2e-3), "other": "kept"}
    assert ops == {"lr": "*1.2"}


def test_perturbation_is_clamped_and_says_so():
    space = space_of(ParamSpec(name="lr", kind="log_uniform", low=1e-4, high=1e-2), factors=(1.2,))
    new, ops = perturb(space, {"lr": 9e-3}, rng())
    assert new["lr"] == 1e-2
    assert ops == {"lr": "*1.2 clamped"}


def test_one_minus_perturbs_the_complement():
    space = space_of(ParamSpec(name="gamma", kind="uniform", low=0.9, high=0.999, perturb="one_minus"), factors=(1.2,))
    new, ops = perturb(space, {"gamma": 0.99}, rng())
    assert new["gamma"] == pytest.approx(1 - 0.01 * 1.2)
    assert ops == {"gamma": "1-x *1.2"}


def test_factors_are_picked_uniformly_from_the_parameter_factors():
    space = space_of(ParamSpec(name="lr", kind="uniform", low=0.0, high=100.0, factors=(0.5, 2.0)))
    generator = rng(6)
    results = [perturb(space, {"lr": 10.0}, generator)[0]["lr"] for _ in range(1000)]
    assert set(results) == {5.0, 20.0}
    assert results.count(20.0) / len(results) == pytest.approx(0.5, abs=0.05)


def test_default_factors_come_from_the_config():
    config = from_dict({"pbt": {"population_size": 2, "perturb_factors": [0.5],
                                "search_space": {"value_cost": {"kind": "uniform", "low": 0.0, "high": 1.0},
                                                 "entropy_cost": {"kind": "uniform", "low": 0.0, "high": 1.0, "factors": [1.5]}}}})
    space = SearchSpace.from_config(config.pbt)
    new, ops = perturb(space, {"value_cost": 0.4, "entropy_cost": 0.4}, rng())
    assert new == {"value_cost": pytest.approx(0.2), "entropy_cost": pytest.approx(0.6)}
    assert ops == {"value_cost": "*0.5", "entropy_cost": "*1.5"}


@pytest.mark.parametrize("value,factor,expected,operation", [
    (10, 1.2, 12, "*1.2"),
    (10, 0.8, 8, "*0.8"),
    (2, 1.2, 3, "*1.2 step +1"),  # 2.4 rounds back to 2
    (2, 0.8, 1, "*0.8 step -1"),  # 1.6 rounds back to 2
    (4, 1.1, 5, "*1.1 step +1"),
    (20, 1.2, 20, "*1.2 clamped"),
    (1, 0.8, 1, "*0.8 step -1 clamped"),
])
def test_integer_perturbation_rounds_and_always_moves_when_it_can(value, factor, expected, operation):
    space = space_of(ParamSpec(name="unroll_length", kind="int", low=1, high=20), factors=(factor,))
    new, ops = perturb(space, {"unroll_length": value}, rng())
    assert new["unroll_length"] == expected and type(new["unroll_length"]) is int
    assert ops["unroll_length"] == operation


def test_integer_zero_steps_in_the_factor_direction():
    space = space_of(ParamSpec(name="unroll_length", kind="int", low=0, high=5), factors=(1.2,))
    assert perturb(space, {"unroll_length": 0}, rng()) == ({"unroll_length": 1}, {"unroll_length": "*1.2 step +1"})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), value=st.integers(1, 64))
def test_integer_perturbation_moves_unless_a_bound_stops_it(seed, value):
    space = space_of(ParamSpec(name="queue_size", kind="log_int", low=1, high=64))
    new, ops = perturb(space, {"queue_size": value}, rng(seed))
    if new["queue_size"] == value:
        assert value in (1, 64) and ops["queue_size"].endswith("clamped")
    assert abs(new["queue_size"] - value) <= max(1, math.ceil(value * 0.2))


def test_categorical_steps_to_a_neighbour():
    generator = rng(7)
    middle = [perturb(SPACE, {**SPACE.sample(generator), "value_cost": 0.5}, generator) for _ in range(200)]
    assert {new["value_cost"] for new, _ in middle} == {0.25, 1.0}
    assert {ops["value_cost"] for _, ops in middle} == {"neighbour -1", "neighbour +1"}
    for new, ops in middle:
        assert ops["value_cost"] == ("neighbour -1" if new["value_cost"] == 0.25 else "neighbour +1")
    # At an end the only neighbour.
    for _ in range(20):
        assert perturb(SPACE, {**SPACE.sample(generator), "value_cost": 0.25}, generator)[0]["value_cost"] == 0.5
        assert perturb(SPACE, {**SPACE.sample(generator), "value_cost": 1.0}, generator)[0]["value_cost"] == 0.5


def test_categorical_with_one_choice_stays():
    space = space_of(ParamSpec(name="value_cost", kind="categorical", choices=(0.5,)))
    assert perturb(space, {"value_cost": 0.5}, rng()) == ({"value_cost": 0.5}, {"value_cost": "neighbour none"})


# ---------------------------------------------------------------------------- resample / explore


def test_explore_modes():
    values = {**SPACE.sample(rng(10)), "algo": "a2c"}
    generator = rng(11)
    # Modes perturb and resample ignore the resample probability.
    perturbed, ops = SPACE.explore(values, generator, "perturb", resample_probability=1.0)
    assert set(ops) == set(SPACE.names) and "resample" not in ops.values()
    resampled, ops = SPACE.explore(values, generator, "resample", resample_probability=0.0)
    assert ops == {name: "resample" for name in SPACE.names}
    assert perturbed["algo"] == resampled["algo"] == "a2c"
    assert inside(perturbed) and inside(resampled)
    never, ops = SPACE.explore(values, generator, "perturb_or_resample", resample_probability=0.0)
    assert set(ops) == set(SPACE.names) and "resample" not in ops.values()
    always, ops = SPACE.explore(values, generator, "perturb_or_resample", resample_probability=1.0)
    assert ops == {name: "resample" for name in SPACE.names}
    assert inside(never) and inside(always) and never["algo"] == always["algo"] == "a2c"
    with pytest.raises(ValueError, match="explore mode"):
        SPACE.explore(values, generator, "mutate", resample_probability=0.0)


@pytest.mark.parametrize("probability", [0.25, 0.6])
def test_perturb_or_resample_resamples_each_parameter_with_the_probability(probability):
    values = SPACE.sample(rng(12))
    generator = rng(13)
    explored = [SPACE.explore(values, generator, "perturb_or_resample", probability)[1] for _ in range(800)]
    for name in SPACE.names:
        share = sum(ops[name] == "resample" for ops in explored) / len(explored)
        assert share == pytest.approx(probability, abs=0.05)
    # Independently per parameter: all six at once about probability**6 of the time.
    all_at_once = sum(set(ops.values()) == {"resample"} for ops in explored) / len(explored)
    assert all_at_once == pytest.approx(probability ** len(SPACE), abs=0.03)


def test_missing_search_space_value_is_a_key_error():
    for mode in ("perturb", "resample", "perturb_or_resample"):
        with pytest.raises(KeyError, match="gamma"):
            SPACE.explore({name: v for name, v in SPACE.sample(rng()).items() if name != "gamma"}, rng(), mode, 0.5)


# ---------------------------------------------------------------------------- bounds

# (mode, resample probability) of one explore step
step = st.sampled_from([("perturb", 0.0), ("resample", 0.0), ("perturb_or_resample", 0.25), ("perturb_or_resample", 0.5)])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.lists(step, min_size=1, max_size=40),
       factors=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=3))
def test_values_stay_inside_the_bounds_under_any_sequence(seed, steps, factors):
    space = SearchSpace(SPECS, default_factors=factors)
    generator = rng(seed)
    values = space.sample(generator)
    for mode, probability in steps:
        values, _ = space.explore(values, generator, mode, probability)
        assert inside(values), (mode, values)
        assert all(type(values[n]) is int for n in INT_NAMES)


def test_a_factor_of_one_only_pulls_values_inside_the_bounds():
    space = SearchSpace(SPECS, default_factors=(1.0,))
    values = {"lr": 1.0, "entropy_cost": -1.0, "unroll_length": 7.6, "learner_batch_unrolls": 500,
              "gamma": 0.5, "value_cost": 0.8, "algo": "a2c"}
    pulled, ops = perturb(space, values, rng())
    # Integers round half up; a categorical value that is no choice steps from the nearest one (1.0).
    assert pulled == {"lr": 1e-2, "entropy_cost": 0.0, "unroll_length": 8, "learner_batch_unrolls": 64,
                      "gamma": 0.9, "value_cost": 0.5, "algo": "a2c"}
    assert ops == {"lr": "*1 clamped", "entropy_cost": "*1 clamped", "unroll_length": "*1",
                   "learner_batch_unrolls": "*1 clamped", "gamma": "1-x *1 clamped", "value_cost": "neighbour -1"}
    assert inside(pulled)
    # Values inside stay where they are.
    again, ops = perturb(space, pulled, rng())
    assert {k: v for k, v in again.items() if k != "value_cost"} == {k: v for k, v in pulled.items() if k != "value_cost"}
    assert not any(op.endswith("clamped") for op in ops.values())


def test_the_bounds_check_of_the_tests_rejects_out_of_bounds_wrong_type_and_missing():
    # tests/space_checks.py is what every bounds test relies on: it must be able to fail.
    good = {"lr": 1e-3, "entropy_cost": 0.0, "unroll_length": 20, "learner_batch_unrolls": 1,
            "gamma": 0.999, "value_cost": 0.25, "algo": "a2c"}
    assert inside(good)
    for name, bad in [("lr", 0.5), ("lr", 9e-5), ("gamma", 0.5), ("entropy_cost", -1e-9), ("unroll_length", 2.5),
                      ("unroll_length", 5.0), ("unroll_length", 0), ("learner_batch_unrolls", 65),
                      ("value_cost", 0.3), ("lr", math.nan), ("lr", math.inf), ("lr", "0.001"), ("unroll_length", True)]:
        assert not inside({**good, name: bad}), (name, bad)
    assert not inside({k: v for k, v in good.items() if k != "lr"})


# ---------------------------------------------------------------------------- rules of a parameter


def spec(**fields):
    return ParamSpec(**{"name": "lr", "kind": "uniform", "low": 0.1, "high": 0.5, **fields})


@pytest.mark.parametrize("specs,factors,key,message", [
    ((spec(kind="gaussian"),), FACTORS, "pbt.search_space.lr.kind", "'gaussian' is not one of"),
    ((spec(perturb="add"),), FACTORS, "pbt.search_space.lr.perturb", "'add' is not one of"),
    ((spec(factors=(1.2, 0.0)),), FACTORS, "pbt.search_space.lr.factors", "every factor must be > 0"),
    ((spec(factors=(-0.8,)),), FACTORS, "pbt.search_space.lr.factors", "every factor must be > 0"),
    ((spec(factors=(math.inf,)),), FACTORS, "pbt.search_space.lr.factors", "finite"),
    ((spec(),), (0.8, 0.0), "pbt.perturb_factors", "every factor must be > 0"),
    ((spec(factors=(1.2,)),), (), "pbt.perturb_factors", "at least one factor"),
    ((spec(kind="categorical", low=None, high=None),), FACTORS, "pbt.search_space.lr.choices", "non-empty"),
    ((spec(kind="categorical", choices=(0.1, 0.2)),), FACTORS, "pbt.search_space.lr", "takes choices, not low/high"),
    ((spec(choices=(0.1, 0.2)),), FACTORS, "pbt.search_space.lr.choices", "only a categorical"),
    ((spec(high=None),), FACTORS, "pbt.search_space.lr", "needs both low and high"),
    ((spec(low=None),), FACTORS, "pbt.search_space.lr", "needs both low and high"),
    ((spec(name="unroll_length", kind="int", low=1.5, high=5),), FACTORS, "pbt.search_space.unroll_length.low", "integer"),
    ((spec(name="queue_size", kind="log_int", low=1, high=5.5),), FACTORS, "pbt.search_space.queue_size.high", "integer"),
    ((spec(low=0.5, high=0.1),), FACTORS, "pbt.search_space.lr", "inverted bounds"),
    ((spec(kind="log_uniform", low=0.0),), FACTORS, "pbt.search_space.lr.low", "log_uniform needs low > 0"),
    ((spec(name="queue_size", kind="log_int", low=0, high=4),), FACTORS, "pbt.search_space.queue_size.low", "log_int needs low > 0"),
    ((spec(name="gamma", low=0.9, high=1.0, perturb="one_minus"),), FACTORS, "pbt.search_space.gamma.perturb", "[0, 1)"),
    ((spec(name="gamma", low=-0.1, high=0.9, perturb="one_minus"),), FACTORS, "pbt.search_space.gamma.perturb", "[0, 1)"),
    ((spec(init=0.6),), FACTORS, "pbt.search_space.lr.init", "outside its bounds"),
    ((spec(init=0.05),), FACTORS, "pbt.search_space.lr.init", "outside its bounds"),
    ((spec(name="unroll_length", kind="int", low=1, high=20, init=4.5),), FACTORS, "pbt.search_space.unroll_length.init", "integer"),
    ((spec(kind="categorical", low=None, high=None, choices=(0.1, 0.2), init=0.3),), FACTORS, "pbt.search_space.lr.init",
     "not one of the choices"),
    ((spec(), spec(low=0.2)), FACTORS, "pbt.search_space.lr", "declared twice"),
])
def test_a_parameter_that_breaks_a_rule_is_refused_naming_its_key(specs, factors, key, message):
    with pytest.raises(ConfigError) as info:
        SearchSpace(specs, default_factors=factors)
    assert str(info.value).startswith(f"{key}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edge", [
    spec(low=0.3, high=0.3),
    spec(kind="log_uniform", low=1e-300, high=1.0),
    spec(name="gamma", low=0.0, high=0.999, perturb="one_minus"),
    spec(name="unroll_length", kind="int", low=0, high=20, init=20),
    spec(name="unroll_length", kind="int", low=1.0, high="20"),
    spec(init=0.1),
    spec(init=0.5),
    spec(kind="categorical", low=None, high=None, choices=(0.2,), init=0.2),
])
def test_parameters_at_the_edges_of_the_rules_are_accepted(edge):
    space = SearchSpace((edge,), default_factors=FACTORS)
    assert inside_search_space((edge,), space.sample(rng()))


# ---------------------------------------------------------------------------- the unit cube (PB2)

UNIT_SPACE = [
    ParamSpec("lr", kind="log_uniform", low=1e-4, high=1e-2),
    ParamSpec("gamma", kind="uniform", low=0.9, high=0.999),
    ParamSpec("unroll_length", kind="int", low=1, high=20),
    ParamSpec("learner_batch_unrolls", kind="log_int", low=1, high=64),
    ParamSpec("num_epochs", kind="categorical", choices=(1, 2, 4)),
]


@settings(max_examples=60, deadline=None)
@given(unit=st.floats(-0.5, 1.5, allow_nan=False))
def test_from_unit_stays_inside_the_bounds_and_to_unit_inverts_it(unit):
    space = SearchSpace(UNIT_SPACE, default_factors=(0.8, 1.2))
    assert space.numeric_names == ("lr", "gamma", "unroll_length", "learner_batch_unrolls")
    values = {name: space.from_unit(name, unit) for name in space.numeric_names}
    assert inside_search_space(UNIT_SPACE[:4], values)
    for name in ("lr", "gamma"):  # real parameters: an exact inverse on [0, 1]
        assert space.to_unit(name, values[name]) == pytest.approx(min(1.0, max(0.0, unit)), abs=1e-9)
    for name in ("unroll_length", "learner_batch_unrolls"):  # integers: the inverse of the rounded value
        assert space.from_unit(name, space.to_unit(name, values[name])) == values[name]


def test_log_kinds_map_their_logarithm_linearly():
    space = SearchSpace(UNIT_SPACE, default_factors=(0.8, 1.2))
    assert space.to_unit("lr", 1e-3) == pytest.approx(0.5)
    assert space.to_unit("gamma", 0.9495) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="categorical"):
        space.to_unit("num_epochs", 2)
