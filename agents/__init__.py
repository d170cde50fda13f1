"""Learners (A2C, IMPALA/V-trace), networks and returns maths; see docs/design.md "Learner contract".

>>> from pbt_rl.config import ExperimentConfig
>>> from pbt_rl.agents import make_learner
>>> learner = make_learner(ExperimentConfig(), seed=0)
>>> report = learner.train(until_env_steps=10_000)   # TrainReport of this call
>>> learner.set_hyperparameters({"lr": 3e-4})
>>> state = learner.state_dict()
>>> learner.close()
"""

from __future__ import annotations

from pbt_rl.agents.base import Learner, TrainingDiverged, TrainReport
from pbt_rl.config import ExperimentConfig


def make_learner(config: ExperimentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None) -> Learner:
    """Build the learner ``config.agent.algo`` names, with its own env seeded by ``seed``.

    Args:
        config: the experiment; the learner reads ``config.env`` and ``config.agent``.
        seed: seeds the envs, the weight initialisation and the torch/numpy RNGs.
        device: overrides ``config.agent.device`` (``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'``).
        num_threads: this member's share of CPU cores: envpool worker threads (unless
            ``env.num_threads`` sets them) and torch's intra-op threads (on CUDA: 1). None leaves
            envpool's default and torch's thread count alone.
    """
    algo = config.agent.algo
    if algo == "a2c":
        from pbt_rl.agents.a2c import A2CLearner

        return A2CLearner(config, seed, device, num_threads)
    if algo == "impala":
        from pbt_rl.agents.impala import ImpalaLearner

        return ImpalaLearner(config, seed, device, num_threads)
    raise ValueError(f"agent.algo: unknown learner {algo!r}; choose 'a2c' or 'impala'")


__all__ = ["Learner", "TrainReport", "TrainingDiverged", "make_learner"]
