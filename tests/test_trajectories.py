"""The IMPALA actor's trajectories (agents/trajectories.py) against the definition, one env at a
time (references.NaiveEnvTrajectories), on random asynchronous streams of env batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pbt_rl.agents.trajectories import EnvTrajectories
from references import NaiveEnvTrajectories

FIELDS = ("obs", "actions", "behaviour_log_probs", "policy_updates", "rewards", "terminated", "truncated", "valid")


def _cuts(seed: int, num_envs: int, continuous: bool, steps: int = 400, obs_device: torch.device | None = None):
    """Drive both implementations as an asynchronous actor does: envs come back in random batches
    of those in flight (all of them are, after the reset), are acted on and sent again; now and
    then the experience is dropped (between a batch's arrival and its actions, or after them),
    and the unroll length and group size change. Yields each cut of both. With ``obs_device`` the
    fast one keeps its observations as tensors there (as an actor on a GPU does)."""
    rng = np.random.default_rng(seed)
    fast, naive = EnvTrajectories(num_envs, obs_device=obs_device), NaiveEnvTrajectories(num_envs)
    in_flight = np.arange(num_envs)
    length, group = int(rng.integers(1, 6)), int(rng.integers(1, num_envs + 1))
    for step in range(steps):
        ids = rng.permutation(in_flight)[: int(rng.integers(1, in_flight.size + 1))]
        in_flight = np.setdiff1d(in_flight, ids)
        size = ids.size
        obs = rng.integers(0, 255, size=(size, 2, 3), dtype=np.uint8)
        rewards = rng.normal(size=size).astype(np.float32)
        terminated, truncated, is_first = (rng.random(size) < 0.2 for _ in range(3))
        actions = (rng.normal(size=(size, 2)).astype(np.float32) if continuous
                   else rng.integers(0, 6, size=size))
        log_probs = rng.normal(size=size).astype(np.float32)
        drop_before_acting = rng.random() < 0.02
        for t in (fast, naive):
            received = torch.from_numpy(obs).to(obs_device) if t is fast and obs_device is not None else obs
            t.receive(ids, received, rewards, terminated, truncated, is_first)
            if drop_before_acting:
                t.drop_experience()
        for t in (fast, naive):
            t.sent(ids, actions, log_probs, step)
        in_flight = np.concatenate([in_flight, ids])
        drop = rng.random() < 0.02
        for t in (fast, naive):
            if drop:
                t.drop_experience()
        if rng.random() < 0.05:
            length, group = int(rng.integers(1, 8)), int(rng.integers(1, num_envs + 1))
        while True:
            expected, unroll = naive.cut(length, group), fast.cut(length, group, version=3)
            yield expected, unroll
            if expected is None or unroll is None:
                break


DEVICES = [None, torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_envs,continuous", [(1, False), (5, True), (12, False)])
@pytest.mark.parametrize("obs_device", DEVICES, ids=lambda device: f"obs on {device or 'numpy'}")
def test_unrolls_are_cut_as_the_definition_cuts_them(seed, num_envs, continuous, obs_device):
    cuts = 0
    for expected, unroll in _cuts(seed, num_envs, continuous, obs_device=obs_device):
        assert (expected is None) == (unroll is None)
        if expected is None:
            continue
        cuts += 1
        _group, arrays = expected
        assert unroll.policy_version == 3
        for name in FIELDS:
            value = getattr(unroll, name)
            if name == "obs" and obs_device is not None:
                assert isinstance(value, torch.Tensor) and value.device.type == obs_device.type
                assert value.dtype == torch.uint8
                value = value.cpu().numpy()
            assert value.shape == arrays[name].shape, name
            np.testing.assert_array_equal(value, arrays[name].astype(value.dtype), err_msg=name)
        assert unroll.obs.dtype in (np.uint8, torch.uint8) and unroll.valid.dtype == bool
        assert unroll.policy_updates.dtype == np.int64
    assert cuts > 10


def test_storage_stays_bounded_by_the_unroll_length():
    """A long stream with regular cuts keeps each env's row a small multiple of the unroll length."""
    length = 8
    trajectories = EnvTrajectories(4)
    ids = np.arange(4)
    for step in range(2000):
        trajectories.receive(ids, np.full((4, 3), step, dtype=np.float32), np.zeros(4, np.float32),
                             np.zeros(4, bool), np.zeros(4, bool), np.zeros(4, bool))
        trajectories.sent(ids, np.zeros(4, np.int64), np.zeros(4, np.float32), step)
        while (unroll := trajectories.cut(length, 4, 0)) is not None:
            np.testing.assert_array_equal(np.diff(unroll.obs[:, 0, 0]), 1)  # consecutive steps
    assert trajectories._capacity <= 4 * (length + 2)
