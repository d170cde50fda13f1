"""PB2 (Parker-Holder et al. 2020): the improvement data, the time-varying GP-UCB choice, and the
scheduler's ``pbt.explore: pb2``.

The paper's definitions, as the tests check them:
- data: per member and ready interval, y = change in fitness over the interval (per ready
  interval), x = the values in force, t = the interval's start in ready intervals;
- kernel: k((x, t), (x', t')) = k_SE(x, x') * (1 - eps) ** (|t - t'| / 2): old data counts less;
- choice: argmax over candidates of mu(x, T) + sqrt(beta_T) * sigma(x, T) at the current time T,
  beta_T = 2 log(|D| T^2 pi^2 / (6 delta)).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sklearn")

from pbt_rl.config import from_dict  # noqa: E402
from pbt_rl.decisions import Exploit, MemberState  # noqa: E402
from pbt_rl.pb2 import DELTA, ImprovementLog, ucb_beta, ucb_choice  # noqa: E402
from pbt_rl.scheduler import Scheduler  # noqa: E402
from pbt_rl.search_space import SearchSpace  # noqa: E402
from space_checks import inside_search_space  # noqa: E402

SPACE = {
    "lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2},
    "unroll_length": {"kind": "int", "low": 1, "high": 20},
    "gamma": {"kind": "uniform", "low": 0.9, "high": 0.999, "perturb": "one_minus"},
    "num_epochs": {"kind": "categorical", "choices": [1, 2, 4]},
}
R = 1000  # ready_after_steps
GRID = np.linspace(0.0, 1.0, 101)[:, None]
NONE_PENDING = np.zeros((0, 1))


def pbt_config(**fields):
    raw = {"population_size": 4, "search_space": SPACE, "explore": "pb2", "ready_after_steps": R, "fitness_window": 2,
           **fields}
    return from_dict({"pbt": raw}).pbt


def space():
    return SearchSpace.from_config(pbt_config())


def values(lr=1e-3, unroll_length=5, gamma=0.99, num_epochs=1):
    return {"lr": lr, "unroll_length": unroll_length, "gamma": gamma, "num_epochs": num_epochs}


def filled_log(rng, points=12):
    """A log with observations whose improvement peaks at lr = 1e-3 (unit 0.5)."""
    log = ImprovementLog(space(), R)
    for k in range(points):
        hp = values(lr=float(10 ** rng.uniform(-4, -2)), unroll_length=int(rng.integers(1, 21)))
        log.started(k, 0, 1.0, hp)
        log.observe(k, R, 1.0 - (math.log10(hp["lr"]) + 3) ** 2, hp)
    return log


# ---------------------------------------------------------------------------- definitions


def test_beta_schedule_is_the_finite_set_gp_ucb_one():
    for candidates, t in [(257, 1), (257, 10), (10, 3.5)]:
        assert ucb_beta(candidates, t) == pytest.approx(2 * math.log(candidates * t**2 * math.pi**2 / (6 * DELTA)))
    assert ucb_beta(257, 0) == ucb_beta(257, 1)  # time is at least 1
    assert ucb_beta(257, 20) > ucb_beta(257, 10)  # more exploration as time goes on


def test_improvement_is_the_fitness_change_per_ready_interval_with_its_start_time_and_values():
    log = ImprovementLog(space(), R)
    log.started(0, 2 * R, 10.0, values(lr=2e-3))
    log.observe(0, 4 * R, 16.0, values(lr=2e-3))  # an interval of two ready intervals: +6 -> +3 per interval
    (obs,) = log.observations
    assert obs.t == 2.0 and obs.improvement == pytest.approx(3.0)
    assert obs.values == {"lr": 2e-3, "unroll_length": 5, "gamma": 0.99}  # numeric parameters only


def test_no_observation_without_a_start_a_score_or_the_expected_values():
    log = ImprovementLog(space(), R)
    log.observe(0, R, 5.0, values())  # no start
    log.started(1, 0, math.nan, values())
    log.observe(1, R, 5.0, values())  # unscored start
    log.started(2, 0, 1.0, values(lr=1e-3))
    log.observe(2, R, 5.0, values(lr=5e-3))  # the values changed behind the log's back
    log.started(3, 0, 1.0, values())
    log.forget(3)  # a reseed
    log.observe(3, R, 5.0, values())
    assert log.observations == []


def test_state_dict_round_trips_through_json():
    log = filled_log(np.random.default_rng(0))
    log.started(7, 3 * R, math.nan, values())
    restored = ImprovementLog(space(), R)
    restored.load_state_dict(json.loads(json.dumps(log.state_dict())))
    assert restored.observations == log.observations
    assert restored.state_dict() == json.loads(json.dumps(log.state_dict()))


# ---------------------------------------------------------------------------- the UCB choice


def test_with_beta_zero_the_choice_is_the_maximum_of_a_known_function():
    x = np.linspace(0.0, 1.0, 25)
    inputs = np.c_[x, np.zeros_like(x)]
    best, _ = ucb_choice(inputs, -(x - 0.3) ** 2, GRID, 0.0, NONE_PENDING, beta=0.0, seed=0)
    assert abs(GRID[best, 0] - 0.3) <= 0.03


def test_a_large_beta_explores_where_there_is_no_data():
    x = np.linspace(0.0, 0.5, 20)  # data on [0, 0.5] only, of sin(6x): best at pi / 12
    inputs = np.c_[x, np.zeros_like(x)]
    exploit, _ = ucb_choice(inputs, np.sin(6 * x), GRID, 0.0, NONE_PENDING, beta=0.0, seed=0)
    explore, _ = ucb_choice(inputs, np.sin(6 * x), GRID, 0.0, NONE_PENDING, beta=100.0, seed=0)
    assert abs(GRID[exploit, 0] - math.pi / 12) <= 0.03
    assert GRID[explore, 0] > 0.75  # the unexplored end has the largest uncertainty


def test_time_enters_the_model_recent_data_wins():
    # Early on x = 0.2 was best, lately x = 0.8 is: at the current time the model follows the recent data.
    x = np.tile(np.linspace(0.0, 1.0, 11), 2)
    t = np.repeat([0.0, 30.0], 11)
    y = np.where(t == 0.0, -(x - 0.2) ** 2, -(x - 0.8) ** 2)
    best, _ = ucb_choice(np.c_[x, t], y, GRID, 30.0, NONE_PENDING, beta=0.0, seed=0)
    assert abs(GRID[best, 0] - 0.8) <= 0.1


def test_pending_points_lower_the_ucb_where_the_population_already_is():
    x = np.linspace(0.0, 1.0, 9)
    inputs = np.c_[x, np.zeros_like(x)]
    y = np.sin(3 * x)
    _, alone = ucb_choice(inputs, y, GRID, 0.0, NONE_PENDING, beta=4.0, seed=0)
    _, batch = ucb_choice(inputs, y, GRID, 0.0, np.array([[0.44]]), beta=4.0, seed=0)
    near = np.abs(GRID[:, 0] - 0.44) < 0.03
    assert np.all(batch[near] < alone[near])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(0, 50 * R))
def test_suggestions_stay_inside_the_search_space_and_are_deterministic_for_a_seed(seed, steps):
    log = filled_log(np.random.default_rng(seed % 1000), points=6)
    base = values(lr=5e-3, unroll_length=20)
    pending = [values(lr=1e-4, unroll_length=1)]
    first = log.suggest(base, steps, pending, np.random.default_rng(seed))
    again = log.suggest(base, steps, pending, np.random.default_rng(seed))
    assert first == again
    numeric = [s for s in pbt_config().search_space if s.kind != "categorical"]
    assert set(first) == {s.name for s in numeric}
    assert inside_search_space(numeric, first)


def test_too_little_data_means_no_suggestion():
    log = ImprovementLog(space(), R)
    assert log.suggest(values(), R, [], np.random.default_rng(0)) is None


# ---------------------------------------------------------------------------- the scheduler


def member(member_id, env_steps, score, hp):
    return MemberState(member_id, env_steps, env_steps, (score, score), ((env_steps, score),), hp,
                       f"members/{member_id}/checkpoints/{env_steps:012d}.pt", env_steps)


def run_generations(scheduler, generations=3):
    """Sync generations of a population whose fitness grows fastest with lr near 1e-3."""
    hps = {i: values(lr=10 ** (-4 + i * 0.6), unroll_length=1 + 5 * i) for i in range(4)}
    fitness = {i: 0.0 for i in range(4)}
    decisions = {}
    for generation in range(1, generations + 1):
        steps = generation * R
        for i in hps:
            fitness[i] += 1.0 - (math.log10(hps[i]["lr"]) + 3) ** 2
        pop = {i: member(i, steps, fitness[i], hps[i]) for i in hps}
        decisions = scheduler.decide_generation(pop)
        for i, d in decisions.items():
            if isinstance(d, Exploit):
                hps[i], fitness[i] = d.new_hyperparameters, d.donor_score
    return decisions


def test_scheduler_pb2_chooses_numeric_values_and_explores_categoricals_as_usual():
    scheduler = Scheduler(pbt_config(mode="sync", truncation_fraction=0.25), seed=4)
    decisions = run_generations(scheduler)
    assert len(scheduler.pb2.observations) >= 8  # every member's intervals since generation 1
    exploits = [d for d in decisions.values() if isinstance(d, Exploit)]
    assert exploits
    for d in exploits:
        assert {d.operations[n] for n in ("lr", "unroll_length", "gamma")} == {"pb2"}
        assert d.operations["num_epochs"].startswith(("neighbour", "resample"))
        assert inside_search_space(pbt_config().search_space, d.new_hyperparameters)


def test_scheduler_pb2_is_seeded_and_resumes_from_its_state_dict():
    def history(scheduler, generations):
        return {i: d.to_dict() for i, d in run_generations(scheduler, generations).items()}

    assert history(Scheduler(pbt_config(mode="sync"), seed=1), 3) == history(Scheduler(pbt_config(mode="sync"), seed=1), 3)
    first = Scheduler(pbt_config(mode="sync"), seed=1)
    run_generations(first, 2)
    restored = Scheduler(pbt_config(mode="sync"), seed=99)
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert restored.pb2.observations == first.pb2.observations
    assert restored.state_dict() == json.loads(json.dumps(first.state_dict()))


def test_first_exploits_fall_back_to_the_ordinary_explore_and_say_so():
    scheduler = Scheduler(pbt_config(mode="sync"), seed=0)
    decisions = run_generations(scheduler, generations=1)  # no finished interval yet
    (exploit,) = [d for d in decisions.values() if isinstance(d, Exploit)]
    assert exploit.operations["lr"].endswith("(pb2: too little data)")


def test_without_scikit_learn_pb2_is_refused_at_the_start_in_one_line(monkeypatch):
    import sys

    from pbt_rl.config import ConfigError

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ConfigError, match=r"pbt-rl\[pb2\]"):
        Scheduler(pbt_config(), seed=0)
    Scheduler(pbt_config(explore="perturb"), seed=0)  # the other explore modes need no scikit-learn
