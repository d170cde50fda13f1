"""V-trace off-policy value targets and policy-gradient advantages (Espeholt et al. 2018, IMPALA).

The n-step V-trace target of ``V(x_s)`` is the paper's eq. (1),

    v_s = V(x_s) + sum_{t=s}^{s+n-1} (prod_{i=s}^{t-1} d_i c_i) δ_t,
    δ_t = ρ_t (r_t + d_t V(x_{t+1}) - V(x_t)),

with ``ρ_t = min(ρ̄, π(a_t|x_t) / μ(a_t|x_t))`` and ``c_i = λ min(c̄, π(a_i|x_i) / μ(a_i|x_i))``;
``μ`` is the behaviour policy that acted, ``π`` the learner's current (target) policy. The
per-step discount ``d_t = gamma * (1 - terminated_t)`` replaces the paper's ``γ``. It is computed
from the paper's recursive form (solved in blocks by :func:`~pbt_rl.agents.returns.reverse_linear_scan`)

    v_s - V(x_s) = δ_s + d_s c_s (v_{s+1} - V(x_{s+1})),     v_T - V(x_T) = 0.

Truncated steps (``trace_cut``) keep their one-step TD error (bootstrapping from ``V(x_{t+1})``,
the real last observation of the cut episode) but ``c_t = 0`` there, so the trace does not run
into the auto-reset step and the next episode.

The policy-gradient advantage is ``min(ρ̄_pg, π/μ) (r_s + d_s q_{s+1} - V(x_s))`` where
``q_{s+1} = v_{s+1}`` inside an episode, ``V(x_{s+1})`` after a truncation, and the bootstrap
value after the last step of the unroll. The same advantage without the ``min(ρ̄_pg, π/μ)``
weight is returned too: a PPO-clipped loss (APPO) already weights it by its own ratio ``π/μ``.

All tensors are time-major ``[T, B]``; ``bootstrap_value`` is ``[B]``. Everything returned is a
target and carries no gradient. On-policy (``π = μ``) with ``ρ̄, c̄ >= 1`` the targets equal
:func:`pbt_rl.agents.returns.lambda_returns` with the same λ.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pbt_rl.agents.returns import check_unroll_shapes, next_step_values, reverse_linear_scan


class VTraceReturns(NamedTuple):
    """Outputs of :func:`vtrace` (all ``[T, B]``, detached)."""

    vs: Tensor
    """V-trace value targets ``v_s``."""
    pg_advantages: Tensor
    """Advantages for the policy-gradient term, already weighted by the clipped ``π/μ``."""
    log_rhos: Tensor
    """``log π(a_t|x_t) - log μ(a_t|x_t)``."""
    clipped_rhos: Tensor
    """``ρ_t = min(ρ̄, π/μ)`` used in the TD errors."""
    advantages: Tensor
    """``r_s + d_s q_{s+1} - V(x_s)``: ``pg_advantages`` without the ``min(ρ̄_pg, π/μ)`` weight,
    for a loss that corrects for the behaviour policy itself (PPO's clipped ratio, APPO)."""


def _clip_ratio(ratios: Tensor, clip: float | None) -> Tensor:
    """``min(clip, ratio)``; ``clip=None`` leaves the ratios unclipped (pure importance sampling)."""
    return ratios if clip is None else torch.clamp(ratios, max=clip)


@torch.no_grad()
def from_importance_weights(
    log_rhos: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    discounts: Tensor,
    trace_cut: Tensor | None = None,
    rho_clip: float | None = 1.0,
    c_clip: float | None = 1.0,
    pg_rho_clip: float | None = 1.0,
    td_lambda: float = 1.0,
) -> VTraceReturns:
    """V-trace targets from log importance weights ``log(π/μ)`` of the taken actions.

    Args:
        log_rhos: ``[T, B]`` ``log π(a_t|x_t) - log μ(a_t|x_t)``.
        rewards: ``[T, B]`` rewards.
        values: ``[T, B]`` ``V(x_t)`` under the learner's current critic.
        bootstrap_value: ``[B]`` ``V(x_T)``, value of the observation after the last step.
        discounts: ``[T, B]`` ``gamma * (1 - terminated)``.
        trace_cut: ``[T, B]`` bool, True at truncated steps (``c_t = 0``, ``q_{t+1} = V(x_{t+1})``);
            None = no truncations.
        rho_clip: ρ̄, clip of the importance weights in the TD errors (None = no clip).
        c_clip: c̄, clip of the trace coefficients (None = no clip).
        pg_rho_clip: clip of the importance weights in the policy-gradient advantage (None = no clip).
        td_lambda: λ multiplying the trace coefficients, in [0, 1].

    Returns:
        :class:`VTraceReturns`, every field ``[T, B]`` and detached.
    """
    check_unroll_shapes(rewards, values, bootstrap_value, discounts)
    if log_rhos.shape != rewards.shape:
        raise ValueError(f"log_rhos must be [T, B] = {tuple(rewards.shape)}, got {tuple(log_rhos.shape)}")
    log_rhos, rewards, values, bootstrap_value, discounts = (
        x.detach() for x in (log_rhos, rewards, values, bootstrap_value, discounts)
    )
    ratios = torch.exp(log_rhos)
    clipped_rhos = _clip_ratio(ratios, rho_clip)
    trace_coefficients = td_lambda * _clip_ratio(ratios, c_clip)
    if trace_cut is not None:
        if trace_cut.shape != rewards.shape:
            raise ValueError(f"trace_cut must be [T, B] = {tuple(rewards.shape)}, got {tuple(trace_cut.shape)}")
        trace_coefficients = torch.where(trace_cut.bool(), torch.zeros_like(trace_coefficients), trace_coefficients)

    next_values = next_step_values(values, bootstrap_value)
    td_errors = clipped_rhos * (rewards + discounts * next_values - values)

    # The recursion on the correction v_s - V(x_s), which is 0 after the last step. The scan
    # carries nothing across c_t = 0, so a non-finite correction from the next episode cannot
    # leak into a cut step.
    corrections = reverse_linear_scan(td_errors, discounts * trace_coefficients, torch.zeros_like(bootstrap_value))
    vs = values + corrections

    # q_{t+1}: v_{t+1} within the unroll, the bootstrap value after it, V(x_{t+1}) after a cut.
    next_targets = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
    if trace_cut is not None:
        next_targets = torch.where(trace_cut.bool(), next_values, next_targets)
    pg_rhos = _clip_ratio(ratios, pg_rho_clip)
    advantages = rewards + discounts * next_targets - values
    pg_advantages = pg_rhos * advantages
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages, log_rhos=log_rhos, clipped_rhos=clipped_rhos,
                         advantages=advantages)


def vtrace(
    behaviour_log_probs: Tensor,
    target_log_probs: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    discounts: Tensor,
    trace_cut: Tensor | None = None,
    rho_clip: float | None = 1.0,
    c_clip: float | None = 1.0,
    pg_rho_clip: float | None = 1.0,
    td_lambda: float = 1.0,
) -> VTraceReturns:
    """V-trace targets from the log-probabilities of the taken actions under both policies.

    Args:
        behaviour_log_probs: ``[T, B]`` ``log μ(a_t|x_t)`` recorded by the actor that acted.
        target_log_probs: ``[T, B]`` ``log π(a_t|x_t)`` under the learner's current policy
            (may carry gradient; it is detached here, the learner uses it again for its loss).
        Other arguments and the result as in :func:`from_importance_weights`.
    """
    if behaviour_log_probs.shape != target_log_probs.shape:
        raise ValueError(
            f"behaviour_log_probs {tuple(behaviour_log_probs.shape)} and target_log_probs "
            f"{tuple(target_log_probs.shape)} must both be [T, B]"
        )
    log_rhos = target_log_probs.detach() - behaviour_log_probs.detach()
    return from_importance_weights(
        log_rhos,
        rewards,
        values,
        bootstrap_value,
        discounts,
        trace_cut=trace_cut,
        rho_clip=rho_clip,
        c_clip=c_clip,
        pg_rho_clip=pg_rho_clip,
        td_lambda=td_lambda,
    )
