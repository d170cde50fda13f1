"""Fixtures shared by the learner tests."""

from __future__ import annotations

import pytest

from pbt_rl.agents import make_learner
from pbt_rl.config import ExperimentConfig


@pytest.fixture
def learners():
    """Learners built through this fixture are closed after the test, whatever happens."""
    built = []

    def build(config: ExperimentConfig, seed: int = 0):
        learner = make_learner(config, seed, num_threads=1)
        built.append(learner)
        return learner

    yield build
    for learner in built:
        learner.close()
