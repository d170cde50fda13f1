"""Pure Population Based Training: when is a member ready, whom does it copy, how does it explore.

No I/O, no torch. All randomness comes from one ``numpy.random.Generator`` owned by the
:class:`Scheduler` and seeded at construction; ``state_dict`` / ``load_state_dict`` save and
restore its bit-generator state, so a resumed run continues the same decision sequence.

Contract with the runtime
-------------------------
The runtime keeps one :class:`MemberState` per member (a frozen snapshot it rebuilds as members
report) and, for each member:

1. asks :meth:`Scheduler.is_ready` after each progress report;
2. when ready, appends ``(env_steps, Scheduler.fitness(member))`` to the member's ``score_history``
   and sets ``last_ready_steps = env_steps``;
3. asks :meth:`Scheduler.decide` (``pbt.mode: async``) or, once every member is ready,
   :meth:`Scheduler.decide_generation` (``pbt.mode: sync``), and applies the decision:
   on :class:`Exploit` the member loads ``donor_checkpoint``, *then* sets ``new_hyperparameters``
   and resets its ``episode_returns`` to empty. Its env-step counter continues from its own
   ``env_steps``. Until it saves its own next checkpoint, its ``checkpoint_id`` is the donor
   checkpoint it loaded and its ``checkpoint_env_steps`` that checkpoint's ``donor_env_steps``;
4. when a member fails repeatedly or diverges, asks :meth:`Scheduler.reseed` for a donor to
   restart from (see *Reseeding*).

The runtime sets ``checkpoint_env_steps`` together with ``checkpoint_id``: the env steps at which
the weights in that checkpoint were saved (by whichever member saved them).

Units: ``env_steps`` are a member's env steps summed over its envs (see docs/design.md).

Fitness
-------
The mean of the last ``pbt.fitness_window`` finished-episode returns since the member's last
exploit; NaN while it has fewer than ``pbt.min_episodes``. A member with too few episodes always
gets :class:`Continue` (with the reason). A non-finite fitness with enough episodes (a diverged
member reporting NaN returns) ranks worst: such a member exploits when anyone is better.

Donors
------
A member is *eligible as a donor* only if, at the moment of the decision,

- it is currently scored: at least ``pbt.min_episodes`` returns in its current
  ``episode_returns`` (a member that just exploited has none, whatever its ``score_history``);
- its current fitness (:meth:`Scheduler.fitness`) is finite (a member whose latest returns are
  NaN has diverged: the weights it would hand over are the ones that produced them);
- it has a ``checkpoint_id`` *and* a ``checkpoint_env_steps`` (a checkpoint whose env steps are
  unknown counts as no checkpoint).

This holds for every strategy, in :meth:`Scheduler.decide`, :meth:`Scheduler.decide_generation`
and :meth:`Scheduler.reseed`. It restricts who may be *copied*, not who is *ranked*: an ineligible
member still takes its place in a ranking or a draw (so the async fair comparison below is
unchanged), and a decision that lands on it continues, saying why.
:meth:`Scheduler.donor_problem` returns that reason (None for an eligible donor).
``Exploit.donor_env_steps`` is the donor's ``checkpoint_env_steps``: the env steps of the weights
actually copied, which after an exploit may be another member's checkpoint.

Fair comparison (async mode)
----------------------------
Members progress at different speeds. When member m at ``s`` env steps decides, its own score is
its current fitness, and each other member's score is the latest entry of that member's
``score_history`` recorded at env steps ``<= s + slack``, where ``slack`` (``comparison_slack``,
a tenth of ``pbt.ready_after_steps``) absorbs the few env steps by which a learner overshoots its
ready point (it stops at the end of an unroll), so that members reaching the same ready point a few
steps apart still see each other: it is compared with others as they were when
they had trained no longer than m has. Members without such an entry are not compared with at
all (neither ranked nor donors). The donor checkpoint is still the donor's latest one
(``checkpoint_id``, ``donor_env_steps = donor.checkpoint_env_steps``): m copies the donor as it
is now, which is why the donor must be eligible *now* (see *Donors*), not only at its recorded
score.

In sync mode all members sit at the same generation boundary, so every member decides against
one snapshot: everyone's current fitness (env steps of a generation differ only by the last
unroll's overshoot, which must not exclude anyone).

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

Reseeding (:meth:`Scheduler.reseed`)
------------------------------------
A member that failed repeatedly or diverged restarts from someone else's weights: the best other
member by *current* fitness among those eligible as donors (see *Donors*) and not in
``excluded`` (the runtime passes abandoned members), ties broken by the generator as in a
ranking. No margin and no fair comparison apply (the member's own weights are what failed): the
donor need not be better than the member. The new hyperparameters
come from the same explore step as an exploit (``pbt.explore``, ``pbt.resample_probability``, the
scheduler's generator). The returned :class:`Exploit` has ``member_score`` = the member's current
fitness (NaN when unscored), ``env_steps`` = the member's ``env_steps`` and ``donor_score`` = the
donor's current fitness; ``None`` when no member is eligible (then nothing is drawn).

Ties
----
Ranking breaks ties (and orders non-finite scores among themselves) by a random permutation
drawn from the scheduler's generator: reproducible for a seed, and no member id is favoured.
Since copying needs a strictly better donor, ties only decide who sits at a truncation boundary
(and, in :meth:`Scheduler.reseed`, which of equally fit donors is copied).

Sync mode (``decide_generation``)
---------------------------------
Donors never exploit in the same generation. Truncation gets this from disjoint bottom and top
sets. Tournament and t-test go through the members from worst to best; a member already chosen
as some member's donor continues, and members that already exploit this generation are not
offered as opponents.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import numpy as np
import scipy.stats

from pbt_rl.config import PBTConfig
from pbt_rl.search_space import SearchSpace, Value

STATE_FORMAT = 1


@dataclass(frozen=True)
class MemberState:
    """What the scheduler knows about one member at one moment.

    episode_returns: finished-episode returns (true game score) since the member's last exploit,
        oldest first; the runtime empties it after an exploit.
    score_history: (env_steps, fitness) at each of this member's ready points, in order.
    hyperparameters: the member's current values (at least every search-space name).
    checkpoint_id: the member's latest checkpoint (what a copier loads); None before the first.
        After an exploit, the donor checkpoint it loaded until it saves its own next one.
    checkpoint_env_steps: the env steps at which the weights in ``checkpoint_id`` were saved (the
        donor's, after an exploit); None when unknown, and then the member is never a donor.
    """

    member_id: int
    env_steps: int
    last_ready_steps: int
    episode_returns: tuple[float, ...]
    score_history: tuple[tuple[int, float], ...]
    hyperparameters: Mapping[str, Value]
    checkpoint_id: str | None
    checkpoint_env_steps: int | None = None


def _json_value(value: Any) -> Any:
    """Plain JSON value: numpy scalars unwrapped, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Continue:
    """The member keeps training with its own weights and hyperparameters."""

    member_id: int
    env_steps: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "continue", **{f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}}


@dataclass(frozen=True)
class Exploit:
    """The member loads ``donor_checkpoint``, then sets ``new_hyperparameters``.

    new_hyperparameters: the donor's hyperparameters after exploration (search-space names
        explored, every other key copied from the donor). operations: name -> what explore did.
    donor_env_steps: the env steps of the copied weights (the donor's ``checkpoint_env_steps``).
    member_score / donor_score: the scores the decision compared (NaN member score = diverged or,
        for a reseed, unscored); see the module docstring.
    """

    member_id: int
    env_steps: int
    donor_id: int
    donor_checkpoint: str
    donor_env_steps: int
    old_hyperparameters: dict[str, Value]
    new_hyperparameters: dict[str, Value]
    operations: dict[str, str]
    member_score: float
    donor_score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite scores become None)."""
        return {"decision": "exploit", **{f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}}


Decision = Continue | Exploit


def truncation_count(population_size: int, fraction: float) -> int:
    """Members in the bottom (and in the top) of a truncation ranking: max(1, floor(n * fraction)).

    0 for fewer than two members. The small epsilon keeps 0.29 * 100 at 29 despite rounding.
    """
    if population_size < 2:
        return 0
    return max(1, math.floor(population_size * fraction + 1e-9))


def _rank_key(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


class Scheduler:
    """PBT decisions for one run (see the module docstring)."""

    def __init__(self, pbt_cfg: PBTConfig, seed: int):
        self.config = pbt_cfg
        self.search_space = SearchSpace.from_config(pbt_cfg)
        self._rng = np.random.default_rng(seed)
        # Env steps by which another member's score may be "newer" and still count as a peer's.
        self.comparison_slack = pbt_cfg.ready_after_steps // 10

    # ------------------------------------------------------------------ population start

    def initial_hyperparameters(self, base: Mapping[str, Value], population_size: int) -> list[dict[str, Value]]:
        """One dict per member: ``base`` (the agent config's values) overlaid with a sample of
        the search space (``init`` where a parameter sets it)."""
        return [{**base, **self.search_space.sample(self._rng)} for _ in range(population_size)]

    # ------------------------------------------------------------------ scoring and readiness

    def fitness(self, member: MemberState) -> float:
        """Mean of the last ``fitness_window`` returns; NaN with fewer than ``min_episodes``."""
        returns = member.episode_returns
        if len(returns) < self.config.min_episodes:
            return math.nan
        return float(np.mean(np.asarray(returns[-self.config.fitness_window :], dtype=np.float64)))

    def is_ready(self, member: MemberState) -> bool:
        """Past burn-in, ``ready_after_steps`` since the last ready point, and scoreable."""
        cfg = self.config
        return (
            member.env_steps >= cfg.burn_in_steps
            and member.env_steps - member.last_ready_steps >= cfg.ready_after_steps
            and len(member.episode_returns) >= cfg.min_episodes
        )

    @staticmethod
    def score_at(member: MemberState, env_steps: int) -> float | None:
        """The member's latest recorded score at ``<= env_steps``; None if it has none."""
        best: tuple[int, float] | None = None
        for steps, score in member.score_history:
            if steps <= env_steps and (best is None or steps >= best[0]):
                best = (steps, float(score))
        return None if best is None else best[1]

    def donor_problem(self, member: MemberState) -> str | None:
        """Why the member may not be copied now, or None if it is an eligible donor (module docstring)."""
        if member.checkpoint_id is None:
            return "has no checkpoint"
        if member.checkpoint_env_steps is None:
            return "has a checkpoint without checkpoint_env_steps"
        episodes = len(member.episode_returns)
        if episodes < self.config.min_episodes:
            return f"is not scored now: {episodes} finished episodes < pbt.min_episodes={self.config.min_episodes}"
        if not math.isfinite(self.fitness(member)):
            return "has a non-finite current fitness (diverged)"
        return None

    # ------------------------------------------------------------------ decisions

    def decide(self, member_id: int, population: Mapping[int, MemberState]) -> Decision:
        """Async mode: the ready member compares itself with the others' fair scores."""
        member = population[member_id]
        early = self._early_continue(member, population)
        if early is not None:
            return early
        own = self.fitness(member)
        others: dict[int, float] = {}
        for other_id in sorted(population):
            if other_id != member_id:
                score = self.score_at(population[other_id], member.env_steps + self.comparison_slack)
                if score is not None:
                    others[other_id] = score
        if not others:
            return Continue(member_id, member.env_steps, f"no other member has a score recorded at <= {member.env_steps} env steps")

        if self.config.exploit == "truncation":
            scores = {member_id: own, **others}
            order = self._worst_first(scores)
            k = truncation_count(len(order), self.config.truncation_fraction)
            if member_id not in order[:k]:
                return Continue(member_id, member.env_steps, f"not in the bottom {k} of {len(order)} compared members")
            return self._truncation_exploit(member, own, order[-k:], scores, population)
        opponent_id = sorted(others)[int(self._rng.integers(len(others)))]
        return self._duel(member, own, population[opponent_id], others[opponent_id])

    def decide_generation(self, population: Mapping[int, MemberState]) -> dict[int, Decision]:
        """Sync mode: every member decides against one snapshot (current fitness); donors continue."""
        decisions: dict[int, Decision] = {}
        scores: dict[int, float] = {}
        for member_id in sorted(population):
            early = self._early_continue(population[member_id], population)
            if early is not None:
                decisions[member_id] = early
            else:
                scores[member_id] = self.fitness(population[member_id])
        if len(scores) == 1:
            (only,) = scores
            decisions[only] = Continue(only, population[only].env_steps, "the only scored member of the generation")
        if len(scores) < 2:
            return dict(sorted(decisions.items()))

        order = self._worst_first(scores)
        if self.config.exploit == "truncation":
            k = truncation_count(len(order), self.config.truncation_fraction)
            bottom, top = order[:k], order[-k:]
            for member_id in order:
                member = population[member_id]
                if member_id in bottom:
                    decisions[member_id] = self._truncation_exploit(member, scores[member_id], top, scores, population)
                else:
                    decisions[member_id] = Continue(member_id, member.env_steps, f"not in the bottom {k} of {len(order)} scored members")
            return dict(sorted(decisions.items()))

        donors: dict[int, int] = {}  # donor -> the member copying it
        exploiters: set[int] = set()
        for member_id in order:
            member = population[member_id]
            if member_id in donors:
                decisions[member_id] = Continue(member_id, member.env_steps, f"donor of member {donors[member_id]} this generation")
                continue
            opponents = [o for o in sorted(scores) if o != member_id and o not in exploiters]
            if not opponents:
                decisions[member_id] = Continue(member_id, member.env_steps, "every other member exploits this generation")
                continue
            opponent_id = opponents[int(self._rng.integers(len(opponents)))]
            decision = self._duel(member, scores[member_id], population[opponent_id], scores[opponent_id])
            if isinstance(decision, Exploit):
                exploiters.add(member_id)
                donors.setdefault(opponent_id, member_id)
            decisions[member_id] = decision
        return dict(sorted(decisions.items()))

    def reseed(
        self,
        member_id: int,
        population: Mapping[int, MemberState],
        excluded: Collection[int] = (),
    ) -> Exploit | None:
        """A donor for a member that failed or diverged: the best other eligible member by current
        fitness, not in ``excluded``, explored; None if there is none (module docstring, *Reseeding*)."""
        member = population[member_id]
        excluded = set(excluded)
        candidates = {
            other_id: self.fitness(population[other_id])
            for other_id in sorted(population)
            if other_id != member_id and other_id not in excluded and self.donor_problem(population[other_id]) is None
        }
        if not candidates:
            return None
        donor_id = self._worst_first(candidates)[-1]
        return self._exploit(member, self.fitness(member), population[donor_id], candidates[donor_id])

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the generator's bit-generator state."""
        return {"format": STATE_FORMAT, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"scheduler state format {state.get('format')!r} is not {STATE_FORMAT}")
        rng_state = state["rng"]
        expected = type(self._rng.bit_generator).__name__
        if rng_state.get("bit_generator") != expected:
            raise ValueError(f"scheduler state holds a {rng_state.get('bit_generator')!r} generator, expected {expected!r}")
        self._rng.bit_generator.state = rng_state

    # ------------------------------------------------------------------ helpers

    def _early_continue(self, member: MemberState, population: Mapping[int, MemberState]) -> Continue | None:
        if len(population) < 2:
            return Continue(member.member_id, member.env_steps, "population of one: nothing to compare with")
        episodes = len(member.episode_returns)
        if episodes < self.config.min_episodes:
            return Continue(
                member.member_id,
                member.env_steps,
                f"not scored yet: {episodes} finished episodes < pbt.min_episodes={self.config.min_episodes}",
            )
        return None

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

    def _exploit(self, member: MemberState, own: float, donor: MemberState, donor_score: float) -> Exploit:
        assert donor.member_id != member.member_id and self.donor_problem(donor) is None
        assert donor.checkpoint_id is not None and donor.checkpoint_env_steps is not None
        new, operations = self.search_space.explore(
            donor.hyperparameters, self._rng, self.config.explore, resample_probability=self.config.resample_probability
        )
        return Exploit(
            member_id=member.member_id,
            env_steps=member.env_steps,
            donor_id=donor.member_id,
            donor_checkpoint=donor.checkpoint_id,
            donor_env_steps=int(donor.checkpoint_env_steps),
            old_hyperparameters=dict(member.hyperparameters),
            new_hyperparameters=new,
            operations=operations,
            member_score=float(own),
            donor_score=float(donor_score),
        )


def welch_p_value_greater(donor: np.ndarray, member: np.ndarray) -> float:
    """One-sided p-value of Welch's t-test for mean(donor) > mean(member).

    Two constant samples have no variance to test: p = 0 if the donor's mean is higher, else 1.
    """
    if np.var(donor) == 0.0 and np.var(member) == 0.0:
        return 0.0 if donor.mean() > member.mean() else 1.0
    return float(scipy.stats.ttest_ind(donor, member, equal_var=False, alternative="greater").pvalue)
