"""Scheduler: readiness, fitness, exploit strategies, sync/async, fairness, margins, edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.scheduler import Continue, Exploit, MemberState, Scheduler, truncation_count, welch_p_value_greater
from scheduler_support import STEPS, config, decide_all, exploiters, hyperparameters, member, population

# ---------------------------------------------------------------------------- fitness, readiness


def test_fitness_is_the_mean_of_the_last_window_and_nan_before_min_episodes():
    scheduler = Scheduler(config(min_episodes=3, fitness_window=2), seed=0)
    assert math.isnan(scheduler.fitness(member(0, 0.0, returns=(1.0, 2.0))))
    assert scheduler.fitness(member(0, 0.0, returns=(1.0, 2.0, 4.0))) == 3.0
    assert scheduler.fitness(member(0, 0.0, returns=(100.0, 1.0, 2.0, 4.0, 8.0))) == 6.0


def test_is_ready_needs_burn_in_interval_and_episodes():
    scheduler = Scheduler(config(burn_in_steps=20_000, ready_after_steps=10_000, min_episodes=2), seed=0)

    def state(env_steps, last_ready, episodes):
        return MemberState(0, env_steps, last_ready, (1.0,) * episodes, (), hyperparameters(0), None)

    assert scheduler.is_ready(state(20_000, 0, 2))
    assert scheduler.is_ready(state(30_000, 20_000, 2))
    assert not scheduler.is_ready(state(19_999, 0, 2))  # burn-in
    assert not scheduler.is_ready(state(29_999, 20_000, 2))  # interval
    assert not scheduler.is_ready(state(30_000, 20_000, 1))  # episodes


# ---------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("n,fraction,expected", [
    (1, 0.2, 0), (2, 0.2, 1), (3, 0.2, 1), (4, 0.2, 1), (5, 0.2, 1), (9, 0.2, 1), (10, 0.2, 2),
    (11, 0.2, 2), (100, 0.29, 29), (3, 0.5, 1), (4, 0.5, 2), (10, 0.5, 5), (2, 0.01, 1),
])
def test_truncation_count(n, fraction, expected):
    assert truncation_count(n, fraction) == expected
    assert truncation_count(n, fraction) <= n // 2


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), permutation=st.permutations(range(10)), sync=st.booleans())
def test_truncation_twenty_percent_of_ten(seed, permutation, sync):
    scores = [float(p) for p in permutation]  # member i has score permutation[i]
    pop = population(scores)
    scheduler = Scheduler(config(population_size=10, truncation_fraction=0.2), seed=seed)
    decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
    bottom = {i for i, s in enumerate(scores) if s < 2}
    top = {i for i, s in enumerate(scores) if s >= 8}
    copied = exploiters(decisions)
    assert set(copied) == bottom
    assert set(copied.values()) <= top


def test_truncation_donors_are_chosen_uniformly_from_the_top():
    pop = population([float(s) for s in range(10)])
    scheduler = Scheduler(config(population_size=10, truncation_fraction=0.2), seed=1)
    donors = [scheduler.decide(0, pop).donor_id for _ in range(400)]
    assert set(donors) == {8, 9}
    assert donors.count(9) / len(donors) == pytest.approx(0.5, abs=0.08)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("sync", [False, True])
def test_small_populations_get_one_exploiter_copying_the_best(n, sync):
    pop = population([float(s) for s in range(n)])
    scheduler = Scheduler(config(population_size=n), seed=0)
    decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
    assert exploiters(decisions) == {0: n - 1}


def test_exploit_carries_the_donor_checkpoint_and_explored_hyperparameters():
    pop = population([1.0, 5.0])
    # The donor has trained on (70k env steps) since its latest checkpoint (61,234).
    pop[1] = MemberState(1, 70_000, 50_000, (5.0,), ((50_000, 5.0),), hyperparameters(1),
                         "members/1/checkpoints/000000061234.pt", 61_234)
    decision = Scheduler(config(explore="perturb"), seed=0).decide(0, pop)
    assert isinstance(decision, Exploit)
    assert (decision.member_id, decision.env_steps, decision.donor_id) == (0, STEPS, 1)
    assert decision.donor_checkpoint == "members/1/checkpoints/000000061234.pt"
    assert decision.donor_env_steps == 61_234
    assert (decision.member_score, decision.donor_score) == (1.0, 5.0)
    assert decision.old_hyperparameters == hyperparameters(0)
    donor_values = hyperparameters(1)
    assert set(decision.operations) == {"lr", "unroll_length", "gamma"}
    assert decision.new_hyperparameters["algo"] == "a2c"
    assert decision.new_hyperparameters["lr"] in (pytest.approx(0.8e-3), pytest.approx(1.2e-3))
    assert decision.new_hyperparameters["unroll_length"] in (5, 7)  # 6 * 0.8 -> 5, 6 * 1.2 -> 7
    assert decision.new_hyperparameters["unroll_length"] != donor_values["unroll_length"]
    json.dumps(decision.to_dict(), allow_nan=False)
    assert decision.to_dict()["decision"] == "exploit"


def test_exploit_explores_with_the_configured_factors_and_resample_probability():
    pop = population([1.0, 5.0])
    donor_lr = hyperparameters(1)["lr"]
    perturbed = Scheduler(config(explore="perturb", perturb_factors=[0.5]), seed=0).decide(0, pop)
    assert perturbed.new_hyperparameters["lr"] == pytest.approx(0.5 * donor_lr)
    assert perturbed.operations["lr"] == "*0.5"
    for probability, expected in ((0.0, set()), (1.0, {"lr", "unroll_length", "gamma"})):
        cfg = config(explore="perturb_or_resample", resample_probability=probability)
        for seed in range(5):
            decision = Scheduler(cfg, seed=seed).decide(0, pop)
            assert {name for name, op in decision.operations.items() if op == "resample"} == expected


# ---------------------------------------------------------------------------- tournament and t-test


@pytest.mark.parametrize("sync", [False, True])
def test_tournament_copies_the_better_of_two(sync):
    pop = population([2.0, 7.0])
    for seed in range(10):
        scheduler = Scheduler(config(exploit="tournament", population_size=2), seed=seed)
        decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
        assert exploiters(decisions) == {0: 1}
        assert isinstance(decisions[1], Continue)


def test_tournament_opponent_is_uniform_among_the_others():
    pop = population([0.0, 1.0, 2.0, 3.0])
    scheduler = Scheduler(config(exploit="tournament"), seed=2)
    decisions = [scheduler.decide(0, pop) for _ in range(600)]
    donors = [d.donor_id for d in decisions]
    assert all(isinstance(d, Exploit) for d in decisions)
    for donor in (1, 2, 3):
        assert donors.count(donor) / len(donors) == pytest.approx(1 / 3, abs=0.07)
    # The best member's opponents are all worse: it never copies.
    assert all(isinstance(scheduler.decide(3, pop), Continue) for _ in range(50))


def ttest_population(member_returns, donor_returns):
    return {
        0: member(0, float(np.mean(member_returns)), returns=member_returns),
        1: member(1, float(np.mean(donor_returns)), returns=donor_returns),
    }


def test_ttest_identical_distributions_continue():
    returns = tuple(np.random.default_rng(0).normal(10.0, 3.0, size=10))
    pop = ttest_population(returns, returns)
    for seed in range(5):
        decisions = decide_all(Scheduler(config(exploit="ttest", population_size=2), seed=seed), pop)
        assert exploiters(decisions) == {}
        assert "not significantly better" in decisions[0].reason


def test_ttest_clearly_separated_exploits():
    generator = np.random.default_rng(1)
    pop = ttest_population(tuple(generator.normal(0.0, 1.0, 10)), tuple(generator.normal(10.0, 1.0, 10)))
    decisions = decide_all(Scheduler(config(exploit="ttest", population_size=2), seed=0), pop)
    assert exploiters(decisions) == {0: 1}
    assert decisions[0].donor_score == pytest.approx(np.mean(pop[1].episode_returns))


def test_ttest_higher_mean_but_noisy_continues():
    # The donor's mean is higher, but its returns are far too spread for p < 0.05.
    pop = ttest_population((9.0, 10.0, 11.0, 10.0), (-20.0, 40.0, -15.0, 45.0))
    decisions = decide_all(Scheduler(config(exploit="ttest", population_size=2), seed=0), pop)
    assert exploiters(decisions) == {}


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_ttest_decision_follows_the_one_sided_welch_p_value(alpha):
    member_returns = (1.0, 2.0, 3.0, 4.0, 5.0)
    donor_returns = (2.5, 3.5, 4.5, 5.5, 6.5, 3.0)
    # Welch's t and Welch-Satterthwaite degrees of freedom, written out.
    a, b = np.array(donor_returns), np.array(member_returns)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p_value = scipy.stats.t.sf(t, dof)
    assert welch_p_value_greater(a, b) == pytest.approx(p_value)
    decision = Scheduler(config(exploit="ttest", population_size=2, ttest_alpha=alpha), seed=0).decide(
        0, ttest_population(member_returns, donor_returns))
    assert isinstance(decision, Exploit) == (p_value < alpha)


def test_ttest_constant_returns_and_too_few_returns():
    scheduler = Scheduler(config(exploit="ttest", population_size=2), seed=0)
    assert isinstance(scheduler.decide(0, ttest_population((1.0, 1.0), (2.0, 2.0))), Exploit)
    assert isinstance(scheduler.decide(0, ttest_population((2.0, 2.0), (2.0, 2.0))), Continue)
    one_return = scheduler.decide(0, ttest_population((1.0,), (5.0, 6.0)))
    assert isinstance(one_return, Continue) and "2 returns" in one_return.reason


# ---------------------------------------------------------------------------- sync vs async


def test_sync_uses_one_snapshot_of_current_fitness():
    # Members far apart in env steps (more than the comparison slack): async fairness only sees
    # scores recorded at <= own env steps + slack, so member 0 (the furthest behind) sees nobody;
    # the sync generation compares everyone's current fitness.
    apart = STEPS // 5
    pop = {i: member(i, float(i), env_steps=STEPS + apart * i) for i in range(4)}
    assert isinstance(Scheduler(config(), seed=0).decide(0, pop), Continue)
    decisions = Scheduler(config(mode="sync"), seed=0).decide_generation(pop)
    assert exploiters(decisions) == {0: 3}
    assert sorted(decisions) == [0, 1, 2, 3]


def test_async_peers_within_the_overshoot_slack_are_compared():
    # Learners stop at the end of an unroll, a few env steps past the ready point: a member that
    # reached the same ready point 8 steps later still counts as a peer.
    scheduler = Scheduler(config(ready_after_steps=STEPS), seed=0)
    assert scheduler.comparison_slack == STEPS // 10
    pop = {i: member(i, float(i), env_steps=STEPS + 8 * i) for i in range(4)}
    assert isinstance(scheduler.decide(0, pop), Exploit)
    beyond = {0: member(0, 0.0), 1: member(1, 5.0, env_steps=STEPS + STEPS // 10 + 1)}
    assert isinstance(Scheduler(config(ready_after_steps=STEPS, population_size=2), seed=0).decide(0, beyond), Continue)


@pytest.mark.parametrize("strategy", ["tournament", "ttest"])
def test_sync_donors_do_not_exploit_in_the_same_generation(strategy):
    # A chain 0 < 1 < 2 < 3: asynchronously each member may copy a better one; in a generation a
    # member copied by someone keeps its weights.
    generator = np.random.default_rng(3)
    pop = {i: member(i, 0.0, returns=tuple(generator.normal(100.0 * i, 1.0, 10))) for i in range(4)}
    saw_donor_continue = False
    for seed in range(40):
        decisions = Scheduler(config(exploit=strategy), seed=seed).decide_generation(pop)
        copied = exploiters(decisions)
        assert not set(copied) & set(copied.values())
        for donor in set(copied.values()):
            assert isinstance(decisions[donor], Continue)
            if donor != 3:
                saw_donor_continue = True
                copiers = [m for m, d in copied.items() if d == donor]
                assert decisions[donor].reason in {f"donor of member {c} this generation" for c in copiers}
    assert saw_donor_continue


# ---------------------------------------------------------------------------- fairness


def test_async_compares_with_scores_recorded_at_or_before_own_env_steps():
    me = member(0, 0.0, env_steps=100_000)
    # Member 1 was better at 80k but is worse now (at 150k).
    other = member(1, -5.0, env_steps=150_000, history=((80_000, 10.0), (150_000, -5.0)))
    scheduler = Scheduler(config(exploit="tournament", population_size=2), seed=0)
    decision = scheduler.decide(0, {0: me, 1: other})
    assert isinstance(decision, Exploit)
    assert decision.donor_score == 10.0
    assert decision.donor_env_steps == 150_000 and decision.donor_checkpoint == other.checkpoint_id
    # Once member 0 is past 150k, member 1's latest score counts.
    me_later = member(0, 0.0, env_steps=150_000)
    assert isinstance(scheduler.decide(0, {0: me_later, 1: other}), Continue)


@pytest.mark.parametrize("strategy", ["truncation", "tournament", "ttest"])
def test_members_scored_only_after_own_env_steps_are_not_compared(strategy):
    me = member(0, 0.0, env_steps=100_000)
    ahead = member(1, 50.0, env_steps=200_000, history=((150_000, 50.0),))
    decision = Scheduler(config(exploit=strategy, population_size=2), seed=0).decide(0, {0: me, 1: ahead})
    assert isinstance(decision, Continue)
    assert "<= 100000 env steps" in decision.reason


def test_truncation_ranks_only_the_fairly_comparable_members():
    # Of 10 members only 3 have scores at <= 50k; member 0 is the worst of those 3 and copies the best.
    pop = population([float(s) for s in range(10)])
    for i in range(3, 10):
        pop[i] = member(i, 100.0, env_steps=90_000, history=((90_000, 100.0),))
    decision = Scheduler(config(population_size=10), seed=0).decide(0, pop)
    assert isinstance(decision, Exploit) and decision.donor_id == 2


# ---------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("strategy", ["truncation", "tournament", "ttest"])
def test_population_of_one_continues(strategy):
    pop = population([1.0])
    scheduler = Scheduler(config(population_size=1, exploit=strategy), seed=0)
    assert isinstance(scheduler.decide(0, pop), Continue)
    assert isinstance(scheduler.decide_generation(pop)[0], Continue)


@pytest.mark.parametrize("strategy", ["truncation", "tournament"])
@pytest.mark.parametrize("sync", [False, True])
def test_equal_scores_never_copy(strategy, sync):
    pop = population([3.0] * 5)
    scheduler = Scheduler(config(population_size=5, exploit=strategy), seed=0)
    decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
    assert exploiters(decisions) == {}


def test_ties_at_the_truncation_boundary_are_broken_fairly():
    # Members 0 and 1 tie for last place; the bottom holds one of them.
    pop = population([0.0, 0.0, 5.0, 5.0])
    chosen = []
    for seed in range(60):
        copied = exploiters(Scheduler(config(mode="sync"), seed=seed).decide_generation(pop))
        assert len(copied) == 1 and set(copied) <= {0, 1} and set(copied.values()) <= {2, 3}
        chosen.extend(copied)
    assert 15 <= chosen.count(0) <= 45


@pytest.mark.parametrize("strategy", ["truncation", "tournament", "ttest"])
@pytest.mark.parametrize("sync", [False, True])
def test_nan_member_counts_as_worst_and_is_never_a_donor(strategy, sync):
    nan = math.nan
    pop = {
        0: member(0, 1.0, returns=(1.0, 1.2, 0.8)),
        1: member(1, nan, returns=(nan, nan, nan)),
    }
    for seed in range(10):
        scheduler = Scheduler(config(population_size=2, exploit=strategy), seed=seed)
        decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
        assert exploiters(decisions) == {1: 0}
        assert math.isnan(decisions[1].member_score)
        assert decisions[1].to_dict()["member_score"] is None
        json.dumps(decisions[1].to_dict(), allow_nan=False)


@pytest.mark.parametrize("sync", [False, True])
def test_members_without_enough_episodes_continue_and_are_not_donors(sync):
    scheduler = Scheduler(config(min_episodes=5), seed=0)
    pop = {
        0: member(0, 0.0, returns=(0.0,) * 5),
        1: member(1, 99.0, returns=(99.0,) * 2, history=()),  # never scored: 2 < 5 episodes
    }
    decisions = scheduler.decide_generation(pop) if sync else decide_all(scheduler, pop)
    assert exploiters(decisions) == {}
    assert "pbt.min_episodes=5" in decisions[1].reason


def test_donor_without_checkpoint_is_not_copied():
    pop = population([0.0, 1.0, 2.0], checkpoint=None)
    pop[1] = member(1, 1.0)  # only member 1 has a checkpoint
    # Truncation (k=1): the only top member, 2, cannot be loaded.
    decision = Scheduler(config(population_size=3, truncation_fraction=0.5), seed=0).decide(0, pop)
    assert isinstance(decision, Continue)
    # Tournament: drawing 2 continues, drawing 1 copies it.
    scheduler = Scheduler(config(population_size=3, exploit="tournament"), seed=0)
    decisions = [scheduler.decide(0, pop) for _ in range(40)]
    assert {d.donor_id for d in decisions if isinstance(d, Exploit)} == {1}
    assert any("has no checkpoint" in d.reason for d in decisions if isinstance(d, Continue))


@pytest.mark.parametrize("strategy", ["truncation", "tournament"])
def test_absolute_margin(strategy):
    scheduler = Scheduler(config(population_size=2, exploit=strategy, margin_absolute=2.0), seed=0)
    assert isinstance(scheduler.decide(0, population([9.0, 10.0])), Continue)
    assert isinstance(scheduler.decide(0, population([8.0, 10.0])), Continue)  # exactly the margin: not more
    assert isinstance(scheduler.decide(0, population([7.9, 10.0])), Exploit)


@pytest.mark.parametrize("strategy", ["truncation", "tournament", "ttest"])
def test_relative_margin_scales_with_the_member_score(strategy):
    scheduler = Scheduler(config(population_size=2, exploit=strategy, margin_relative=0.5), seed=0)

    def pop(a, b):  # some spread so the t-test has variance to work with
        return {0: member(0, a, returns=(a - 0.01, a, a + 0.01)), 1: member(1, b, returns=(b - 0.01, b, b + 0.01))}

    assert isinstance(scheduler.decide(0, pop(10.0, 14.0)), Continue)
    assert isinstance(scheduler.decide(0, pop(10.0, 16.0)), Exploit)
    assert isinstance(scheduler.decide(0, pop(-10.0, -6.0)), Continue)  # needs > -5
    assert isinstance(scheduler.decide(0, pop(-10.0, -4.0)), Exploit)
