"""Specification of the return targets in pbt_rl.agents.returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.agents.returns import lambda_returns, reverse_linear_scan
from references import naive_gae, naive_lambda_returns, random_unroll


def test_hand_computed_three_step_example():
    # gamma 0.5, no episode ends: G_2 = 1 + 0.5*8 = 5, G_1 = 2 + 0.5*5 = 4.5, G_0 = 3 + 0.5*4.5 = 5.25
    rewards = torch.tensor([[3.0], [2.0], [1.0]])
    values = torch.tensor([[100.0], [100.0], [100.0]])  # ignored by λ = 1 inside the unroll
    bootstrap = torch.tensor([8.0])
    discounts = torch.full((3, 1), 0.5)
    returns = lambda_returns(rewards, values, bootstrap, discounts, torch.zeros(3, 1, dtype=torch.bool), 1.0)
    assert returns[:, 0].tolist() == [5.25, 4.5, 5.0]


def test_termination_zeroes_the_bootstrap_and_later_rewards():
    rewards = torch.tensor([[1.0], [2.0], [4.0]])
    values = torch.tensor([[10.0], [20.0], [30.0]])
    bootstrap = torch.tensor([100.0])
    terminated = torch.tensor([[False], [True], [False]])
    discounts = 0.5 * (~terminated).float()
    returns = lambda_returns(rewards, values, bootstrap, discounts, None, 1.0)
    # step 2 starts a new episode: 4 + 0.5*100 = 54; step 1 ends its episode: exactly its reward
    assert returns[:, 0].tolist() == [1.0 + 0.5 * 2.0, 2.0, 54.0]


def test_truncation_bootstraps_from_the_next_value_without_later_rewards():
    rewards = torch.tensor([[1.0], [2.0], [0.0], [7.0]])  # step 2 is the auto-reset step (reward 0)
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])  # values[2] = V(real last obs)
    bootstrap = torch.tensor([100.0])
    truncated = torch.tensor([[False], [True], [False], [False]])
    discounts = torch.full((4, 1), 0.5)
    for lam in (0.0, 0.5, 1.0):
        returns = lambda_returns(rewards, values, bootstrap, discounts, truncated, lam)
        assert returns[1, 0].item() == 2.0 + 0.5 * 30.0  # nothing from steps 2, 3 or the bootstrap
    returns = lambda_returns(rewards, values, bootstrap, discounts, truncated, 1.0)
    assert returns[0, 0].item() == 1.0 + 0.5 * (2.0 + 0.5 * 30.0)
    # a NaN in the next episode cannot leak across the cut
    poisoned = lambda_returns(rewards, values, torch.tensor([float("nan")]), discounts, truncated, 1.0)
    assert torch.isfinite(poisoned[:2]).all()


@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.99])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_constant_value_known_rewards_analytic(gamma, lam):
    # SB3-style known answer: V ≡ 1 everywhere, reward 1 per step, one episode terminating at the
    # last step of the unroll. Then δ_t = 1 + γ - 1 = γ for t < T-1 and δ_{T-1} = 1 - 1 = 0, so
    # A_t = sum_{k=t}^{T-2} (γλ)^{k-t} γ.
    T = 6
    rewards = torch.ones(T, 1, dtype=torch.float64)
    values = torch.ones(T, 1, dtype=torch.float64)
    bootstrap = torch.ones(1, dtype=torch.float64)
    terminated = torch.zeros(T, 1, dtype=torch.bool)
    terminated[-1] = True
    discounts = gamma * (~terminated).double()
    advantages = (lambda_returns(rewards, values, bootstrap, discounts, None, lam) - values)[:, 0]
    expected = [sum((gamma * lam) ** (k - t) * gamma for k in range(t, T - 1)) for t in range(T)]
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,B", [(1, 1), (5, 3), (12, 4)])
@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_matches_forward_view_reference(T, B, lam):
    for seed in range(3):
        rewards, values, bootstrap, discounts, cut = random_unroll(T, B, seed)
        returns = lambda_returns(rewards, values, bootstrap, discounts, cut, lam)
        expected = naive_lambda_returns(rewards, values, bootstrap, discounts, cut, lam)
        np.testing.assert_allclose(returns.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_advantages_equal_generalised_advantage_estimates(lam):
    """``lambda_returns - values`` is GAE (Schulman et al. 2016), the TD-error form of the same sum."""
    for seed in range(3):
        rewards, values, bootstrap, discounts, cut = random_unroll(9, 5, seed=7 + seed)
        returns = lambda_returns(rewards, values, bootstrap, discounts, cut, lam)
        expected = naive_gae(rewards, values, bootstrap, discounts, cut, lam)
        np.testing.assert_allclose((returns - values).numpy(), expected, rtol=1e-10, atol=1e-10)


def test_no_gradient_flows_into_targets():
    values = torch.randn(4, 2, requires_grad=True)
    returns = lambda_returns(torch.randn(4, 2), values, torch.randn(2), torch.full((4, 2), 0.9), None, 0.9)
    assert not returns.requires_grad


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="bootstrap_value"):
        lambda_returns(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), None, 1.0)


@settings(max_examples=50, deadline=None)
@given(
    T=st.integers(1, 8),
    B=st.integers(1, 4),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_discounts_give_the_rewards(T, B, lam, seed):
    rewards, values, bootstrap, _, cut = random_unroll(T, B, seed)
    returns = lambda_returns(rewards, values, bootstrap, torch.zeros(T, B, dtype=torch.float64), cut, lam)
    assert torch.equal(returns, rewards)


def looped_scan(x, coefficients, final):
    """``y_t = x_t + a_t y_{t+1}`` one step at a time, carrying nothing where ``a_t == 0``."""
    out = torch.empty_like(x)
    following = final
    for t in reversed(range(x.shape[0])):
        carried = torch.where(coefficients[t] == 0, torch.zeros_like(following), coefficients[t] * following)
        out[t] = x[t] + carried
        following = out[t]
    return out


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 80), B=st.integers(1, 4), block=st.sampled_from([1, 3, 7, 32]),
       p_zero=st.sampled_from([0.0, 0.2, 0.6]), seed=st.integers(0, 2**16))
def test_reverse_linear_scan_matches_the_step_by_step_recursion(T, B, block, p_zero, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, generator=gen, dtype=torch.float64)
    coefficients = torch.rand(T, B, generator=gen, dtype=torch.float64) * 1.2  # some above 1
    coefficients[torch.rand(T, B, generator=gen) < p_zero] = 0.0
    final = torch.randn(B, generator=gen, dtype=torch.float64)
    out = reverse_linear_scan(x, coefficients, final, block=block)
    torch.testing.assert_close(out, looped_scan(x, coefficients, final), rtol=1e-12, atol=1e-12)


def test_reverse_linear_scan_carries_nothing_across_a_zero_coefficient():
    # Steps 3.. hold infinities (a diverged next episode); a_2 = 0 cuts them off steps 0..2.
    x = torch.tensor([[1.0], [2.0], [3.0], [float("inf")], [float("nan")]])
    coefficients = torch.tensor([[0.5], [0.5], [0.0], [0.5], [0.5]])
    out = reverse_linear_scan(x, coefficients, torch.tensor([float("inf")]), block=4)
    assert out[:3, 0].tolist() == [1.0 + 0.5 * (2.0 + 0.5 * 3.0), 2.0 + 0.5 * 3.0, 3.0]
    assert not torch.isfinite(out[3:]).any()
