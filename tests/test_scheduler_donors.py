"""Scheduler: who may be a donor (diverged, unscored, checkpoint env steps), and the invariants of every decision (property tests)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.scheduler import Continue, Exploit, MemberState, Scheduler
from scheduler_support import config, decide_all, exploiters, hyperparameters, member
from space_checks import inside_search_space

# ---------------------------------------------------------------------------- who may be a donor

STRATEGIES = ["truncation", "tournament", "ttest"]


def spread(score, n=3):
    """``n`` returns around ``score`` (some variance for the t-test)."""
    return tuple(score + 0.1 * ((k % 3) - 1) for k in range(n))


def diverged_donor_population():
    """The reported bug: member 1 scored 9 at 50k, then its returns went NaN; its checkpoint is at 100k."""
    nan = math.nan
    return {
        0: member(0, 1.0, returns=spread(1.0)),
        1: MemberState(1, 100_000, 100_000, (9.0, 9.0, nan), ((50_000, 9.0), (100_000, nan)),
                       hyperparameters(1), "m1@100k", checkpoint_env_steps=100_000),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_member_diverged_since_its_recorded_score_is_not_a_donor_async(strategy):
    pop = diverged_donor_population()
    for seed in range(10):
        scheduler = Scheduler(config(population_size=2, exploit=strategy), seed=seed)
        decision = scheduler.decide(0, pop)  # ranked on member 1's 9.0 at 50k, but 1 is NaN now
        assert isinstance(decision, Continue)
        # The diverged member itself still copies member 0.
        copied = scheduler.decide(1, pop)
        assert isinstance(copied, Exploit) and copied.donor_id == 0 and math.isnan(copied.member_score)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_member_diverged_since_its_recorded_score_is_not_a_donor_sync(strategy):
    pop = diverged_donor_population()
    for seed in range(10):
        decisions = Scheduler(config(population_size=2, exploit=strategy, mode="sync"), seed=seed).decide_generation(pop)
        assert exploiters(decisions) == {1: 0}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sync", [False, True])
def test_a_member_not_scored_now_is_not_a_donor_whatever_its_history(strategy, sync):
    # Member 1 was the best at its 50k ready point and has since exploited (returns emptied): two
    # new returns, fewer than min_episodes=3. Its 50k score still ranks it above member 0.
    pop = {
        0: member(0, 1.0, returns=spread(1.0)),
        1: member(1, 9.0, env_steps=60_000, returns=(9.0, 9.5), history=((50_000, 9.0),)),
    }
    for seed in range(10):
        scheduler = Scheduler(config(population_size=2, exploit=strategy, min_episodes=3), seed=seed)
        decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
        assert exploiters(decisions) == {}
    if not sync:
        scheduler = Scheduler(config(population_size=2, exploit="tournament", min_episodes=3), seed=0)
        assert "opponent 1 is not scored now" in scheduler.decide(0, pop).reason


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sync", [False, True])
def test_a_checkpoint_without_env_steps_is_not_a_donor(strategy, sync):
    pop = {0: member(0, 1.0, returns=spread(1.0)), 1: member(1, 9.0, returns=spread(9.0), checkpoint_steps=None)}
    for seed in range(10):
        scheduler = Scheduler(config(population_size=2, exploit=strategy), seed=seed)
        decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
        assert exploiters(decisions) == {}
    pop[1] = member(1, 9.0, returns=spread(9.0))  # the same member with its env steps known
    scheduler = Scheduler(config(population_size=2, exploit=strategy), seed=0)
    decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
    assert exploiters(decisions) == {0: 1}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sync", [False, True])
def test_donor_env_steps_are_those_of_the_copied_checkpoint(strategy, sync):
    # Member 1 (at 120k) exploited member 2's 80k checkpoint and has not saved its own since: a
    # copier of member 1 loads weights saved at 80k, by member 2.
    pop = {
        0: member(0, 1.0, env_steps=120_000, returns=spread(1.0)),
        1: member(1, 9.0, env_steps=120_000, returns=spread(9.0),
                  checkpoint="members/2/checkpoints/000000080000.pt", checkpoint_steps=80_000),
        2: member(2, 0.0, env_steps=120_000, returns=spread(0.0), checkpoint=None),
    }
    scheduler = Scheduler(config(population_size=3, exploit=strategy, margin_absolute=2.0), seed=0)
    decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
    copies_of_1 = [d for d in decisions.values() if isinstance(d, Exploit) and d.donor_id == 1]
    assert copies_of_1
    for decision in copies_of_1:
        assert decision.donor_checkpoint == "members/2/checkpoints/000000080000.pt"
        assert decision.donor_env_steps == 80_000
        assert decision.to_dict()["donor_env_steps"] == 80_000


def test_ttest_needs_min_episodes_returns_on_both_sides():
    def pop(donor_returns):
        return {0: member(0, 0.0, returns=spread(0.0, 4)), 1: member(1, 9.0, returns=spread(9.0, donor_returns))}

    scheduler = Scheduler(config(population_size=2, exploit="ttest", min_episodes=4), seed=0)
    assert isinstance(scheduler.decide(0, pop(4)), Exploit)
    assert isinstance(scheduler.decide(0, pop(3)), Continue)
    # With min_episodes 1 the t-test still needs two returns on each side.
    scheduler = Scheduler(config(population_size=2, exploit="ttest", min_episodes=1), seed=0)
    assert isinstance(scheduler.decide(0, pop(2)), Exploit)
    one = scheduler.decide(0, pop(1))
    assert isinstance(one, Continue) and "fewer than 2 returns" in one.reason


# ---------------------------------------------------------------------------- invariants


@st.composite
def random_population(draw):
    size = draw(st.integers(1, 8))
    pop = {}
    for i in range(size):
        env_steps = draw(st.integers(0, 4)) * 10_000
        returns = tuple(draw(st.lists(st.one_of(st.floats(-10, 10), st.just(math.nan)), min_size=0, max_size=6)))
        history = tuple(sorted(draw(st.lists(st.tuples(st.integers(0, 4).map(lambda k: k * 10_000),
                                                       st.one_of(st.floats(-10, 10), st.just(math.nan))), max_size=3))))
        checkpoint = draw(st.sampled_from([None, f"members/{i}/checkpoints/x.pt"]))
        checkpoint_steps = None if checkpoint is None else draw(st.integers(0, env_steps))
        pop[i] = MemberState(i, env_steps, 0, returns, history, hyperparameters(i), checkpoint, checkpoint_steps)
    return pop


@settings(max_examples=80, deadline=None)
@given(pop=random_population(), strategy=st.sampled_from(["truncation", "tournament", "ttest"]),
       seed=st.integers(0, 1000), margin=st.sampled_from([0.0, 1.0]))
def test_decision_invariants(pop, strategy, seed, margin):
    scheduler = Scheduler(config(population_size=len(pop), exploit=strategy, margin_absolute=margin,
                                 truncation_fraction=0.5), seed=seed)
    generation = scheduler.decide_generation(pop)
    assert sorted(generation) == sorted(pop)
    copied = exploiters(generation)
    assert not set(copied) & set(copied.values())  # sync: donors never exploit
    for decisions in (generation, decide_all(scheduler, pop)):
        for member_id, decision in decisions.items():
            assert decision.member_id == member_id and decision.env_steps == pop[member_id].env_steps
            json.dumps(decision.to_dict(), allow_nan=False)
            if isinstance(decision, Exploit):
                donor = pop[decision.donor_id]
                assert decision.donor_id != member_id
                assert math.isfinite(decision.donor_score)
                assert decision.donor_checkpoint == donor.checkpoint_id is not None
                assert len(pop[member_id].episode_returns) >= 1
                assert inside_search_space(scheduler.config.search_space, decision.new_hyperparameters)
                assert decision.old_hyperparameters == pop[member_id].hyperparameters


@st.composite
def messy_population(draw, min_size=1):
    """Members whose score histories need not match their current returns (stale, NaN or absent),
    some of whose returns are NaN or fewer than min_episodes, some without a checkpoint or without
    its env steps, and some whose checkpoint is another member's."""
    size = draw(st.integers(min_size, 7))
    pop = {}
    for i in range(size):
        env_steps = draw(st.integers(0, 4)) * 10_000
        finite = st.floats(-10, 10)
        returns = tuple(draw(st.lists(st.one_of(finite, finite, st.just(math.nan)), max_size=5)))
        history = tuple(sorted(draw(st.lists(st.tuples(st.integers(0, 4).map(lambda k: k * 10_000),
                                                       st.one_of(finite, st.just(math.nan))), max_size=3))))
        owner = draw(st.integers(0, size - 1))
        checkpoint = draw(st.sampled_from([None, f"members/{owner}/checkpoints/x.pt"]))
        checkpoint_steps = None if checkpoint is None else draw(st.one_of(st.none(), st.integers(0, 40_000)))
        pop[i] = MemberState(i, env_steps, 0, returns, history, hyperparameters(i), checkpoint, checkpoint_steps)
    return pop


def assert_valid_donor(scheduler, pop, decision):
    donor = pop[decision.donor_id]
    assert len(donor.episode_returns) >= scheduler.config.min_episodes
    assert math.isfinite(scheduler.fitness(donor))
    assert decision.donor_checkpoint == donor.checkpoint_id is not None
    assert decision.donor_env_steps == donor.checkpoint_env_steps is not None


@settings(max_examples=150, deadline=None)
@given(pop=messy_population(), strategy=st.sampled_from(STRATEGIES), seed=st.integers(0, 1000),
       min_episodes=st.integers(1, 3), window=st.sampled_from([2, 10]))
def test_no_decision_names_a_donor_that_is_not_eligible_now(pop, strategy, seed, min_episodes, window):
    scheduler = Scheduler(config(population_size=len(pop), exploit=strategy, min_episodes=min_episodes,
                                 fitness_window=window, truncation_fraction=0.5), seed=seed)
    for decisions in (scheduler.decide_generation(pop), decide_all(scheduler, pop)):
        for decision in decisions.values():
            if isinstance(decision, Exploit):
                assert_valid_donor(scheduler, pop, decision)
    for member_id in pop:
        decision = scheduler.reseed(member_id, pop)
        if decision is not None:
            assert_valid_donor(scheduler, pop, decision)


@settings(max_examples=150, deadline=None)
@given(pop=messy_population(), seed=st.integers(0, 1000), min_episodes=st.integers(1, 3), data=st.data())
def test_reseed_takes_a_best_eligible_member_and_none_only_when_there_is_none(pop, seed, min_episodes, data):
    scheduler = Scheduler(config(population_size=len(pop), min_episodes=min_episodes), seed=seed)
    member_id = data.draw(st.sampled_from(sorted(pop)))
    excluded = data.draw(st.sets(st.sampled_from(sorted(pop))))
    eligible = {
        i: scheduler.fitness(m) for i, m in pop.items()
        if i != member_id and i not in excluded and len(m.episode_returns) >= min_episodes
        and math.isfinite(scheduler.fitness(m)) and m.checkpoint_id is not None and m.checkpoint_env_steps is not None
    }
    decision = scheduler.reseed(member_id, pop, excluded=excluded)
    if not eligible:
        assert decision is None
        return
    assert isinstance(decision, Exploit)
    assert decision.donor_id in eligible and decision.donor_score == eligible[decision.donor_id] == max(eligible.values())
    assert_valid_donor(scheduler, pop, decision)
    assert (decision.member_id, decision.env_steps) == (member_id, pop[member_id].env_steps)
    own = scheduler.fitness(pop[member_id])
    assert decision.member_score == own or (math.isnan(decision.member_score) and math.isnan(own))
    assert decision.old_hyperparameters == pop[member_id].hyperparameters
    assert inside_search_space(scheduler.config.search_space, decision.new_hyperparameters)
    json.dumps(decision.to_dict(), allow_nan=False)
