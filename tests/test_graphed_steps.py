"""Gradient steps replayed as CUDA graphs (agents/graphed_steps.py).

The divergence record that a graphed step uses instead of a host check (DeferredCheck) is pure
torch and is specified here on the CPU. The graphs themselves need a GPU: those tests are skipped
on CPU machines (CI) and run on the GPU machine (docs/design.md says when they last ran).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from learner_support import assert_same_tensors, cartpole_unroll, make_config, parameters, round_trip
from pbt_rl.agents import TrainingDiverged
from pbt_rl.agents.graphed_steps import DeferredCheck, GraphedSteps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model_and_optimizer(kind: str, device: str = "cpu"):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    model = model.to(device)
    if kind == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    else:
        optimizer = torch.optim.RMSprop(model.parameters(), lr=0.05, momentum=0.5)
    return model, optimizer


def _loss(model, seed: int) -> torch.Tensor:
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed))
    return model(x).pow(2).mean()


def _eager_step(model, optimizer, loss, max_norm):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    optimizer.step()
    return norm


def _snapshot(model, optimizer):
    state = {f"{i}.{k}": torch.as_tensor(v).clone() for i, s in enumerate(optimizer.state.values()) for k, v in s.items()}
    return {**parameters_of(model), **state}


def parameters_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def test_a_finite_deferred_step_is_the_eager_step(kind):
    eager_model, eager_opt = _model_and_optimizer(kind)
    model, optimizer = _model_and_optimizer(kind)
    check = DeferredCheck(model, optimizer, torch.device("cpu"))
    for seed in range(4):
        if seed == 0:  # the optimiser state must exist before a deferred step
            norm = _eager_step(model, optimizer, _loss(model, seed), 0.5)
        else:
            norm = check.step(_loss(model, seed), 0.5)
        eager_norm = _eager_step(eager_model, eager_opt, _loss(eager_model, seed), 0.5)
        assert float(norm) == pytest.approx(float(eager_norm), rel=1e-6)
        assert_same_tensors(_snapshot(model, optimizer), _snapshot(eager_model, eager_opt))
    assert (check.diverged.item(), check.applied.item()) == (0.0, 3.0)


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_and_every_later_one_change_nothing_until_reset(kind, poison):
    model, optimizer = _model_and_optimizer(kind)
    _eager_step(model, optimizer, _loss(model, 0), 0.5)
    check = DeferredCheck(model, optimizer, torch.device("cpu"))
    check.step(_loss(model, 1), 0.5)
    before = _snapshot(model, optimizer)
    if poison == "loss":
        bad = _loss(model, 2) * math.nan
    else:  # a finite loss whose gradient is not: d/dw sqrt(w - w) at 0
        weight = next(model.parameters())
        bad = _loss(model, 2) + (weight[0, 0] - weight[0, 0].detach()).abs().sqrt()
    check.step(bad, 0.5)
    check.step(_loss(model, 3), 0.5)  # finite, but after the failure: not applied either
    assert (check.diverged.item(), check.applied.item()) == (1.0, 1.0)
    assert_same_tensors(_snapshot(model, optimizer), before)
    check.reset()
    check.step(_loss(model, 4), 0.5)
    assert (check.diverged.item(), check.applied.item()) == (0.0, 1.0)
    assert not torch.equal(_snapshot(model, optimizer)["0.weight"], before["0.weight"])


def test_a_deferred_step_refuses_an_optimizer_without_state():
    model, optimizer = _model_and_optimizer("rmsprop")
    with pytest.raises(RuntimeError, match="needs the optimiser's state"):
        DeferredCheck(model, optimizer, torch.device("cpu")).step(_loss(model, 0), 0.5)


def test_a_cpu_learner_loads_a_state_saved_by_a_capturable_optimizer(learners):
    """A checkpoint of a GPU member (capturable optimiser) resumes on the CPU, and the other way."""
    config = make_config("a2c", num_envs=4)
    source = learners(config, seed=1)
    source.update(cartpole_unroll(6, 4))
    state = round_trip(source.state_dict())
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True
    learner = learners(config, seed=2)
    learner.load_state_dict(state)
    assert not any(group["capturable"] for group in learner.optimizer.param_groups)
    assert all(s["step"].device.type == "cpu" for s in learner.optimizer.state.values())
    learner.update(cartpole_unroll(6, 4, seed=1))
    assert learner.updates == 2


def test_cpu_learners_take_eager_steps(learners):
    assert learners(make_config("impala", num_envs=4))._graphs is None


# ----------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------


def _cuda_twins(learners, algo: str, **agent):
    agent = {"num_epochs": 2, "num_minibatches": 2, "ppo_clip": 0.2, "normalize_advantages": True, **agent}
    config = make_config(algo, num_envs=4, **agent)
    config = dataclasses.replace(config, agent=dataclasses.replace(config.agent, device="cuda"))
    graphed = learners(config, seed=5)
    eager = learners(dataclasses.replace(config, agent=dataclasses.replace(config.agent, cuda_graphs=False)), seed=5)
    assert isinstance(graphed._graphs, GraphedSteps) and eager._graphs is None
    return graphed, eager


def _assert_close_parameters(a, b):
    for name, value in parameters(a).items():
        torch.testing.assert_close(value, parameters(b)[name], rtol=1e-4, atol=1e-5, msg=name)


@cuda
@pytest.mark.parametrize("algo,optimizer", [("a2c", "rmsprop"), ("impala", "adam")])
def test_graphed_updates_learn_what_eager_updates_learn(learners, algo, optimizer):
    graphed, eager = _cuda_twins(learners, algo, optimizer=optimizer)
    for seed in range(4):  # 16 gradient steps: 3 eager warm-up, a capture, then replays
        unroll = cartpole_unroll(6, 4, seed)
        stats, eager_stats = graphed.update(unroll), eager.update(unroll)
        assert graphed.updates == eager.updates == 4 * (seed + 1)
        for name, value in eager_stats.items():
            assert stats[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
        _assert_close_parameters(graphed, eager)
    assert graphed._graphs.captures == 1
    # A hyperparameter change (baked into the graph) is captured again, and learned from.
    for learner in (graphed, eager):
        learner.set_hyperparameters({"lr": 0.01, "entropy_cost": 0.05})
    for seed in range(4, 7):
        unroll = cartpole_unroll(6, 4, seed)
        graphed.update(unroll), eager.update(unroll)
    assert graphed._graphs.captures == 2
    _assert_close_parameters(graphed, eager)
    # A load (new optimiser state tensors) too: both become the eager twin's state.
    state = round_trip(eager.state_dict())
    graphed.load_state_dict(state), eager.load_state_dict(state)
    for seed in range(7, 10):
        unroll = cartpole_unroll(6, 4, seed)
        graphed.update(unroll), eager.update(unroll)
    assert graphed._graphs.captures == 3
    _assert_close_parameters(graphed, eager)


@cuda
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_a_diverged_graphed_step_stops_where_the_eager_one_stops(learners, optimizer):
    graphed, eager = _cuda_twins(learners, "a2c", optimizer=optimizer, num_minibatches=4)
    for seed in range(2):  # 8 steps: the graph is captured and replayed
        unroll = cartpole_unroll(6, 4, seed)
        graphed.update(unroll), eager.update(unroll)
    assert graphed._graphs.captures == 1
    poisoned = cartpole_unroll(6, 4, 2)
    poisoned.rewards[:, 2] = np.nan  # the step whose minibatch holds env 2 fails
    for learner in (graphed, eager):
        with pytest.raises(TrainingDiverged, match="non-finite"):
            learner.update(poisoned)
    assert graphed.updates == eager.updates
    _assert_close_parameters(graphed, eager)
    graphed.update(cartpole_unroll(6, 4, 3)), eager.update(cartpole_unroll(6, 4, 3))  # and goes on
    _assert_close_parameters(graphed, eager)


@cuda
@pytest.mark.parametrize("algo", ["a2c", "impala"])
def test_a_graphed_learner_trains_beside_its_acting(learners, algo):
    config = make_config(algo, num_envs=8, async_batch_size=4 if algo == "impala" else 0, num_epochs=2,
                         num_minibatches=2, unroll_length=8)
    config = dataclasses.replace(config, agent=dataclasses.replace(config.agent, device="cuda", graphed_acting=True))
    learner = learners(config)
    report = learner.train(4000)
    assert learner._graphs.captures >= 1 and report.updates > 3 * 2
    assert learner._graphed_acting.captures >= 1  # its acting steps are replayed too (graphed_acting.py)
    assert all(math.isfinite(value) for value in report.losses.values())
    clone = learners(config, seed=1)
    clone.load_state_dict(copy.deepcopy(learner.state_dict()))
    assert_same_tensors(parameters(clone), parameters(learner))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_graphed_learner_on_the_second_gpu_learns_there(learners):
    """A member placed on cuda:1 (run.gpus) captures and replays its graph on that device, from a
    thread whose current device is cuda:0."""
    config = make_config("impala", num_envs=4, num_epochs=2, num_minibatches=2, ppo_clip=0.2)
    on_second = dataclasses.replace(config, agent=dataclasses.replace(config.agent, device="cuda:1"))
    eager = dataclasses.replace(on_second, agent=dataclasses.replace(on_second.agent, cuda_graphs=False))
    graphed, reference = learners(on_second, seed=5), learners(eager, seed=5)
    torch.cuda.set_device(0)
    for seed in range(4):
        unroll = cartpole_unroll(6, 4, seed)
        graphed.update(unroll), reference.update(unroll)
    assert graphed._graphs.captures == 1
    assert all(p.device == torch.device("cuda:1") for p in graphed.model.parameters())
    _assert_close_parameters(graphed, reference)
