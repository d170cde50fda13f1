"""Learners (A2C, IMPALA/V-trace), networks and returns maths; see docs/design.md "Learner contract".

>>> from pbt_rl.config import ExperimentConfig
>>> from pbt_rl.agents import make_learner
>>> learner = make_learner(ExperimentConfig(), seed=0)
>>> report = learner.train(until_env_steps=10_000)   # TrainReport of this call
>>> learner.set_hyperparameters({"lr": 3e-4})
>>> state = learner.state_dict()
>>> learner.close()

Modules: ``base`` (the :class:`Learner` base), ``a2c`` and ``impala`` (the two learners),
``state`` (:class:`LearnerState`, the record a checkpoint holds, and the learner's random
generators), ``losses`` (the actor-critic loss, pure), ``returns`` and ``vtrace`` (targets, pure),
``rollout`` (:class:`Unroll`), ``normalizer`` (observation and return normalisation),
``optimizer`` and ``hyperparameters`` (building the optimiser, checking and applying new values),
``networks``, ``device`` (devices, host-to-device copies, the CUDA driver's wait mode),
``train_report`` (:class:`TrainReport`) and ``bench`` (``pbt-rl bench agent``).
"""

from __future__ import annotations

from pbt_rl.agents.base import Learner, TrainingDiverged
from pbt_rl.agents.state import LearnerState
from pbt_rl.agents.train_report import TrainReport
from pbt_rl.config import ExperimentConfig


def make_learner(config: ExperimentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None) -> Learner:
    """Build the learner ``config.agent.algo`` names, with its own env seeded by ``seed``.

    Args:
        config: the experiment; the learner gets only ``config.env`` and ``config.agent``.
        seed: seeds the envs, the weight initialisation and the learner's own random generators
            (the process's generators are neither seeded nor drawn from).
        device: overrides ``config.agent.device`` (``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'``).
        num_threads: this member's share of CPU cores, for envpool worker threads (unless
            ``env.num_threads`` sets them); None or 0 leaves envpool's default. torch's threads
            are set by the process's host (:func:`pbt_rl.runtime.host.configure_process`).
    """
    return learner_class(config.agent.algo)(config.env, config.agent, seed, device, num_threads)


def learner_class(algo: str) -> type[Learner]:
    """The learner class ``agent.algo`` names."""
    if algo == "a2c":
        from pbt_rl.agents.a2c import A2CLearner

        return A2CLearner
    if algo == "impala":
        from pbt_rl.agents.impala import ImpalaLearner

        return ImpalaLearner
    raise ValueError(f"agent.algo: unknown learner {algo!r}; choose 'a2c' or 'impala'")


__all__ = ["Learner", "LearnerState", "TrainReport", "TrainingDiverged", "learner_class", "make_learner"]
