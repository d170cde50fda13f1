"""Specification of the actor-critic networks and the running normaliser."""

from __future__ import annotations

import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from pbt_rl.agents.networks import (
    ActorCritic,
    ImpalaResNet,
    MLPTorso,
    NatureCNN,
    build_actor_critic,
    orthogonal_init,
)
from pbt_rl.agents.normalizer import RunningMeanStd
from pbt_rl.config import AgentConfig

ATARI_OBS = gym.spaces.Box(0, 255, shape=(4, 84, 84), dtype=np.uint8)
VECTOR_OBS = gym.spaces.Box(-np.inf, np.inf, shape=(5,), dtype=np.float32)
BOX_ACTIONS = gym.spaces.Box(low=np.array([-1.0, -2.0, 0.0], dtype=np.float32), high=np.array([1.0, 2.0, 0.5], dtype=np.float32))


def pixels(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_nature_cnn_takes_uint8_and_scales_inside():
    torso = NatureCNN()
    obs = pixels(2)
    features = torso(obs)
    assert features.shape == (2, 512) and features.dtype == torch.float32
    # the /255 happens inside: feeding the same pixels as float 0..255 gives the same features
    torch.testing.assert_close(torso(obs.float()), features)


def test_impala_resnet_shapes_and_depth():
    torso = ImpalaResNet()
    assert torso(pixels(2)).shape == (2, 256)
    convs = [m for m in torso.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 15  # 3 sections x (1 conv + 2 blocks x 2 convs)
    assert [c.out_channels for c in convs[::5]] == [16, 32, 32]


def test_mlp_torso_shape_and_tanh_range():
    torso = MLPTorso(5, (32, 16))
    features = torso(torch.randn(7, 5) * 100)
    assert features.shape == (7, 16) and torso.output_dim == 16
    assert features.abs().max() <= 1.0


def sample(model: ActorCritic, obs: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(actions, log_probs)`` from :meth:`ActorCritic.act_packed`'s rows (int64 / float32 actions)."""
    with torch.no_grad():
        packed = model.act_packed(obs, **kwargs)
    actions = packed[:, :-1].float() if model.is_continuous else packed[:, 0].long()
    return actions, packed[:, -1]


def test_discrete_head_shapes_and_consistent_log_probs():
    model = ActorCritic(MLPTorso(5, (16,)), gym.spaces.Discrete(6))
    obs = torch.randn(9, 5)
    logits, value = model(obs)
    assert logits.shape == (9, 6) and value.shape == (9,)
    action, log_prob = sample(model, obs)
    assert action.shape == (9,) and log_prob.shape == (9,)
    eval_log_prob, entropy, eval_value = model.evaluate(obs, action)
    torch.testing.assert_close(eval_log_prob.double(), log_prob, atol=1e-6, rtol=0)
    torch.testing.assert_close(eval_value, value)
    assert entropy.shape == (9,)
    # policy head gain 0.01: the initial policy is close to uniform
    torch.testing.assert_close(entropy, torch.full((9,), math.log(6)), atol=1e-2, rtol=0)
    env_actions = model.env_actions(action)
    assert isinstance(env_actions, np.ndarray) and env_actions.dtype == np.int64


def test_gaussian_head_log_std_init_shapes_and_log_probs():
    model = ActorCritic(MLPTorso(5, (16,)), BOX_ACTIONS, log_std_init=-0.5)
    torch.testing.assert_close(model.log_std.detach(), torch.full((3,), -0.5))
    assert isinstance(model.log_std, nn.Parameter)
    obs = torch.randn(4, 5)
    action, log_prob = sample(model, obs)
    assert action.shape == (4, 3) and log_prob.shape == (4,)
    eval_log_prob, entropy, value = model.evaluate(obs, action)
    assert value.shape == (4,)
    torch.testing.assert_close(eval_log_prob.double(), log_prob, atol=1e-5, rtol=0)
    # entropy of a diagonal Gaussian summed over dims: D * (0.5 log(2πe) + log σ)
    expected_entropy = 3 * (0.5 * math.log(2 * math.pi * math.e) - 0.5)
    torch.testing.assert_close(entropy, torch.full((4,), expected_entropy))
    # the log-prob is of the unclipped sample
    mean, _ = model(obs)
    manual = torch.distributions.Normal(mean, math.exp(-0.5)).log_prob(action).sum(-1)
    torch.testing.assert_close(log_prob.float(), manual.detach(), atol=1e-5, rtol=0)


def test_gaussian_env_actions_are_clipped_to_bounds():
    model = ActorCritic(MLPTorso(5, (16,)), BOX_ACTIONS, log_std_init=2.0)  # σ ≈ 7.4: many out of bounds
    action, _ = sample(model, torch.randn(256, 5))
    env_actions = model.env_actions(action)
    assert env_actions.shape == (256, 3) and env_actions.dtype == np.float32
    assert (env_actions >= BOX_ACTIONS.low).all() and (env_actions <= BOX_ACTIONS.high).all()
    assert (action.numpy() > BOX_ACTIONS.high).any()  # the stored sample itself is not clipped
    inside = (action.numpy() >= BOX_ACTIONS.low) & (action.numpy() <= BOX_ACTIONS.high)
    np.testing.assert_array_equal(env_actions[inside], action.numpy()[inside])


@pytest.mark.parametrize("space", [gym.spaces.Discrete(4), BOX_ACTIONS], ids=["discrete", "box"])
def test_sampling_draws_only_from_the_given_generator(space):
    model = ActorCritic(MLPTorso(5, (16,)), space, log_std_init=-0.5)
    obs = torch.randn(64, 5)
    process_stream = torch.get_rng_state()
    first, second = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    actions, log_probs = sample(model, obs, generator=first)
    again, again_log_probs = sample(model, obs, generator=second)
    assert torch.equal(actions, again) and torch.equal(log_probs, again_log_probs)
    assert not torch.equal(sample(model, obs, generator=first)[0], actions)  # the generator moved on
    assert torch.equal(torch.get_rng_state(), process_stream)  # the process's generator was not drawn from
    state = first.get_state()
    mode, _ = sample(model, obs, deterministic=True, generator=first)
    assert torch.equal(first.get_state(), state)  # the mode draws nothing
    logits_or_mean, _ = model(obs)
    expected_mode = logits_or_mean.argmax(-1) if not model.is_continuous else logits_or_mean.detach()
    torch.testing.assert_close(mode, expected_mode)


def test_packed_discrete_sampling_follows_the_softmax_and_reports_its_log_probs():
    model = ActorCritic(MLPTorso(5, (16,)), gym.spaces.Discrete(4))
    with torch.no_grad():
        model.policy_head.weight.zero_()
        model.policy_head.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))  # the same policy in every state
    obs = torch.randn(40_000, 5)
    with torch.no_grad():
        packed = model.act_packed(obs)
    assert packed.shape == (40_000, 2) and packed.dtype == torch.float64
    actions = packed[:, 0].long()
    probs = torch.softmax(torch.tensor([0.0, 1.0, -1.0, 2.0]), -1).double()
    frequencies = torch.bincount(actions, minlength=4).double() / len(actions)
    # 40k draws: each frequency is within 4 standard errors (<= 0.01) of its probability
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(packed[:, 1], probs.log()[actions], atol=1e-6, rtol=0)
    with torch.no_grad():
        greedy = model.act_packed(obs[:3], deterministic=True)
    assert greedy[:, 0].tolist() == [3.0, 3.0, 3.0]


def test_packed_gaussian_sampling_matches_normal_log_probs():
    model = ActorCritic(MLPTorso(5, (16,)), BOX_ACTIONS, log_std_init=-0.5)
    obs = torch.randn(20_000, 5)
    with torch.no_grad():
        packed = model.act_packed(obs)
        mean, _ = model(obs)
    actions, log_prob = packed[:, :3].float(), packed[:, 3]
    manual = torch.distributions.Normal(mean, math.exp(-0.5)).log_prob(actions).sum(-1).double()
    torch.testing.assert_close(log_prob, manual, atol=1e-4, rtol=0)
    noise = (actions - mean) / math.exp(-0.5)
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1.0) < 0.02
    with torch.no_grad():
        torch.testing.assert_close(model.act_packed(obs[:4], deterministic=True)[:, :3].float(), mean[:4])


def test_packed_sampling_turns_nan_weights_into_nan_rows_without_raising():
    for space in (gym.spaces.Discrete(3), BOX_ACTIONS):
        model = ActorCritic(MLPTorso(5, (16,)), space)
        with torch.no_grad():
            model.policy_head.bias.fill_(float("nan"))
            packed = model.act_packed(torch.randn(8, 5))
        assert torch.isnan(packed).any(dim=1).all()


def test_orthogonal_init_gains():
    model = ActorCritic(MLPTorso(64, (64, 64)), gym.spaces.Discrete(4))
    first = model.torso.layers[1]
    weight = first.weight.detach()
    torch.testing.assert_close(weight @ weight.T, 2.0 * torch.eye(64), atol=1e-4, rtol=0)
    policy = model.policy_head.weight.detach()  # [4, 64]: orthonormal rows scaled by 0.01
    torch.testing.assert_close(policy @ policy.T, 1e-4 * torch.eye(4), atol=1e-8, rtol=0)
    value = model.value_head.weight.detach()  # [1, 64]: a unit row
    torch.testing.assert_close(value @ value.T, torch.ones(1, 1), atol=1e-5, rtol=0)
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, nn.Linear))
    conv = orthogonal_init(nn.Conv2d(4, 32, 8, stride=4), math.sqrt(2))
    flat = conv.weight.detach().reshape(32, -1)  # [32, 256]
    torch.testing.assert_close(flat @ flat.T, 2.0 * torch.eye(32), atol=1e-4, rtol=0)


def test_build_actor_critic_picks_torsos():
    auto_image = build_actor_critic(ATARI_OBS, gym.spaces.Discrete(6), AgentConfig())
    assert isinstance(auto_image.torso, NatureCNN)
    logits, value = auto_image(pixels(1))
    assert logits.shape == (1, 6) and value.shape == (1,)
    impala = build_actor_critic(ATARI_OBS, gym.spaces.Discrete(6), AgentConfig(network="impala"))
    assert isinstance(impala.torso, ImpalaResNet)
    mlp = build_actor_critic(VECTOR_OBS, BOX_ACTIONS, AgentConfig(hidden_sizes=(8, 8), log_std_init=-1.0))
    assert isinstance(mlp.torso, MLPTorso) and mlp.torso.output_dim == 8
    torch.testing.assert_close(mlp.log_std.detach(), torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="square image"):
        build_actor_critic(VECTOR_OBS, gym.spaces.Discrete(2), AgentConfig(network="nature"))
    with pytest.raises(ValueError, match="unsupported action space"):
        build_actor_critic(VECTOR_OBS, gym.spaces.MultiDiscrete([2, 2]), AgentConfig())


def test_running_mean_std_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (1, 7, 50, 3, 0, 20)]
    stats = RunningMeanStd(shape=(4,))
    for batch in batches:
        stats.update(batch)
    everything = np.concatenate(batches)
    assert stats.count == len(everything)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.var, everything.var(axis=0), rtol=1e-12)
    normalized = stats.normalize(everything)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalized.std(axis=0), 1.0, atol=1e-6)
    assert np.abs(stats.normalize(np.full((1, 4), 1e6), clip=10.0)).max() == 10.0
    np.testing.assert_allclose(stats.scale(everything) * stats.std, everything, rtol=1e-6)


def test_running_mean_std_normalises_with_the_statistics_of_the_moment():
    """The square root is kept between changes: every update and load must replace it."""
    stats = RunningMeanStd(shape=(2,))
    x = np.array([[1.0, -2.0]])
    np.testing.assert_allclose(stats.normalize(x), x, rtol=1e-6)  # mean 0, variance 1 before any data
    stats.update(np.array([[0.0, 0.0], [4.0, 2.0]]))
    np.testing.assert_allclose(stats.normalize(x), [[-0.5, -3.0]], rtol=1e-6)
    stats.update(np.array([[8.0, 4.0], [-4.0, -2.0]]))  # mean (2, 1), variance (20, 5)
    np.testing.assert_allclose(stats.normalize(x), (x - [2.0, 1.0]) / np.sqrt([20.0, 5.0]), rtol=1e-6)
    stats.load_state_dict({"mean": np.zeros(2), "var": np.full(2, 4.0), "count": 3.0})
    np.testing.assert_allclose(stats.normalize(x), x / 2.0, rtol=1e-6)
    np.testing.assert_allclose(stats.scale(x), x / 2.0, rtol=1e-6)


def test_running_mean_std_state_dict_round_trip_through_torch_save():
    stats = RunningMeanStd(shape=(2, 3))
    stats.update(np.random.default_rng(1).normal(size=(10, 2, 3)))
    buffer = io.BytesIO()
    torch.save(stats.state_dict(), buffer)
    buffer.seek(0)
    restored = RunningMeanStd(shape=(2, 3))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    np.testing.assert_array_equal(restored.mean, stats.mean)
    np.testing.assert_array_equal(restored.var, stats.var)
    assert restored.count == stats.count
    # the saved state is a copy, not a view of the live statistics
    state = stats.state_dict()
    stats.update(np.ones((5, 2, 3)))
    assert not np.array_equal(state["mean"].numpy(), stats.mean)
    with pytest.raises(ValueError, match="shape"):
        RunningMeanStd(shape=(3,)).load_state_dict(state)


def test_scalar_running_mean_std_round_trips():
    # Shape () is what return scaling uses; its statistics must stay arrays through updates.
    from pbt_rl.agents.normalizer import RunningMeanStd

    stats = RunningMeanStd(())
    stats.update(np.arange(5.0))
    stats.update(np.array([10.0, 20.0]))
    restored = RunningMeanStd(())
    restored.load_state_dict(stats.state_dict())
    data = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    assert float(restored.mean) == pytest.approx(data.mean())
    assert float(restored.var) == pytest.approx(data.var())
