"""Members, populations and configs for the scheduler tests (tests/test_scheduler*.py)."""

from __future__ import annotations

from pbt_rl.config import from_dict
from pbt_rl.scheduler import Exploit, MemberState


SEARCH_SPACE = {
    "lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2},
    "unroll_length": {"kind": "int", "low": 1, "high": 20},
    "gamma": {"kind": "uniform", "low": 0.9, "high": 0.999, "perturb": "one_minus"},
}
STEPS = 50_000


def config(**pbt):
    raw = {"population_size": 4, "search_space": SEARCH_SPACE, "min_episodes": 1, "fitness_window": 10, **pbt}
    return from_dict({"pbt": raw}).pbt


def hyperparameters(member_id):
    return {"lr": 1e-3, "unroll_length": 5 + member_id % 10, "gamma": 0.99, "algo": "a2c"}


def member(member_id, score, env_steps=STEPS, returns=None, history=None, checkpoint="auto", checkpoint_steps="auto"):
    """A member whose current window and single ready-point record both have ``score``; its
    checkpoint (if any) is its own, saved at its current env steps unless told otherwise."""
    if returns is None:
        returns = (score,) * 3
    if history is None:
        history = ((env_steps, score),)
    if checkpoint == "auto":
        checkpoint = f"members/{member_id}/checkpoints/{env_steps:012d}.pt"
    if checkpoint_steps == "auto":
        checkpoint_steps = None if checkpoint is None else env_steps
    return MemberState(member_id, env_steps, env_steps, tuple(returns), tuple(history), hyperparameters(member_id),
                       checkpoint, checkpoint_env_steps=checkpoint_steps)


def population(scores, **kwargs):
    return {i: member(i, s, **kwargs) for i, s in enumerate(scores)}


def decide_all(scheduler, pop):
    return {i: scheduler.decide(i, pop) for i in pop}


def exploiters(decisions):
    return {i: d.donor_id for i, d in decisions.items() if isinstance(d, Exploit)}
