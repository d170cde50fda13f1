"""Process-wide settings are the host's (pbt_rl.runtime.host), made once; learners change none."""

from __future__ import annotations

import pytest
import torch

from learner_support import make_config
from pbt_rl.runtime.host import configure_process, torch_threads_for

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, num_threads, torch_threads, expected", [
    (CPU, 3, 0, 3),      # the member's share of the cores, beside its env threads
    (CUDA, 3, 0, 1),     # torch's CPU threads only launch kernels
    (CPU, 3, 5, 5),      # run.torch_threads decides when set
    (CUDA, 3, 2, 2),
    (CPU, 0, 0, None),   # nothing decided: torch keeps its default
    (CUDA, 0, 4, 4),
])
def test_one_rule_decides_torch_threads(device, num_threads, torch_threads, expected):
    assert torch_threads_for(device, num_threads, torch_threads) == expected


def test_configure_process_sets_the_threads_and_returns_the_device():
    before = torch.get_num_threads()
    try:
        assert configure_process("cpu", num_threads=2) == CPU
        assert torch.get_num_threads() == 2
        configure_process("cpu", num_threads=0)  # nothing decided: left as it is
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("algo", ["a2c", "impala"])
def test_a_learner_changes_nothing_about_its_process(learners, algo):
    before_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream = torch.get_rng_state()
        learner = learners(make_config(algo, num_envs=4), seed=3)  # built with num_threads=1
        learner.train(300)
        learner.act(torch.zeros(8, 4).numpy())
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), stream)
    finally:
        torch.set_num_threads(before_threads)
