"""Config rules the PBT core relies on: each bad value is one ConfigError naming its key."""

from __future__ import annotations

import re

import pytest

from pbt_rl.config import ConfigError, from_dict
from pbt_rl.scheduler import Scheduler

LR = {"kind": "log_uniform", "low": 1e-4, "high": 1e-2}


def pbt(**fields):
    """A minimal raw config: a population of 4 evolving lr, with ``fields`` overriding pbt keys."""
    return {"pbt": {"population_size": 4, "search_space": {"lr": dict(LR)}, **fields}}


def assert_config_error(raw, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        from_dict(raw)
    # One line, usable as the CLI's error message.
    assert "\n" not in str(info.value)


def test_minimal_population_config_is_valid_and_builds_a_scheduler():
    config = from_dict(pbt(exploit="ttest", truncation_fraction=0.5))
    scheduler = Scheduler(config.pbt, seed=0)
    assert scheduler.search_space.names == ("lr",)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0])
def test_truncation_fraction_outside_zero_to_half(fraction):
    assert_config_error(pbt(truncation_fraction=fraction), "pbt.truncation_fraction")


@pytest.mark.parametrize("key,value", [("resample_probability", 1.5), ("resample_probability", -0.1), ("ttest_alpha", 0.0), ("ttest_alpha", 1.0)])
def test_other_probabilities_outside_their_ranges(key, value):
    assert_config_error(pbt(**{key: value}), f"pbt.{key}")


def test_empty_search_space_with_a_population():
    assert_config_error({"pbt": {"population_size": 2}}, "pbt.search_space")
    # A single member needs nothing to evolve.
    assert from_dict({"pbt": {"population_size": 1}}).pbt.search_space == ()


def test_inverted_bounds():
    raw = pbt(search_space={"lr": {"kind": "log_uniform", "low": 1e-2, "high": 1e-4}})
    assert_config_error(raw, "pbt.search_space.lr")


def test_inverted_integer_bounds():
    raw = pbt(search_space={"unroll_length": {"kind": "int", "low": 20, "high": 5}})
    assert_config_error(raw, "pbt.search_space.unroll_length")


@pytest.mark.parametrize("init", [1e-5, 0.5])
def test_init_outside_bounds(init):
    raw = pbt(search_space={"lr": {**LR, "init": init}})
    assert_config_error(raw, "pbt.search_space.lr.init")


def test_init_not_among_categorical_choices():
    raw = pbt(search_space={"entropy_cost": {"kind": "categorical", "choices": [0.001, 0.01], "init": 0.1}})
    assert_config_error(raw, "pbt.search_space.entropy_cost.init")


def test_fractional_init_of_an_integer_hyperparameter():
    raw = pbt(search_space={"unroll_length": {"kind": "int", "low": 1, "high": 20, "init": 4.5}})
    assert_config_error(raw, "pbt.search_space.unroll_length.init")


@pytest.mark.parametrize("factors", [[0.8, 0.0], [-1.2], [0.0]])
def test_non_positive_global_perturbation_factor(factors):
    assert_config_error(pbt(perturb_factors=factors), "pbt.perturb_factors")


@pytest.mark.parametrize("factors", [[0.0], [1.2, -0.8]])
def test_non_positive_per_parameter_perturbation_factor(factors):
    raw = pbt(search_space={"lr": {**LR, "factors": factors}})
    assert_config_error(raw, "pbt.search_space.lr.factors")


@pytest.mark.parametrize("name", ["learning_rate", "algo", "hidden_sizes"])
def test_unknown_or_non_numeric_hyperparameter_name(name):
    raw = pbt(search_space={name: dict(LR)})
    assert_config_error(raw, f"pbt.search_space.{name}")


def test_yaml_string_numbers_in_the_search_space_are_read_as_numbers():
    # YAML 1.1 reads 3e-4 as a string; the search space must still treat it as a number.
    raw = pbt(search_space={"lr": {"kind": "log_uniform", "low": "1e-4", "high": "1e-2", "init": "3e-4"}})
    scheduler = Scheduler(from_dict(raw).pbt, seed=0)
    assert scheduler.initial_hyperparameters({"lr": 7e-4}, 2) == [{"lr": 3e-4}, {"lr": 3e-4}]


def test_hand_tuning_needs_exploit_none_and_no_search_space():
    assert_config_error(pbt(search="none"), "pbt.search")
    config = from_dict({"pbt": {"population_size": 4, "search": "none", "exploit": "none"}})
    assert Scheduler(config.pbt, seed=0).initial_hyperparameters({"lr": 1e-3}, 2) == [{"lr": 1e-3}] * 2
    assert_config_error(pbt(search="grid"), "pbt.search")


def test_pb2_and_none_are_accepted_names():
    assert from_dict(pbt(explore="pb2")).pbt.explore == "pb2"
    assert from_dict(pbt(exploit="none")).pbt.exploit == "none"
