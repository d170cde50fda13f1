"""Scheduler: reseeding a failed member, reproducibility from a seed and the state dict, and the baselines (random search, no exploit, hand-tuned)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.config import from_dict
from pbt_rl.scheduler import Continue, Exploit, Scheduler
from scheduler_support import SEARCH_SPACE, STEPS, config, decide_all, exploiters, hyperparameters, member, population
from space_checks import inside_search_space

# ---------------------------------------------------------------------------- reseeding


def reseed_population():
    """Member 0 failed (diverged); the others, with current fitness in parentheses:
    1 (3), 2 (9), 3 diverged since a 50 at its ready point, 4 not scored now (1 return < 2) after a
    50, 5 (100) without a checkpoint, 6 (100) with a checkpoint of unknown env steps, 7 (5)."""
    nan = math.nan
    return {
        0: member(0, nan, returns=(1.0, nan)),
        1: member(1, 3.0),
        2: member(2, 9.0),
        3: member(3, 50.0, returns=(50.0, 50.0, nan)),
        4: member(4, 50.0, returns=(50.0,)),
        5: member(5, 100.0, checkpoint=None),
        6: member(6, 100.0, checkpoint_steps=None),
        7: member(7, 5.0, env_steps=70_000, checkpoint="members/1/checkpoints/000000040000.pt", checkpoint_steps=40_000),
    }


def test_reseed_copies_the_best_eligible_member():
    pop = reseed_population()
    scheduler = Scheduler(config(population_size=8, min_episodes=2), seed=0)
    decision = scheduler.reseed(0, pop)
    assert isinstance(decision, Exploit)
    assert (decision.member_id, decision.env_steps, decision.donor_id) == (0, STEPS, 2)
    assert (decision.donor_checkpoint, decision.donor_env_steps) == (pop[2].checkpoint_id, STEPS)
    assert decision.donor_score == 9.0 and math.isnan(decision.member_score)
    assert decision.old_hyperparameters == hyperparameters(0)
    assert decision.new_hyperparameters["algo"] == "a2c"
    assert set(decision.operations) == {"lr", "unroll_length", "gamma"}
    json.dumps(decision.to_dict(), allow_nan=False)
    # Excluding 2 (abandoned, say) leaves 7, the best of 1 and 7; its checkpoint is member 1's 40k one.
    decision = scheduler.reseed(0, pop, excluded={2})
    assert decision.donor_id == 7
    assert (decision.donor_checkpoint, decision.donor_env_steps) == ("members/1/checkpoints/000000040000.pt", 40_000)
    assert scheduler.reseed(0, pop, excluded=[2, 7]).donor_id == 1


def test_reseed_needs_no_margin_and_reports_the_members_current_fitness():
    # A member that keeps crashing may be the best scored: it still restarts from the best other.
    pop = {0: member(0, 10.0, returns=(10.0, 11.0, 12.0)), 1: member(1, 3.0)}
    decision = Scheduler(config(population_size=2, margin_absolute=100.0), seed=0).reseed(0, pop)
    assert decision.donor_id == 1 and (decision.member_score, decision.donor_score) == (11.0, 3.0)


def test_reseed_returns_none_without_an_eligible_member_and_draws_nothing():
    pop = reseed_population()
    scheduler = Scheduler(config(population_size=8, min_episodes=2), seed=0)
    before = scheduler.state_dict()
    assert scheduler.reseed(0, pop, excluded={1, 2, 7}) is None  # left: diverged, unscored, no checkpoint (env steps)
    assert scheduler.reseed(0, {0: pop[0]}) is None  # population of one
    assert scheduler.reseed(2, {2: pop[2], 3: pop[3], 4: pop[4], 5: pop[5], 6: pop[6]}) is None
    assert scheduler.state_dict() == before


def test_reseed_ties_are_broken_by_the_generator():
    pop = {0: member(0, math.nan, returns=(math.nan,)), 1: member(1, 4.0), 2: member(2, 4.0), 3: member(3, 1.0)}
    donors = [Scheduler(config(), seed=seed).reseed(0, pop).donor_id for seed in range(80)]
    assert set(donors) == {1, 2}
    assert 20 <= donors.count(1) <= 60


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), explore=st.sampled_from(["perturb", "resample", "perturb_or_resample"]),
       lr=st.sampled_from([1e-4, 1e-3, 1e-2]), unroll=st.sampled_from([1, 2, 19, 20]), gamma=st.sampled_from([0.9, 0.99, 0.999]))
def test_reseed_explores_the_donors_values_inside_the_bounds(seed, explore, lr, unroll, gamma):
    pop = {0: member(0, math.nan, returns=(math.nan,)), 1: member(1, 2.0)}
    donor_values = {"lr": lr, "unroll_length": unroll, "gamma": gamma, "algo": "impala"}
    pop[1] = dataclasses.replace(pop[1], hyperparameters=donor_values)
    scheduler = Scheduler(config(population_size=2, explore=explore), seed=seed)
    decision = scheduler.reseed(0, pop)
    assert inside_search_space(scheduler.config.search_space, decision.new_hyperparameters)
    assert decision.new_hyperparameters["algo"] == "impala"  # keys outside the space come from the donor
    assert set(decision.operations) == {"lr", "unroll_length", "gamma"}
    if explore == "resample":
        assert set(decision.operations.values()) == {"resample"}
    if explore == "perturb":
        assert "resample" not in decision.operations.values()
        assert decision.new_hyperparameters["lr"] in (pytest.approx(min(lr * 1.2, 1e-2)), pytest.approx(max(lr * 0.8, 1e-4)))


def test_reseed_is_deterministic_for_a_seed():
    pop = reseed_population()
    cfg = config(population_size=8, min_episodes=2, explore="perturb_or_resample")

    def sequence(seed):
        scheduler = Scheduler(cfg, seed=seed)
        return [scheduler.reseed(0, pop).to_dict() for _ in range(6)]

    assert sequence(5) == sequence(5)
    assert sequence(5) != sequence(6)


def test_reseed_advances_the_generator_which_state_dict_restores():
    pop = reseed_population()
    scheduler = Scheduler(config(population_size=8, min_episodes=2, explore="perturb_or_resample"), seed=3)
    saved = json.loads(json.dumps(scheduler.state_dict()))
    first = [scheduler.reseed(0, pop).to_dict() for _ in range(5)]
    assert scheduler.state_dict() != saved
    assert len({json.dumps(d["new_hyperparameters"], sort_keys=True) for d in first}) > 1  # each call draws anew
    after = scheduler.state_dict()
    later = [scheduler.decide(i, pop).to_dict() for i in pop]
    resumed = Scheduler(config(population_size=8, min_episodes=2, explore="perturb_or_resample"), seed=99)
    resumed.load_state_dict(saved)
    assert [resumed.reseed(0, pop).to_dict() for _ in range(5)] == first
    assert resumed.state_dict() == after
    assert [resumed.decide(i, pop).to_dict() for i in pop] == later


# ---------------------------------------------------------------------------- reproducibility


def decision_sequence(scheduler, rounds):
    generator = np.random.default_rng(99)
    out = []
    for _ in range(rounds):
        pop = population([float(s) for s in generator.permutation(6)])
        out.append([scheduler.decide(i, pop) for i in pop])
        out.append(scheduler.decide_generation(pop))
    return out


def test_same_seed_same_decisions():
    cfg = config(population_size=6, exploit="tournament")
    assert decision_sequence(Scheduler(cfg, seed=7), 5) == decision_sequence(Scheduler(cfg, seed=7), 5)
    assert decision_sequence(Scheduler(cfg, seed=7), 5) != decision_sequence(Scheduler(cfg, seed=8), 5)


def test_initial_hyperparameters_are_reproducible_and_overlay_the_base():
    raw = {**SEARCH_SPACE, "entropy_cost": {"kind": "uniform", "low": 0.0, "high": 0.1, "init": 0.02}}
    cfg = from_dict({"pbt": {"population_size": 5, "search_space": raw}}).pbt
    base = {"lr": 7e-4, "unroll_length": 5, "gamma": 0.99, "entropy_cost": 0.01, "value_cost": 0.5, "algo": "a2c"}
    members = Scheduler(cfg, seed=3).initial_hyperparameters(base, 5)
    assert members == Scheduler(cfg, seed=3).initial_hyperparameters(base, 5)
    assert len(members) == 5 and len({m["lr"] for m in members}) == 5
    for values in members:
        assert values["entropy_cost"] == 0.02 and values["value_cost"] == 0.5 and values["algo"] == "a2c"
        assert inside_search_space(cfg.search_space, values)
    assert base["lr"] == 7e-4  # not mutated


def test_state_dict_round_trip_continues_the_same_sequence():
    cfg = config(population_size=6, exploit="truncation", truncation_fraction=0.5)
    original = Scheduler(cfg, seed=11)
    decision_sequence(original, 3)
    saved = json.loads(json.dumps(original.state_dict()))
    expected = decision_sequence(original, 4)
    resumed = Scheduler(cfg, seed=12345)
    resumed.load_state_dict(saved)
    assert decision_sequence(resumed, 4) == expected
    with pytest.raises(ValueError, match="format"):
        resumed.load_state_dict({"format": 99, "rng": saved["rng"]})


# ---------------------------------------------------------------------------- baselines


BASE = {"lr": 3e-4, "unroll_length": 5, "gamma": 0.99, "algo": "a2c"}


@pytest.mark.parametrize("seed", [0, 7])
def test_random_search_starts_from_the_same_draws_as_pbt_with_the_same_seed(seed):
    pbt_values = Scheduler(config(), seed=seed).initial_hyperparameters(BASE, 6)
    random_values = Scheduler(config(exploit="none"), seed=seed).initial_hyperparameters(BASE, 6)
    assert random_values == pbt_values
    assert len({v["lr"] for v in random_values}) == 6  # drawn from the prior, not the base value


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_exploit_none_never_copies_nor_reseeds(mode):
    scheduler = Scheduler(config(exploit="none", mode=mode), seed=0)
    pop = population([-100.0, 0.0, 50.0, 100.0])
    decisions = scheduler.decide_generation(pop) if mode == "sync" else decide_all(scheduler, pop)
    assert all(isinstance(d, Continue) and "pbt.exploit: none" in d.reason for d in decisions.values())
    assert scheduler.reseed(0, pop) is None
    # The same population under truncation does copy: the baseline is what turns it off.
    assert exploiters(decide_all(Scheduler(config(), seed=0), pop))


def test_hand_tuned_members_all_start_from_the_agent_config_values():
    scheduler = Scheduler(config(exploit="none", search="none"), seed=3)
    state_before = scheduler.state_dict()
    assert scheduler.initial_hyperparameters(BASE, 4) == [BASE] * 4
    assert scheduler.state_dict() == state_before  # nothing drawn
