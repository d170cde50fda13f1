"""A learner's state (docs/design.md, Learner contract): save and load give the same next actions,
resume reproduces the uninterrupted run, an exploit keeps the member's counters, the state loads
with weights_only; and its random streams: its own, separate for acting and updating, the
process's untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner_support import ALGOS, assert_same_tensors, make_config, parameters, round_trip


# ----------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_save_load_gives_the_same_next_actions(learners, algo):
    # Continuous actions (Pendulum) make "same actions" mean same weights, normaliser and RNG.
    config = make_config(algo, "Pendulum-v1", num_envs=4, normalize_observations="on",
                         normalize_returns=True, unroll_length=5)
    saved = learners(config, seed=1)
    saved.train(1000)
    saved.set_hyperparameters({"lr": 2e-3, "unroll_length": 6})
    state = round_trip(saved.state_dict())
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    expected = [saved.act(obs) for _ in range(3)]

    other = learners(config, seed=2)
    other.train(1500)
    other.load_state_dict(state)
    for step, actions in enumerate(expected):  # the same future, draw after draw
        np.testing.assert_array_equal(other.act(obs), actions, err_msg=f"draw {step}")
    assert other.env_steps == state["env_steps"] and other.updates == state["updates"]
    assert other.hyperparameters() == saved.hyperparameters()
    assert other.optimizer.param_groups[0]["lr"] == 2e-3
    np.testing.assert_array_equal(other.obs_normalizer.mean, saved.obs_normalizer.mean)
    np.testing.assert_array_equal(other.reward_scaler.statistics.var, saved.reward_scaler.statistics.var)
    report = other.train(other.env_steps + 600)  # training continues from the loaded member
    assert report.updates > 0 and report.extra["batch_shape"][0] == 6


def test_a2c_resume_reproduces_the_uninterrupted_run(learners):
    """Same seed and same env history: continuing after a load equals never having stopped."""
    config = make_config("a2c", num_envs=4, unroll_length=5)
    reference = learners(config, seed=3)
    reference.train(1000)
    state = round_trip(reference.state_dict())
    reference.train(2000)

    resumed = learners(config, seed=3)
    resumed.train(1000)  # the same env history as the reference
    with torch.no_grad():  # ... then scramble everything the state must restore
        for p in resumed.model.parameters():
            p.add_(1.0)
    resumed.set_hyperparameters({"lr": 0.1, "entropy_cost": 0.5})
    torch.manual_seed(12345)
    resumed.load_state_dict(state)
    resumed.train(2000)
    assert_same_tensors(parameters(resumed), parameters(reference))


@pytest.mark.parametrize("algo", ALGOS)
def test_exploit_load_keeps_own_counters(learners, algo):
    donor = learners(make_config(algo), seed=1)
    donor.train(1000)
    member = learners(make_config(algo), seed=2)
    member.train(300)
    steps, updates, streams = member.env_steps, member.updates, member.state_dict()["rng"]
    member.load_state_dict(donor.state_dict(), resume=False)
    assert (member.env_steps, member.updates) == (steps, updates)
    assert_same_tensors(parameters(member), parameters(donor))
    assert_same_streams(member.state_dict()["rng"], streams)  # its own random streams, not the donor's


def assert_same_streams(a: dict, b: dict) -> None:
    """Two learners' saved generator states (``state_dict()["rng"]``) are equal."""
    assert a.keys() == b.keys() == {"acting", "update"}
    for name in a:
        assert a[name]["device"] == b[name]["device"], name
        assert torch.equal(a[name]["state"], b[name]["state"]), name


# ----------------------------------------------------------------------------------------
# Random streams: a learner's own, and the process's untouched
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_building_a_second_learner_does_not_change_the_first_ones_future(learners, algo):
    """Two learners of the same seed, built and used interleaved, act each as one learner alone."""
    config = make_config(algo, "Pendulum-v1", num_envs=4, unroll_length=5)
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    alone = learners(config, seed=1)
    expected = [alone.act(obs) for _ in range(3)]

    process_stream = torch.get_rng_state()
    first = learners(config, seed=1)
    first_actions = [first.act(obs)]
    second = learners(config, seed=1)  # a learner that seeded the process would restart first's stream here
    second_actions = [second.act(obs)]
    first_actions.append(first.act(obs))
    second_actions.append(second.act(obs))
    first_actions.append(first.act(obs))
    for step, actions in enumerate(expected[:2]):
        np.testing.assert_array_equal(second_actions[step], actions, err_msg=f"second learner, draw {step}")
    for step, actions in enumerate(expected):
        np.testing.assert_array_equal(first_actions[step], actions, err_msg=f"first learner, draw {step}")
    assert torch.equal(torch.get_rng_state(), process_stream)  # nobody drew from the process's generator


def test_interleaved_a2c_training_equals_training_alone(learners):
    config = make_config("a2c", num_envs=4, unroll_length=5)
    alone = learners(config, seed=4)
    alone.train(500)
    alone.train(1000)

    process_stream = torch.get_rng_state()
    first = learners(config, seed=4)
    first.train(500)
    second = learners(config, seed=4)
    second.train(700)
    first.train(1000)
    assert_same_tensors(parameters(first), parameters(alone))
    assert torch.equal(torch.get_rng_state(), process_stream)


def test_learners_built_in_parallel_threads_get_their_own_seeds_weights():
    """Members of one host process build their learners in parallel threads (runtime/member_host.py).

    The first build pauses half-way until the second build is inside its own ``build`` (which
    means the second has seeded the process's generator), or for at most 2 s: builds that were not
    kept apart would finish the first model from the second's seed."""
    import threading

    from pbt_rl.agents.state import seeded_build

    def layers() -> list[torch.nn.Linear]:
        return [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]

    reference, _, _ = seeded_build(11, torch.device("cpu"), lambda: torch.nn.Sequential(*layers()))
    second_inside = threading.Event()

    def first_build() -> torch.nn.Module:
        head = torch.nn.Linear(8, 8)
        second_inside.wait(timeout=2.0)
        return torch.nn.Sequential(head, torch.nn.Linear(8, 8))

    def second_build() -> torch.nn.Module:
        second_inside.set()
        return torch.nn.Sequential(*layers())

    built: dict[str, torch.nn.Module] = {}
    first = threading.Thread(target=lambda: built.update(first=seeded_build(11, torch.device("cpu"), first_build)[0]))
    first.start()
    second = threading.Thread(target=lambda: built.update(second=seeded_build(12, torch.device("cpu"), second_build)[0]))
    second.start()
    first.join()
    second.join()
    assert all(torch.equal(a, b) for a, b in zip(built["first"].state_dict().values(),
                                                               reference.state_dict().values()))


@pytest.mark.parametrize("algo", ALGOS)
def test_acting_and_update_draw_from_separate_generators(learners, algo):
    """Acting (IMPALA: the actor thread) draws only from the acting generator, minibatch
    permutations (IMPALA: the learner thread) only from the update generator: more permutations
    leave the acting stream where it was, and the update stream advances by exactly the
    permutations of the update."""
    num_envs, epochs, minibatches = 4, 2, 2
    one_step = learners(make_config(algo, num_envs=num_envs), seed=5)
    permuting = learners(make_config(algo, num_envs=num_envs, num_epochs=epochs, num_minibatches=minibatches,
                                     ppo_clip=0.2), seed=5)
    initial = permuting.state_dict()["rng"]
    assert_same_streams(one_step.state_dict()["rng"], initial)  # same seed, same streams

    one_step.train(1200)
    report = permuting.train(1200)
    after = permuting.state_dict()["rng"]
    assert one_step.env_steps == permuting.env_steps
    assert torch.equal(after["acting"]["state"], one_step.state_dict()["rng"]["acting"]["state"])
    assert not torch.equal(after["acting"]["state"], initial["acting"]["state"])
    assert torch.equal(one_step.state_dict()["rng"]["update"]["state"], initial["update"]["state"])  # no permutation

    batches = report.updates // (epochs * minibatches)
    assert batches > 0
    expected = torch.Generator()
    expected.set_state(initial["update"]["state"])
    for _ in range(batches * epochs):
        torch.randperm(num_envs, generator=expected)
    assert torch.equal(after["update"]["state"], expected.get_state())


def non_plain_values(value, where: str = "state") -> list[str]:
    """Where a nested state holds anything but tensors and plain Python values (or non-str/int keys)."""
    if isinstance(value, dict):
        keys = [f"{where}: key {key!r}" for key in value if not isinstance(key, (str, int))]
        return keys + [path for key, item in value.items() for path in non_plain_values(item, f"{where}/{key}")]
    if isinstance(value, (list, tuple)):
        return [path for i, item in enumerate(value) for path in non_plain_values(item, f"{where}/{i}")]
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return []
    return [f"{where}: {type(value).__name__}"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_learner_state_loads_with_weights_only(learners, algo, optimizer):
    config = make_config(algo, "Pendulum-v1", normalize_observations="on", normalize_returns=True,
                         optimizer=optimizer, num_minibatches=2)
    learner = learners(config, seed=1)
    learner.train(400)
    state = learner.state_dict()
    assert non_plain_values(state) == []
    loaded = round_trip(state)  # torch.load(..., weights_only=True)
    other = learners(config, seed=2)
    other.load_state_dict(loaded)
    assert_same_tensors(parameters(other), parameters(learner))
    assert_same_streams(other.state_dict()["rng"], state["rng"])
