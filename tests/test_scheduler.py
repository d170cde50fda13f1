"""Scheduler: readiness, fitness, exploit strategies, sync/async, fairness, determinism."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.config import from_dict
from pbt_rl.scheduler import Continue, Exploit, MemberState, Scheduler, truncation_count, welch_p_value_greater
from space_checks import inside_search_space

SEARCH_SPACE = {
    "lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2},
    "unroll_length": {"kind": "int", "low": 1, "high": 20},
    "gamma": {"kind": "uniform", "low": 0.9, "high": 0.999, "perturb": "one_minus"},
}
STEPS = 50_000


def config(**pbt):
    raw = {"population_size": 4, "search_space": SEARCH_SPACE, "min_episodes": 1, "fitness_window": 10, **pbt}
    return from_dict({"pbt": raw}).pbt


def hyperparameters(member_id):
    return {"lr": 1e-3, "unroll_length": 5 + member_id % 10, "gamma": 0.99, "algo": "a2c"}


def member(member_id, score, env_steps=STEPS, returns=None, history=None, checkpoint="auto", checkpoint_steps="auto"):
    """A member whose current window and single ready-point record both have ``score``; its
    checkpoint (if any) is its own, saved at its current env steps unless told otherwise."""
    if returns is None:
        returns = (score,) * 3
    if history is None:
        history = ((env_steps, score),)
    if checkpoint == "auto":
        checkpoint = f"members/{member_id}/checkpoints/{env_steps:012d}.pt"
    if checkpoint_steps == "auto":
        checkpoint_steps = None if checkpoint is None else env_steps
    return MemberState(member_id, env_steps, env_steps, tuple(returns), tuple(history), hyperparameters(member_id),
                       checkpoint, checkpoint_env_steps=checkpoint_steps)


def population(scores, **kwargs):
    return {i: member(i, s, **kwargs) for i, s in enumerate(scores)}


def decide_all(scheduler, pop):
    return {i: scheduler.decide(i, pop) for i in pop}


def exploiters(decisions):
    return {i: d.donor_id for i, d in decisions.items() if isinstance(d, Exploit)}


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
