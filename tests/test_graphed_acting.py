"""The acting step replayed as a CUDA graph (agents/graphed_acting.py).

What lets a graph sample the same actions as the eager step is specified here on the CPU: the
random numbers drawn before the forward pass (``draw_noise``) are the ones ``act_packed`` draws
after it. The graphs themselves need a GPU: those tests are skipped on CPU machines (CI) and run
on the GPU machine (docs/design.md says when they last ran).
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from pbt_rl.agents.networks import build_actor_critic
from pbt_rl.config import AgentConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

PIXELS = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
VECTOR = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
SPACES = {"discrete pixels": (PIXELS, gym.spaces.Discrete(6)),
          "box vector": (VECTOR, gym.spaces.Box(-1.0, 1.0, (6,), np.float32))}


def _model(name: str, device: str = "cpu"):
    torch.manual_seed(0)
    observation_space, action_space = SPACES[name]
    return build_actor_critic(observation_space, action_space, AgentConfig(log_std_init=-0.5)).to(device)


def _obs(name: str, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "discrete pixels":
        return rng.integers(0, 256, size=(batch, *PIXELS.shape), dtype=np.uint8)
    return rng.normal(size=(batch, *VECTOR.shape)).astype(np.float32)


def _generators(device: str) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator(device).manual_seed(7), torch.Generator(device).manual_seed(7)


@pytest.mark.parametrize("name", list(SPACES))
def test_noise_drawn_before_the_forward_pass_samples_what_act_packed_samples(name):
    model = _model(name)
    eager_generator, early_generator = _generators("cpu")
    with torch.no_grad():
        for seed in range(3):
            obs = torch.from_numpy(_obs(name, 5, seed))
            noise = model.draw_noise(torch.empty(5, model.policy_head.out_features), early_generator)
            early = model.sample_packed(model(obs)[0], noise=noise)
            eager = model.act_packed(obs, generator=eager_generator)
            assert torch.equal(early, eager)
            assert noise.shape == (5, 6)


def test_to_device_fills_a_given_input_tensor_in_place():
    from pbt_rl.agents.device import to_device

    frames = _obs("discrete pixels", 2, 0)
    static = torch.zeros(frames.shape, dtype=torch.uint8)
    assert to_device(frames, torch.device("cpu"), out=static) is static  # the graph's input, not a new tensor
    np.testing.assert_array_equal(static.numpy(), frames)


def test_a_host_copy_of_a_host_value_is_that_value():
    from pbt_rl.agents.device import HostCopy

    rows = np.arange(6.0).reshape(3, 2)
    assert HostCopy(rows).array() is rows
    np.testing.assert_array_equal(HostCopy(torch.from_numpy(rows)).array(), rows)


def test_a_capture_serves_its_own_model_while_its_tensors_stay_where_they_were():
    """How graphed acting knows a capture still reads the right parameters, without walking the
    module tree each step: the same model object, every parameter and buffer at its address."""
    from pbt_rl.agents.graphed_acting import _Captured

    model = _model("box vector")
    entry = _Captured.of(model)
    assert entry.serves(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # an optimiser step, a load: in place
    assert entry.serves(model)
    assert not entry.serves(copy.deepcopy(model))  # another model, whatever its values
    assert not entry.serves(copy.copy(model))  # another object, even one on the same tensors
    model.double()  # its tensors moved
    assert not entry.serves(model)
    moved = _Captured.of(model)
    del model
    assert moved.model() is None  # a capture does not keep its model alive


@cuda
def test_a_host_copy_of_a_gpu_tensor_waits_for_the_work_that_computes_it():
    from pbt_rl.agents.device import HostCopy

    big = torch.randn(2048, 2048, device="cuda")
    result = (big @ big).sum(dim=1)  # queued; the copy is ordered after it
    copy_ = HostCopy(result)
    expected = result.cpu().numpy()
    np.testing.assert_array_equal(copy_.array(), expected)
    np.testing.assert_array_equal(copy_.array(), expected)  # a second read does not wait again


@cuda
@pytest.mark.parametrize("name", list(SPACES))
def test_graphed_acting_samples_what_eager_acting_samples(name):
    from pbt_rl.agents.graphed_acting import GraphedActing
    from pbt_rl.agents.graphed_steps import WARMUP_STEPS

    model = _model(name, "cuda")
    graphed_generator, eager_generator = _generators("cuda")
    acting = GraphedActing(torch.device("cuda"))

    def both(seed: int) -> None:
        obs = _obs(name, 8, seed)
        graphed = acting.launch(model, obs, graphed_generator).array()
        with torch.no_grad():
            eager = model.act_packed(torch.from_numpy(obs).cuda(), generator=eager_generator).cpu().numpy()
        np.testing.assert_array_equal(graphed[:, :-1], eager[:, :-1])  # the actions
        np.testing.assert_allclose(graphed[:, -1], eager[:, -1], rtol=1e-5, atol=1e-6)  # log-probs

    for seed in range(WARMUP_STEPS + 4):  # warm-up, a capture, then replays
        both(seed)
    assert acting.captures == 1
    with torch.no_grad():  # weights changed in place (an optimiser step, a load): the next replay uses them
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    both(100)
    assert acting.captures == 1
    other_batch = _obs(name, 3, 5)  # another batch size: its own capture
    for _ in range(WARMUP_STEPS + 2):
        acting.launch(model, other_batch, graphed_generator)
    assert acting.captures == 2
    model = copy.deepcopy(model)  # parameters elsewhere: captured again, not read from the old places
    graphed_generator, eager_generator = _generators("cuda")
    for seed in range(WARMUP_STEPS + 2):
        both(200 + seed)
    assert acting.captures == 3
