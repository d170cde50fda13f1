"""The reward scaler against its definition (agents/normalizer.py ``RewardScaler``), written with
plain loops: per env the discounted return ``R <- gamma * R + r`` of every counted step (reset
steps are not counted), restarted after a terminated or truncated step; the statistics are the
population variance of every counted return so far; a reward is divided by
``sqrt(var + epsilon)`` after its batch's returns were merged, and clipped to +-10."""

from __future__ import annotations

import numpy as np
import pytest

from pbt_rl.agents.normalizer import RewardScaler


def reference_scaled_rewards(batches, num_envs, gamma, epsilon=1e-8):
    returns = [0.0] * num_envs
    seen: list[float] = []
    scaled = []
    for rewards, terminated, truncated, is_first, env_ids in batches:
        ended = []
        for row, env in enumerate(env_ids):
            if is_first[row]:
                continue
            returns[env] = gamma * returns[env] + float(rewards[row])
            seen.append(returns[env])
            if terminated[row] or truncated[row]:
                ended.append(env)
        for env in ended:
            returns[env] = 0.0
        var = float(np.var(seen)) if seen else 1.0
        scaled.append(np.clip(np.asarray(rewards, dtype=np.float64) / np.sqrt(var + epsilon), -10.0, 10.0))
    return scaled


def random_batches(rng, num_envs, batch_size, count, reset_probability):
    """Batches of env ids in any order (asynchronous envs), some with reset steps and episode ends."""
    batches = []
    for _ in range(count):
        env_ids = rng.permutation(num_envs)[:batch_size].astype(np.int32)
        is_first = rng.random(batch_size) < reset_probability
        rewards = np.where(is_first, 0.0, rng.normal(1.0, 3.0, batch_size)).astype(np.float32)
        terminated = ~is_first & (rng.random(batch_size) < 0.1)
        truncated = ~is_first & ~terminated & (rng.random(batch_size) < 0.05)
        batches.append((rewards, terminated, truncated, is_first, env_ids))
    return batches


@pytest.mark.parametrize("reset_probability", [0.0, 0.2])  # batches without reset steps take a shorter path
def test_reward_scaler_matches_its_definition(reset_probability):
    rng = np.random.default_rng(3)
    num_envs, gamma = 6, 0.9
    batches = random_batches(rng, num_envs, 4, 60, reset_probability)
    scaler = RewardScaler(num_envs)
    expected = reference_scaled_rewards(batches, num_envs, gamma)
    for batch, want in zip(batches, expected):
        got = scaler(*batch, gamma=gamma)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    counted = sum(int((~b[3]).sum()) for b in batches)
    assert scaler.statistics.count == counted


def test_reward_scaler_clips_and_restarts_returns_after_episode_ends():
    scaler = RewardScaler(2)
    ids = np.array([0, 1], dtype=np.int32)
    no = np.zeros(2, dtype=bool)
    scaler(np.array([1.0, 1.0], np.float32), np.array([True, False]), no, no, ids, gamma=1.0)
    np.testing.assert_array_equal(scaler.discounted_returns, [0.0, 1.0])  # env 0's episode ended
    scaler(np.array([2.0, 2.0], np.float32), no, np.array([False, True]), no, ids, gamma=1.0)
    np.testing.assert_array_equal(scaler.discounted_returns, [2.0, 0.0])  # truncation restarts too
    # a reset step adds nothing and does not restart the return it follows
    scaler(np.array([0.0, 5.0], np.float32), no, no, np.array([True, False]), ids, gamma=1.0)
    np.testing.assert_array_equal(scaler.discounted_returns, [2.0, 5.0])
    # returns of std ~0.01 so far: a reward of 1 is 100 of them, clipped to 10
    scaler.statistics.load_state_dict({"mean": np.zeros(1), "var": np.full(1, 1e-4), "count": 1e12})
    scaler.discounted_returns[:] = 0.0
    clipped = scaler(np.array([1.0, -1.0], np.float32), no, no, no, ids, gamma=1.0)
    np.testing.assert_array_equal(clipped, np.array([10.0, -10.0], np.float32))
