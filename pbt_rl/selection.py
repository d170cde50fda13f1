"""Who copies whom: PBT's exploit strategies and the statistics they use.

:class:`Selection` is a part of :class:`pbt_rl.scheduler.Scheduler` (its base class): its
methods read the scheduler's ``config``, its generator ``_rng``, ``donor_problem`` and
``_exploit``. The donor rules, fair comparison and sync-mode rules are in the scheduler's
docstring; the strategies are these.

Exploit strategies (``pbt.exploit``)
------------------------------------
Every strategy copies only an eligible donor (see *Donors*) that is *strictly* better than the
member by the margin
``max(pbt.margin_absolute, pbt.margin_relative * |member score|)`` (0 by default, so equal scores
never copy each other). A member never copies itself.

- ``truncation``: rank the compared members (the member itself plus the scored others) by score.
  The bottom ``k`` copy a member of the top ``k``, chosen uniformly among the top members that are
  eligible donors and beat the member by the margin, with ``k = truncation_count(n, pbt.truncation_fraction)
  = max(1, floor(n * fraction))``. So n=10 at 0.2 gives k=2, and n=2, 3, 4 still give one
  exploiter and one donor; since the fraction is at most 0.5, the bottom and top never overlap.
- ``tournament``: binary tournament. Pick one other compared member uniformly; copy it if it is
  better (by the margin).
- ``ttest``: as in the paper's T-test selection, pick one other compared member uniformly (not the
  best); copy it only if Welch's t-test (``scipy.stats.ttest_ind(equal_var=False,
  alternative="greater")``) on the last ``pbt.fitness_window`` returns of each says the donor's
  mean is higher with p < ``pbt.ttest_alpha``, and the donor's mean beats the member's by the
  margin. Both members need at least ``max(2, pbt.min_episodes)`` current returns and both samples
  at least two (so ``fitness_window: 1`` never copies); a diverged member (a non-finite return in
  its sample) copies an eligible opponent without a test. Two constant samples count as
  significant exactly when the donor's mean is higher. The samples are the members' current
  returns (a :class:`MemberState` carries no older ones), so only the *choice* of opponent is
  restricted to members scored at ``<= s`` env steps.

``Exploit.member_score`` / ``donor_score`` are the scores the decision compared: the member's
current fitness, and for the donor (truncation, tournament) its fair score (async: its recorded
score at ``<= s + slack``, which may differ from its current fitness; sync: its current fitness),
or (t-test) the mean of its sample, i.e. its current fitness.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import scipy.stats

from pbt_rl.decisions import Continue, Decision, MemberState


def truncation_count(population_size: int, fraction: float) -> int:
    """Members in the bottom (and in the top) of a truncation ranking: max(1, floor(n * fraction)).

    0 for fewer than two members. The small epsilon keeps 0.29 * 100 at 29 despite rounding.
    """
    if population_size < 2:
        return 0
    return max(1, math.floor(population_size * fraction + 1e-9))


def _rank_key(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


class Selection:
    """Truncation, tournament and t-test decisions of one member (module docstring)."""

    def _worst_first(self, scores: Mapping[int, float]) -> list[int]:
        """Member ids from worst to best; non-finite scores first; ties in a random order."""
        ids = sorted(scores)
        tie_break = self._rng.permutation(len(ids))
        keys = np.array([_rank_key(scores[i]) for i in ids], dtype=np.float64)
        return [ids[i] for i in np.lexsort((tie_break, keys))]

    def _beats(self, donor_score: float, member_score: float) -> bool:
        """Donor strictly better than the member by the configured margin."""
        if not math.isfinite(donor_score):
            return False
        if not math.isfinite(member_score):
            return True
        margin = max(self.config.margin_absolute, self.config.margin_relative * abs(member_score))
        return donor_score > member_score + margin

    def _truncation_exploit(
        self,
        member: MemberState,
        own: float,
        top: list[int],
        scores: Mapping[int, float],
        population: Mapping[int, MemberState],
    ) -> Decision:
        eligible = [
            d for d in sorted(top)
            if d != member.member_id and self.donor_problem(population[d]) is None and self._beats(scores[d], own)
        ]
        if not eligible:
            return Continue(
                member.member_id,
                member.env_steps,
                f"bottom member, but no top member {sorted(top)} is an eligible donor better by the margin",
            )
        donor_id = eligible[int(self._rng.integers(len(eligible)))]
        return self._exploit(member, own, population[donor_id], scores[donor_id])

    def _duel(self, member: MemberState, own: float, opponent: MemberState, opponent_score: float) -> Decision:
        """Tournament or t-test between the member and one opponent."""
        problem = self.donor_problem(opponent)
        if problem is not None:
            return Continue(member.member_id, member.env_steps, f"opponent {opponent.member_id} {problem}")
        if self.config.exploit == "tournament":
            if self._beats(opponent_score, own):
                return self._exploit(member, own, opponent, opponent_score)
            return Continue(member.member_id, member.env_steps, f"opponent {opponent.member_id} is not better by the margin")

        window = self.config.fitness_window
        needed = max(2, self.config.min_episodes)
        mine = np.asarray(member.episode_returns[-window:], dtype=np.float64)
        theirs = np.asarray(opponent.episode_returns[-window:], dtype=np.float64)
        # Eligible, so the opponent's sample (the window of its finite fitness) is finite.
        if len(opponent.episode_returns) < needed or len(theirs) < 2:
            return Continue(member.member_id, member.env_steps, f"opponent {opponent.member_id} has fewer than {needed} returns for the t-test")
        donor_mean = float(theirs.mean())
        if not np.all(np.isfinite(mine)):  # diverged: anything finite is better
            return self._exploit(member, own, opponent, donor_mean)
        if len(member.episode_returns) < needed or len(mine) < 2:
            return Continue(member.member_id, member.env_steps, f"fewer than {needed} returns for the t-test")
        p_value = welch_p_value_greater(theirs, mine)
        if p_value < self.config.ttest_alpha and self._beats(donor_mean, float(mine.mean())):
            return self._exploit(member, own, opponent, donor_mean)
        return Continue(
            member.member_id,
            member.env_steps,
            f"opponent {opponent.member_id} not significantly better (p={p_value:.3g}, alpha={self.config.ttest_alpha})",
        )


def welch_p_value_greater(donor: np.ndarray, member: np.ndarray) -> float:
    """One-sided p-value of Welch's t-test for mean(donor) > mean(member).

    Two constant samples have no variance to test: p = 0 if the donor's mean is higher, else 1.
    """
    if np.var(donor) == 0.0 and np.var(member) == 0.0:
        return 0.0 if donor.mean() > member.mean() else 1.0
    return float(scipy.stats.ttest_ind(donor, member, equal_var=False, alternative="greater").pvalue)
