"""The actor-critic loss and its parts: pure functions on ``[T, B]`` tensors (no env, no learner).

``T`` env steps per env, ``B`` envs; ``mask`` is 1 at the valid steps (not auto-reset steps) and
0 elsewhere, and every mean is over the valid steps only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pbt_rl.config import AgentConfig


class ValidSteps:
    """The valid steps of a ``[T, B]`` batch (``mask`` 1) and how many there are (at least 1),
    found once for every mean a loss takes over them: a gradient step takes about seven, and on a
    GPU every operation is a kernel launch."""

    def __init__(self, mask: Tensor) -> None:
        """``mask``: ``[T, B]`` bool, or numbers (valid where > 0)."""
        self.valid = mask if mask.dtype == torch.bool else mask > 0
        self.count = self.valid.sum().clamp(min=1)

    def mean(self, values: Tensor) -> Tensor:
        """Mean of ``values`` over the valid steps (0 when there is none).

        Masked-out entries are selected away, not multiplied by 0, so that whatever they hold
        (an auto-reset step's meaningless numbers, even inf) cannot reach the result.
        """
        return torch.where(self.valid, values, 0.0).sum() / self.count


def valid_steps(mask: Tensor | ValidSteps) -> ValidSteps:
    """``mask`` as :class:`ValidSteps` (as it is when it already is one)."""
    return mask if isinstance(mask, ValidSteps) else ValidSteps(mask)


def masked_mean(values: Tensor, mask: Tensor | ValidSteps) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1 (0 when none is): :meth:`ValidSteps.mean`."""
    return valid_steps(mask).mean(values)


def normalized_advantages(advantages: Tensor, mask: Tensor | ValidSteps, eps: float = 1e-8) -> Tensor:
    """``(A - mean) / (std + eps)`` ``[T, B]``, mean and (population) std over the valid steps only."""
    steps = valid_steps(mask)
    centred = advantages - steps.mean(advantages)
    return centred / (steps.mean(centred**2).sqrt() + eps)


def policy_log_ratio(log_probs: Tensor, behaviour_log_probs: Tensor, mask: Tensor | ValidSteps) -> Tensor:
    """``log pi(a|x) - log mu(a|x)`` ``[T, B]``; 0 (ratio 1) at masked-out steps.

    An auto-reset step's action was ignored by the env, so its behaviour log-prob means nothing;
    ``torch.where`` keeps it (even -inf) out of the result and out of the gradient.
    """
    return torch.where(valid_steps(mask).valid, log_probs - behaviour_log_probs, 0.0)


@torch.no_grad()
def policy_ratio_stats(log_probs: Tensor, behaviour_log_probs: Tensor, mask: Tensor | ValidSteps,
                       ppo_clip: float) -> dict[str, Tensor]:
    """How far the policy moved from the one that acted, over the valid steps (0-d tensors).

    ``clip_fraction``: fraction of steps with ``|pi/mu - 1| > ppo_clip`` (0 when ``ppo_clip`` is
    0: nothing is clipped). ``approx_kl``: mean of ``(pi/mu - 1) - log(pi/mu)``, a non-negative,
    unbiased estimate of ``KL(mu || pi)`` from the actions ``mu`` took.
    """
    steps = valid_steps(mask)
    log_ratio = policy_log_ratio(log_probs, behaviour_log_probs, steps)
    ratio = torch.exp(log_ratio)
    if ppo_clip > 0:
        clip_fraction = steps.mean(((ratio - 1.0).abs() > ppo_clip).float())
    else:
        clip_fraction = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    return {"clip_fraction": clip_fraction, "approx_kl": steps.mean((ratio - 1.0) - log_ratio)}


def actor_critic_loss(
    log_probs: Tensor,
    entropy: Tensor,
    values: Tensor,
    advantages: Tensor,
    value_targets: Tensor,
    mask: Tensor | ValidSteps,
    agent: AgentConfig,
    *,
    behaviour_log_probs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``policy_loss + value_cost * value_loss - entropy_cost * entropy``, all ``[T, B]`` inputs.

    ``policy_loss = -mean(A * log pi(a|x))``, or with ``agent.ppo_clip = eps > 0`` PPO's clipped
    surrogate ``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with ``r = pi(a|x) / mu(a|x)``
    against ``behaviour_log_probs`` ``log mu(a|x)`` (required then; ``r = 1`` at masked-out steps).
    ``value_loss = mean((target - V(x))^2)`` and ``entropy = mean(H(pi(.|x)))``; means are over the
    valid (``mask`` = 1) steps only. ``advantages`` and ``value_targets`` are used as constants;
    with ``agent.normalize_advantages`` the advantages are first normalised over the valid steps
    (:func:`normalized_advantages`). Returns the loss and its parts (detached) for reporting.
    """
    steps = valid_steps(mask)
    advantages = advantages.detach()
    if agent.normalize_advantages:
        advantages = normalized_advantages(advantages, steps)
    if agent.ppo_clip > 0:
        if behaviour_log_probs is None:
            raise ValueError("actor_critic_loss: ppo_clip > 0 needs behaviour_log_probs (log mu of the acting policy)")
        ratio = torch.exp(policy_log_ratio(log_probs, behaviour_log_probs.detach(), steps))
        clipped_ratio = torch.clamp(ratio, 1.0 - agent.ppo_clip, 1.0 + agent.ppo_clip)
        policy_loss = -steps.mean(torch.min(ratio * advantages, clipped_ratio * advantages))
    else:
        policy_loss = -steps.mean(advantages * log_probs)
    value_loss = steps.mean((value_targets.detach() - values) ** 2)
    mean_entropy = steps.mean(entropy)
    total = policy_loss + agent.value_cost * value_loss - agent.entropy_cost * mean_entropy
    parts = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "entropy": mean_entropy.detach(),
        "total_loss": total.detach(),
    }
    return total, parts
