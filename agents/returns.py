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


SCAN_BLOCK = {"cuda": 32, "cpu": 8}
"""Steps per block of :func:`reverse_linear_scan` by device type: a block costs ~10 kernel
launches and ``block**2 * B`` work, so the GPU (launch-bound) takes long blocks and the CPU
short ones (measured on 2 cores: block 8 is as fast as the step loop or faster for T = 5..128,
B = 32..256; block 32 was up to 4x slower at B = 256)."""


def reverse_linear_scan(x: Tensor, coefficients: Tensor, final: Tensor, block: int | None = None) -> Tensor:
    """``y_t = x_t + a_t * y_{t+1}`` for ``t = T-1 .. 0`` with ``y_T = final``. ``[T, B]``

    Every return and trace recursion of the learners has this form. A step with ``a_t == 0``
    carries nothing from ``t + 1`` on, not even a non-finite value (the next episode's after a
    cut). Rather than ``T`` sequential steps of several small device kernels each, every block
    of up to ``block`` steps is solved in closed form, ``y_s = sum_t (prod_{i=s}^{t-1} a_i) x_t``
    plus the carried-in ``y`` of the following block: about ten kernels per block whatever
    its length.

    Args:
        x: ``[T, B]`` per-step terms.
        coefficients: ``[T, B]`` ``a_t``.
        final: ``[B]`` ``y_T``, the value carried in after the last step.
        block: steps solved at once; None = :data:`SCAN_BLOCK` for the tensors' device.
    """
    block = block or SCAN_BLOCK.get(x.device.type, SCAN_BLOCK["cpu"])
    out = torch.empty_like(x)
    following = final
    for end in range(x.shape[0], 0, -block):
        start = max(0, end - block)
        out[start:end] = _closed_form_block(x[start:end], coefficients[start:end], following)
        following = out[start]
    return out


def _closed_form_block(x: Tensor, coefficients: Tensor, final: Tensor) -> Tensor:
    """:func:`reverse_linear_scan` of one block, all at once (``[n, B]``)."""
    n = x.shape[0]
    steps = torch.arange(n + 1, device=x.device)
    extra = (1,) * (x.dim() - 1)
    # products[s, i] = prod_{j=s}^{i} a_j for i >= s (1 for i < s)
    later = (steps[None, :n] >= steps[:n, None]).view(n, n, *extra)
    products = torch.cumprod(torch.where(later, coefficients.unsqueeze(0), torch.ones_like(coefficients)), dim=1)
    # weights[s, t] = prod_{i=s}^{t-1} a_i for t >= s, over the n steps and then the carried-in value
    weights = torch.cat([torch.ones_like(products[:, :1]), products], dim=1)
    reaches = (steps[None, :] >= steps[:n, None]).view(n, n + 1, *extra) & (weights != 0)
    terms = torch.cat([x, final.unsqueeze(0)], dim=0).unsqueeze(0)
    return torch.where(reaches, weights * terms, torch.zeros_like(weights)).sum(dim=1)


def _per_step_lambda(td_lambda: float | Tensor, trace_cut: Tensor | None, like: Tensor) -> Tensor:
    """λ_t as a [T, B] tensor: ``td_lambda`` everywhere except 0 where the trace is cut."""
    if isinstance(td_lambda, Tensor):
        lambdas = td_lambda.to(dtype=like.dtype, device=like.device).expand_as(like)
    else:  # a fill on the device: a number copied from the host would make the host wait for the GPU
        lambdas = torch.full_like(like, float(td_lambda))
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
    # G_t = (r_t + d_t (1 - λ_t) V(x_{t+1})) + d_t λ_t G_{t+1}; the scan carries nothing across a
    # cut (λ_t = 0), so a non-finite G_{t+1} from the next episode cannot reach the cut step.
    one_step = rewards + discounts * (1.0 - lambdas) * next_values
    return reverse_linear_scan(one_step, discounts * lambdas, bootstrap_value)
