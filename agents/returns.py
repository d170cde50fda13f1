"""Bootstrapped return targets for on-policy actor-critic learners (pure torch functions).

All tensors are time-major: ``[T, B]`` is ``T`` env steps of an unroll for ``B`` envs, and
``bootstrap_value`` ``[B]`` is the critic's value of the observation *after* the last step.

Step semantics (see ``docs/design.md``, env contract):

- ``discounts[t] = gamma * (1 - terminated[t])``: a terminated step has no future.
- ``trace_cut[t]`` is True where step ``t`` was truncated (time limit). Its target still
  bootstraps from ``V(x_{t+1})`` (with next-step auto-reset, index ``t + 1`` holds the real last
  observation of the cut episode), but the recursion does not continue through ``t + 1``,
  because step ``t + 1`` is an auto-reset step that belongs to the next episode.

With these two rules, nothing from an auto-reset (``is_first``) step or a later episode leaks
into the targets of earlier steps; the learners mask the ``is_first`` steps out of the loss.

The λ-return used here is the recursive one (Sutton & Barto 2018, eq. 12.18 with a per-step
discount):

    G_t = r_t + d_t * ((1 - λ_t) * V(x_{t+1}) + λ_t * G_{t+1}),   G_T = V(x_T) = bootstrap_value,

with ``λ_t = 0`` where ``trace_cut[t]``. ``λ = 1`` gives the n-step return of A2C (every step
bootstraps from the value after the last step of the unroll, or from the end of its episode);
``λ = 0`` gives one-step TD targets. Targets carry no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_step_values(values: Tensor, bootstrap_value: Tensor) -> Tensor:
    """``V(x_{t+1})`` for every step: ``values`` shifted by one, ending with the bootstrap. [T, B]"""
    return torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)


def check_unroll_shapes(rewards: Tensor, values: Tensor, bootstrap_value: Tensor, discounts: Tensor) -> None:
    """Raise ValueError unless rewards, values, discounts are [T, B] and bootstrap_value is [B]."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [T, B], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape or discounts.shape != rewards.shape:
        raise ValueError(
            f"rewards, values and discounts must share the shape [T, B]; got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(discounts.shape)}"
        )
    if bootstrap_value.shape != rewards.shape[1:]:
        raise ValueError(f"bootstrap_value must be [B] = {tuple(rewards.shape[1:])}, got {tuple(bootstrap_value.shape)}")


def _per_step_lambda(td_lambda: float | Tensor, trace_cut: Tensor | None, like: Tensor) -> Tensor:
    """λ_t as a [T, B] tensor: ``td_lambda`` everywhere except 0 where the trace is cut."""
    lambdas = torch.as_tensor(td_lambda, dtype=like.dtype, device=like.device).expand_as(like)
    if trace_cut is None:
        return lambdas
    if trace_cut.shape != like.shape:
        raise ValueError(f"trace_cut must be [T, B] = {tuple(like.shape)}, got {tuple(trace_cut.shape)}")
    return torch.where(trace_cut.bool(), torch.zeros_like(lambdas), lambdas)


@torch.no_grad()
def lambda_returns(
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    discounts: Tensor,
    trace_cut: Tensor | None = None,
    td_lambda: float | Tensor = 1.0,
) -> Tensor:
    """λ-returns ``G_t`` for every step of an unroll (no gradient).

    Args:
        rewards: ``[T, B]`` reward of each step (as learned from, e.g. clipped).
        values: ``[T, B]`` critic value ``V(x_t)`` of the observation each action was taken on.
        bootstrap_value: ``[B]`` ``V(x_T)``, value of the observation after the last step.
        discounts: ``[T, B]`` ``gamma * (1 - terminated)``.
        trace_cut: ``[T, B]`` bool, True where the step was truncated: the target is
            ``r_t + d_t * V(x_{t+1})`` with no recursion into the next episode. None = no cuts.
        td_lambda: λ in [0, 1], a float or a tensor broadcastable to ``[T, B]``.

    Returns:
        ``[T, B]`` targets, same dtype as ``rewards``. Advantages are ``returns - values``.
    """
    check_unroll_shapes(rewards, values, bootstrap_value, discounts)
    rewards, values, bootstrap_value, discounts = (
        x.detach() for x in (rewards, values, bootstrap_value, discounts)
    )
    next_values = next_step_values(values, bootstrap_value)
    lambdas = _per_step_lambda(td_lambda, trace_cut, rewards)
    returns = torch.empty_like(rewards)
    following_return = bootstrap_value  # G_{t+1}; G_T is the bootstrap value
    for t in reversed(range(rewards.shape[0])):
        # torch.where (not a multiplication by λ_t = 0) so that a non-finite G_{t+1} from the
        # next episode cannot turn the cut step's target into NaN.
        continuation = torch.where(
            lambdas[t] == 0,
            next_values[t],
            (1.0 - lambdas[t]) * next_values[t] + lambdas[t] * following_return,
        )
        returns[t] = rewards[t] + discounts[t] * continuation
        following_return = returns[t]
    return returns


def n_step_returns(
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    discounts: Tensor,
    trace_cut: Tensor | None = None,
) -> Tensor:
    """n-step bootstrapped returns within the unroll: :func:`lambda_returns` with λ = 1. [T, B]

    Step ``t`` sums the discounted rewards up to the end of the unroll or of its episode and
    bootstraps from ``bootstrap_value`` (or, at a truncation, from ``V(x_{t+1})``).
    """
    return lambda_returns(rewards, values, bootstrap_value, discounts, trace_cut, 1.0)


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    discounts: Tensor,
    trace_cut: Tensor | None = None,
    td_lambda: float | Tensor = 1.0,
) -> Tensor:
    """Generalised advantage estimates (Schulman et al. 2016), no gradient. [T, B]

    ``A_t = δ_t + d_t * λ_t * A_{t+1}`` with ``δ_t = r_t + d_t V(x_{t+1}) - V(x_t)``,
    ``A_T = 0`` and ``λ_t = 0`` where ``trace_cut``. Written from the TD-error form on purpose:
    it equals ``lambda_returns(...) - values`` exactly, which the tests check, so the two serve
    as references for each other. Arguments as in :func:`lambda_returns`.
    """
    check_unroll_shapes(rewards, values, bootstrap_value, discounts)
    rewards, values, bootstrap_value, discounts = (
        x.detach() for x in (rewards, values, bootstrap_value, discounts)
    )
    td_errors = rewards + discounts * next_step_values(values, bootstrap_value) - values
    lambdas = _per_step_lambda(td_lambda, trace_cut, rewards)
    advantages = torch.empty_like(rewards)
    following_advantage = torch.zeros_like(bootstrap_value)
    for t in reversed(range(rewards.shape[0])):
        carried = torch.where(
            lambdas[t] == 0, torch.zeros_like(following_advantage), discounts[t] * lambdas[t] * following_advantage
        )
        advantages[t] = td_errors[t] + carried
        following_advantage = advantages[t]
    return advantages
