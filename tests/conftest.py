"""Fixtures shared by the learner tests."""

from __future__ import annotations

import pytest

from pbt_rl.agents import make_learner
from pbt_rl.config import ExperimentConfig
from pbt_rl.runtime.host import configure_process


@pytest.fixture(scope="session", autouse=True)
def _host_process():
    """The test process hosts learners the way a member process does, with one core's share:
    one torch intra-op thread (learners leave the process's settings alone)."""
    configure_process("cpu", num_threads=1)


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
