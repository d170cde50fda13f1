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
Truncation, tournament and t-test selection: :mod:`pbt_rl.selection` (its docstring).

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

Baselines (``pbt.exploit: none``, ``pbt.search``)
------------------------------------------------
``pbt.exploit: none`` never copies: :meth:`Scheduler.decide` and :meth:`Scheduler.decide_generation`
always continue and :meth:`Scheduler.reseed` returns None (a failed member restarts from its own
checkpoint). With ``pbt.search: space`` that is random search: the initial values are the same
draws from the same generator as any other arm with the same seed and search space. With
``pbt.search: none`` (hand-tuning) every member starts from the agent config's values, nothing is
drawn, and the population is copies of one configuration that differ only by their seeds. Both
spend the same budget as PBT: every member trains ``run.total_env_steps``.

PB2 (``pbt.explore: pb2``)
-------------------------
The numeric values of an exploit (or reseed) come from PB2's GP bandit (:mod:`pbt_rl.pb2`);
categorical ones from the ordinary explore. The scheduler keeps PB2's improvement data itself:
at every ready decision it records the deciding member's fitness change since its previous
decision (:meth:`pbt_rl.pb2.ImprovementLog.observe`) and where its next interval starts (its own
fitness and values, or after an exploit the donor's score and the new values); the data is part
of :meth:`Scheduler.state_dict`. The other members' current values (and those already given to
exploiters in the same generation) are PB2's pending points. Operation strings: ``"pb2"``, or
while PB2 has too little data the ordinary one with ``" (pb2: too little data)"`` appended.

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

import math
from typing import Any, Collection, Mapping

import numpy as np

from pbt_rl.config import PBTConfig
from pbt_rl.decisions import Continue, Decision, Exploit, MemberState
from pbt_rl.pb2 import ImprovementLog
from pbt_rl.selection import Selection, truncation_count, welch_p_value_greater
from pbt_rl.search_space import SearchSpace, Value

__all__ = ["Continue", "Decision", "Exploit", "MemberState", "Scheduler", "truncation_count", "welch_p_value_greater"]

STATE_FORMAT = 1
NO_EXPLOIT = "pbt.exploit: none (a baseline: members never copy)"


class Scheduler(Selection):
    """PBT decisions for one run (see the module docstring)."""

    def __init__(self, pbt_cfg: PBTConfig, seed: int):
        self.config = pbt_cfg
        self.search_space = SearchSpace.from_config(pbt_cfg)
        self._rng = np.random.default_rng(seed)
        # Env steps by which another member's score may be "newer" and still count as a peer's.
        self.comparison_slack = pbt_cfg.ready_after_steps // 10
        searching = pbt_cfg.explore == "pb2" and pbt_cfg.exploit != "none"
        self.pb2 = ImprovementLog(self.search_space, pbt_cfg.ready_after_steps) if searching else None
        self._population: Mapping[int, MemberState] = {}
        self._chosen: list[dict[str, Value]] = []  # values given to exploiters in this decision call

    # ------------------------------------------------------------------ population start

    def initial_hyperparameters(self, base: Mapping[str, Value], population_size: int) -> list[dict[str, Value]]:
        """One dict per member: ``base`` (the agent config's values) overlaid with a sample of
        the search space (``init`` where a parameter sets it); with ``pbt.search: none``, ``base``."""
        if self.config.search == "none":
            return [dict(base) for _ in range(population_size)]
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
        if self.config.exploit == "none":
            return Continue(member_id, population[member_id].env_steps, NO_EXPLOIT)
        self._begin(population, [member_id])
        decision = self._decide(member_id, population)
        self._started(decision)
        return decision

    def _decide(self, member_id: int, population: Mapping[int, MemberState]) -> Decision:
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
        if self.config.exploit == "none":
            return {i: Continue(i, m.env_steps, NO_EXPLOIT) for i, m in sorted(population.items())}
        self._begin(population, sorted(population))
        decisions = self._decide_generation(population)
        for decision in decisions.values():
            self._started(decision)
        return decisions

    def _decide_generation(self, population: Mapping[int, MemberState]) -> dict[int, Decision]:
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
        if self.config.exploit == "none":
            return None
        self._begin(population, [])
        if self.pb2 is not None:
            self.pb2.forget(member_id)
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
        state = {"format": STATE_FORMAT, "rng": self._rng.bit_generator.state}
        if self.pb2 is not None:
            state["pb2"] = self.pb2.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"scheduler state format {state.get('format')!r} is not {STATE_FORMAT}")
        rng_state = state["rng"]
        expected = type(self._rng.bit_generator).__name__
        if rng_state.get("bit_generator") != expected:
            raise ValueError(f"scheduler state holds a {rng_state.get('bit_generator')!r} generator, expected {expected!r}")
        self._rng.bit_generator.state = rng_state
        if self.pb2 is not None and "pb2" in state:
            self.pb2.load_state_dict(state["pb2"])

    # ------------------------------------------------------------------ helpers

    def _begin(self, population: Mapping[int, MemberState], ready: list[int]) -> None:
        """Start of a decision call: PB2 observes the ready members' finished intervals."""
        self._population, self._chosen = population, []
        if self.pb2 is not None:
            for member_id in ready:
                member = population[member_id]
                self.pb2.observe(member_id, member.env_steps, self.fitness(member), member.hyperparameters)

    def _started(self, decision: Decision) -> None:
        """PB2: the member's next interval starts from its score and values (or the donor's)."""
        if self.pb2 is None:
            return
        member = self._population[decision.member_id]
        if isinstance(decision, Exploit):
            self.pb2.started(member.member_id, member.env_steps, decision.donor_score, decision.new_hyperparameters)
        else:
            self.pb2.started(member.member_id, member.env_steps, self.fitness(member), member.hyperparameters)

    def _explore(self, member: MemberState, donor: MemberState) -> tuple[dict[str, Value], dict[str, str]]:
        """The donor's values explored: ``pbt.explore``, or PB2 for the numeric ones."""
        cfg, space = self.config, self.search_space
        if self.pb2 is None:
            return space.explore(donor.hyperparameters, self._rng, cfg.explore, resample_probability=cfg.resample_probability)
        numeric = set(space.numeric_names)
        new, operations = space.explore(donor.hyperparameters, self._rng, "perturb_or_resample",
                                        resample_probability=cfg.resample_probability,
                                        only=[n for n in space.names if n not in numeric])
        pending = [m.hyperparameters for i, m in sorted(self._population.items()) if i != member.member_id]
        chosen = self.pb2.suggest(donor.hyperparameters, member.env_steps, pending + self._chosen, self._rng)
        if chosen is None:  # too little data yet: the ordinary explore
            fallback, ops = space.explore(donor.hyperparameters, self._rng, "perturb_or_resample",
                                          resample_probability=cfg.resample_probability, only=numeric)
            chosen = {n: fallback[n] for n in numeric}
            operations.update({n: f"{ops[n]} (pb2: too little data)" for n in numeric})
        else:
            operations.update({n: "pb2" for n in numeric})
        new.update(chosen)
        self._chosen.append(new)
        return new, operations

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

    def _exploit(self, member: MemberState, own: float, donor: MemberState, donor_score: float) -> Exploit:
        assert donor.member_id != member.member_id and self.donor_problem(donor) is None
        assert donor.checkpoint_id is not None and donor.checkpoint_env_steps is not None
        new, operations = self._explore(member, donor)
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
