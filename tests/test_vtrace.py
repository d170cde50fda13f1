"""Specification of V-trace (pbt_rl.agents.vtrace) against the IMPALA paper's eq. (1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pbt_rl.agents.returns import lambda_returns
from pbt_rl.agents.vtrace import VTraceReturns, from_importance_weights, vtrace
from references import naive_vtrace, random_off_policy_unroll


@pytest.mark.parametrize("T,B", [(1, 1), (4, 2), (10, 3)])
@pytest.mark.parametrize(
    "rho_clip,c_clip,pg_rho_clip,lam",
    [(1.0, 1.0, 1.0, 1.0), (0.5, 0.8, 2.0, 0.9), (3.0, 1.5, 0.7, 0.5), (1.2, 0.3, 1.0, 0.0)],
)
def test_matches_naive_double_sum(T, B, rho_clip, c_clip, pg_rho_clip, lam):
    for seed in range(3):
        behaviour, target, rewards, values, bootstrap, discounts, cut = random_off_policy_unroll(T, B, seed)
        out = vtrace(behaviour, target, rewards, values, bootstrap, discounts, cut, rho_clip, c_clip, pg_rho_clip, lam)
        log_rhos = target - behaviour
        vs, pg, advantages = naive_vtrace(log_rhos, rewards, values, bootstrap, discounts, cut, rho_clip, c_clip,
                                          pg_rho_clip, lam)
        np.testing.assert_allclose(out.vs.numpy(), vs, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.pg_advantages.numpy(), pg, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.advantages.numpy(), advantages, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.log_rhos, log_rhos)
        torch.testing.assert_close(out.clipped_rhos, torch.clamp(torch.exp(log_rhos), max=rho_clip))


def test_random_clips_and_float32_inputs_match_reference():
    rng = np.random.default_rng(0)
    for seed in range(5):
        rho_clip, c_clip, pg_rho_clip = rng.uniform(0.2, 3.0, size=3)
        lam = float(rng.uniform(0.0, 1.0))
        behaviour, target, rewards, values, bootstrap, discounts, cut = random_off_policy_unroll(7, 3, seed + 100)
        out = vtrace(*(x.float() for x in (behaviour, target, rewards, values, bootstrap, discounts)), cut,
                     float(rho_clip), float(c_clip), float(pg_rho_clip), lam)
        vs, pg, _ = naive_vtrace(target - behaviour, rewards, values, bootstrap, discounts, cut,
                                 rho_clip, c_clip, pg_rho_clip, lam)
        assert out.vs.dtype == torch.float32
        np.testing.assert_allclose(out.vs.numpy(), vs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.pg_advantages.numpy(), pg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [1.0, 2.5])
def test_on_policy_equals_lambda_returns(lam, clip):
    _, log_probs, rewards, values, bootstrap, discounts, cut = random_off_policy_unroll(8, 4, seed=3)
    out = vtrace(log_probs, log_probs, rewards, values, bootstrap, discounts, cut, clip, clip, clip, lam)
    expected = lambda_returns(rewards, values, bootstrap, discounts, cut, lam)
    torch.testing.assert_close(out.vs, expected, rtol=1e-12, atol=1e-12)
    # on-policy with λ = 1 the pg advantage is the n-step advantage
    if lam == 1.0:
        torch.testing.assert_close(out.pg_advantages, expected - values, rtol=1e-12, atol=1e-12)


def test_truncation_cuts_the_trace_but_keeps_the_next_value():
    T, B = 4, 1
    log_rhos = torch.zeros(T, B)
    rewards = torch.tensor([[1.0], [2.0], [0.0], [7.0]])
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    bootstrap = torch.tensor([float("nan")])  # the next episode must not reach steps 0 and 1
    discounts = torch.full((T, B), 0.5)
    cut = torch.tensor([[False], [True], [False], [False]])
    out = from_importance_weights(log_rhos, rewards, values, bootstrap, discounts, cut)
    assert out.vs[1, 0].item() == 2.0 + 0.5 * 30.0
    assert out.vs[0, 0].item() == 1.0 + 0.5 * (2.0 + 0.5 * 30.0)
    assert out.pg_advantages[1, 0].item() == 2.0 + 0.5 * 30.0 - 20.0
    assert torch.isfinite(out.vs[:2]).all() and torch.isfinite(out.pg_advantages[:2]).all()


def test_termination_zeroes_the_bootstrap():
    out = from_importance_weights(
        torch.zeros(2, 1), torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [6.0]]), torch.tensor([99.0]),
        torch.tensor([[0.9], [0.0]]),
    )
    assert out.vs[:, 0].tolist() == pytest.approx([1.0 + 0.9 * 3.0, 3.0])


def test_outputs_are_detached_named_tuple():
    behaviour = torch.randn(3, 2)
    target = torch.randn(3, 2, requires_grad=True)
    values = torch.randn(3, 2, requires_grad=True)
    out = vtrace(behaviour, target, torch.randn(3, 2), values, torch.randn(2), torch.full((3, 2), 0.9))
    assert isinstance(out, VTraceReturns)
    assert all(not field.requires_grad for field in out)
    assert all(field.shape == (3, 2) for field in out)
