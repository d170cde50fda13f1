"""Helpers of the learner tests: configs, synthetic unrolls, spies and tensor comparisons."""

from __future__ import annotations

import io

import numpy as np
import torch

from pbt_rl.agents.rollout import Unroll
from pbt_rl.config import AgentConfig, EnvConfig, ExperimentConfig

ALGOS = ["a2c", "impala"]


def make_config(algo: str, env_id: str = "CartPole-v1", num_envs: int = 4, async_batch_size: int = 0,
                **agent: object) -> ExperimentConfig:
    return ExperimentConfig(
        env=EnvConfig(id=env_id, num_envs=num_envs, async_batch_size=async_batch_size),
        agent=AgentConfig(algo=algo, device="cpu", **agent),
    )


def cartpole_unroll(length: int, num_envs: int, seed: int = 0) -> Unroll:
    """An off-policy CartPole-shaped unroll: random observations, behaviour probabilities in
    [0.2, 0.8] (so ratios to a ~0.5 policy get clipped), a termination, a truncation and the
    auto-reset steps after them."""
    rng = np.random.default_rng(seed)
    unroll = Unroll.empty(length, num_envs, (4,), np.float32, (), np.int64)
    unroll.obs[:] = rng.normal(size=unroll.obs.shape)
    unroll.actions[:] = rng.integers(0, 2, size=(length, num_envs))
    unroll.behaviour_log_probs[:] = np.log(rng.uniform(0.2, 0.8, size=(length, num_envs)))
    unroll.rewards[:] = rng.normal(size=(length, num_envs))
    unroll.valid[:] = True
    unroll.terminated[1, 0] = True
    unroll.truncated[2, num_envs - 1] = True
    unroll.valid[2, 0] = unroll.valid[3, num_envs - 1] = False
    unroll.rewards[2, 0] = unroll.rewards[3, num_envs - 1] = 0.0
    return unroll


def record_updates(learner) -> list[Unroll]:
    """Spy on the learner's gradient steps: the unroll batch of every update, in order."""
    seen: list[Unroll] = []
    original = learner.update

    def update(unroll: Unroll):
        seen.append(unroll)
        return original(unroll)

    learner.update = update
    return seen


def parameters(learner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=name)


def round_trip(state: dict) -> dict:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
