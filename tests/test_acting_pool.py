"""Acting together (agents/acting_pool.py): one forward pass for a host's members, each member's
own weights, observations and random draws, so the same actions as acting alone."""

from __future__ import annotations

import threading

import gymnasium as gym
import numpy as np
import pytest
import torch

from pbt_rl.agents import make_learner
from pbt_rl.agents.acting_pool import ActingPool, _Request, act_together
from pbt_rl.agents.networks import build_actor_critic
from pbt_rl.config import AgentConfig, from_dict

VECTOR = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
IMAGE = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)


def models(obs_space, action_space, count: int, **agent) -> list[torch.nn.Module]:
    built = []
    for seed in range(count):
        torch.manual_seed(100 + seed)
        built.append(build_actor_critic(obs_space, action_space, AgentConfig(**agent)))
    return built


def observations(space, count: int, batch: int = 6) -> list[torch.Tensor]:
    space.seed(7)
    return [torch.as_tensor(np.stack([space.sample() for _ in range(batch)])) for _ in range(count)]


def alone(model, obs, seed: int, deterministic: bool = False) -> np.ndarray:
    with torch.no_grad():
        return model.act_packed(obs, deterministic, torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("obs_space, action_space, agent", [
    (VECTOR, gym.spaces.Discrete(3), {"network": "mlp", "hidden_sizes": [16, 16]}),
    (VECTOR, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), {"network": "mlp", "hidden_sizes": [16]}),
    (IMAGE, gym.spaces.Discrete(6), {"network": "nature"}),
])
def test_a_batched_pass_gives_each_member_the_actions_it_would_take_alone(obs_space, action_space, agent):
    members, obs = models(obs_space, action_space, 3, **agent), observations(obs_space, 3)
    requests = [_Request(m, o, False, torch.Generator().manual_seed(i)) for i, (m, o) in enumerate(zip(members, obs))]
    act_together(requests)
    for i, request in enumerate(requests):
        expected = alone(members[i], obs[i], i)
        assert request.done and request.error is None
        np.testing.assert_array_equal(request.packed[:, :-1], expected[:, :-1])  # the same actions
        np.testing.assert_allclose(request.packed[:, -1], expected[:, -1], rtol=1e-5, atol=1e-6)
    # The members differ, so a pass that gave everyone one member's weights would fail above.
    assert not np.array_equal(alone(members[0], obs[0], 0), alone(members[1], obs[0], 0))


def test_members_draw_from_their_own_generators_in_their_own_order():
    members, obs = models(VECTOR, gym.spaces.Discrete(4), 2, hidden_sizes=[8]), observations(VECTOR, 2)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    first = [_Request(m, o, False, g) for m, o, g in zip(members, obs, generators)]
    act_together(first)
    # Both generators moved exactly as one act_packed call moves a generator, no more.
    reference = torch.Generator().manual_seed(0)
    alone(members[0], obs[0], 0)
    members[0].act_packed(obs[0], generator=reference)
    assert all(torch.equal(g.get_state(), reference.get_state()) for g in generators)


def test_unlike_requests_go_in_separate_passes_and_an_error_stays_in_its_own():
    small = models(VECTOR, gym.spaces.Discrete(2), 2, hidden_sizes=[8])
    wide = models(VECTOR, gym.spaces.Discrete(2), 1, hidden_sizes=[32])
    obs = observations(VECTOR, 3)
    wrong = torch.zeros(6, 9)  # 9 features for a 5-feature network
    requests = [_Request(small[0], obs[0], False, torch.Generator().manual_seed(0)),
                _Request(wide[0], obs[1], False, torch.Generator().manual_seed(1)),
                _Request(small[1], obs[2], True, None),
                _Request(small[1], wrong, False, torch.Generator().manual_seed(3))]
    act_together(requests)
    assert all(r.done for r in requests)
    np.testing.assert_array_equal(requests[0].packed[:, 0], alone(small[0], obs[0], 0)[:, 0])
    np.testing.assert_array_equal(requests[1].packed[:, 0], alone(wide[0], obs[1], 1)[:, 0])
    np.testing.assert_array_equal(requests[2].packed[:, 0], alone(small[1], obs[2], 0, deterministic=True)[:, 0])
    assert isinstance(requests[3].error, RuntimeError) and requests[3].packed is None
    assert all(r.error is None for r in requests[:3])


def test_threads_acting_through_a_pool_get_what_they_would_alone_however_they_are_batched():
    members = models(VECTOR, gym.spaces.Discrete(3), 4, hidden_sizes=[16])
    pool = ActingPool()
    steps = 25
    inputs = observations(VECTOR, steps)  # drawn here: the space's sampler is not for threads
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def member(i: int) -> None:
        try:
            generator, rows = torch.Generator().manual_seed(i), []
            for obs in inputs:
                rows.append(pool.act(members[i], obs, False, generator))
            results[i] = rows
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(4):
        generator = torch.Generator().manual_seed(i)
        for obs, row in zip(inputs, results[i]):
            with torch.no_grad():
                expected = members[i].act_packed(obs, False, generator).numpy()
            np.testing.assert_array_equal(row[:, 0], expected[:, 0])
    assert pool.stats.requests == 4 * steps and 1 <= pool.stats.passes <= 4 * steps
    assert pool.stats.largest <= 4


def test_an_error_reaches_the_member_that_asked():
    member = models(VECTOR, gym.spaces.Discrete(2), 1, hidden_sizes=[8])[0]
    pool = ActingPool()
    with pytest.raises(RuntimeError):
        pool.act(member, torch.zeros(3, 9), False, None)
    assert pool.act(member, torch.zeros(3, 5), True, None).shape == (3, 2)  # the pool still works


def cartpole_learner(seed: int, algo: str = "a2c", **env):
    config = from_dict({
        "env": {"id": "CartPole-v1", "num_envs": 4, "num_threads": 1, **env},
        "agent": {"algo": algo, "device": "cpu", "hidden_sizes": [16], "unroll_length": 5},
        "pbt": {"population_size": 2, "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2}}},
    })
    return make_learner(config, seed)


def test_learners_acting_through_one_pool_train_exactly_as_alone():
    """Two real A2C learners in two threads acting through one pool: same weights and episodes."""
    pool = ActingPool()
    together = [cartpole_learner(seed) for seed in (3, 4)]
    for learner in together:
        learner.act_with(pool)
    reports: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: reports.__setitem__(i, together[i].train(2000))) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pool.stats.requests > 0
    for i, seed in enumerate((3, 4)):
        with cartpole_learner(seed) as reference:
            expected = reference.train(2000)
            assert reports[i].episode_returns == expected.episode_returns
            for name, tensor in reference.model.state_dict().items():
                assert torch.equal(tensor, together[i].model.state_dict()[name]), name
        together[i].close()


def test_impala_actors_act_through_the_pool_from_their_own_threads():
    """IMPALA's actor thread asks the pool with the actor's copy of the policy; both members train on."""
    pool = ActingPool()
    learners = [cartpole_learner(seed, "impala", async_batch_size=2) for seed in (5, 6)]
    reports: dict[int, object] = {}
    try:
        for learner in learners:
            learner.act_with(pool)
        threads = [threading.Thread(target=lambda i=i: reports.__setitem__(i, learners[i].train(1500))) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(reports) == [0, 1]
        for report in reports.values():
            assert report.env_steps >= 1500 and report.updates > 0
            assert all(np.isfinite(value) for value in report.losses.values())
        # Every env step of both actors was chosen through the pool (2 envs per request).
        assert pool.stats.requests >= sum(learner.env_steps for learner in learners) // 2
    finally:
        for learner in learners:
            learner.close()


def test_a_pass_that_fails_as_a_whole_fails_every_request_in_it(monkeypatch):
    import pbt_rl.agents.acting_pool as acting_pool

    def broken(requests):
        raise MemoryError("no room for the stacked parameters")

    monkeypatch.setattr(acting_pool, "act_together", broken)
    member = models(VECTOR, gym.spaces.Discrete(2), 1, hidden_sizes=[8])[0]
    pool = ActingPool()
    with pytest.raises(MemoryError):
        pool.act(member, torch.zeros(3, 5), True, None)
    assert pool.stats.passes == 1 and not pool._running  # the next member can run a pass
