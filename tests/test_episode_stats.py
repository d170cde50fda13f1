"""EpisodeStats on scripted step streams with known answers (no real env needed)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.envs import EpisodeStats, envpool_episode_signals


def feed(stats: EpisodeStats, rows: list[tuple[float, bool, int, bool]]) -> tuple[list[float], list[int]]:
    """Feed single-env batches ``(raw_reward, episode_over, env_id, is_first)`` one at a time."""
    returns: list[float] = []
    lengths: list[int] = []
    for reward, over, env_id, first in rows:
        r, n = stats.update(np.array([reward]), np.array([over]), np.array([env_id]), np.array([first]))
        returns += r.tolist()
        lengths += n.tolist()
    return returns, lengths


def test_reports_sum_and_length_when_an_episode_terminates():
    stats = EpisodeStats(num_envs=2)
    # Reset batch (both envs), then env 0 gets 1 + 2 and terminates, env 1 keeps going.
    stats.update(np.zeros(2), np.zeros(2, bool), np.arange(2), np.ones(2, bool))
    r, n = stats.update(np.array([1.0, 10.0]), np.array([False, False]), np.arange(2), np.zeros(2, bool))
    assert r.size == 0 and n.size == 0
    r, n = stats.update(np.array([2.0, 20.0]), np.array([True, False]), np.arange(2), np.zeros(2, bool))
    assert r.dtype == np.float64 and n.dtype == np.int64
    assert r.tolist() == [3.0] and n.tolist() == [2]
    assert stats.running_returns.tolist() == [0.0, 30.0]
    assert stats.running_lengths.tolist() == [0, 2]


def test_termination_and_truncation_both_reset_the_running_sums():
    stats = EpisodeStats(num_envs=1)
    rows = [
        (0.0, False, 0, True),   # reset step
        (1.0, False, 0, False),
        (1.0, True, 0, False),   # terminated: return 2, length 2
        (0.0, False, 0, True),   # auto-reset step
        (5.0, False, 0, False),
        (5.0, False, 0, False),
        (5.0, True, 0, False),   # truncated: return 15, length 3
        (0.0, False, 0, True),
        (-1.0, True, 0, False),  # return -1, length 1
    ]
    returns, lengths = feed(stats, rows)
    assert returns == [2.0, 15.0, -1.0]
    assert lengths == [2, 3, 1]


def test_reset_step_adds_neither_reward_nor_length():
    # A CartPole-like env truncated after 5 steps, reward 1 per step: return 5, length 5,
    # for the first episode and the one after the auto-reset step alike.
    stats = EpisodeStats(num_envs=1)
    one_episode = [(0.0, False, 0, True)] + [(1.0, step == 4, 0, False) for step in range(5)]
    returns, lengths = feed(stats, one_episode + one_episode)
    assert returns == [5.0, 5.0]
    assert lengths == [5, 5]


def test_reset_step_reward_is_ignored_even_if_nonzero():
    # is_first rows are skipped whatever they carry, so a backend quirk cannot leak into fitness.
    stats = EpisodeStats(num_envs=1)
    returns, lengths = feed(stats, [(7.0, False, 0, True), (1.0, True, 0, False)])
    assert returns == [1.0] and lengths == [1]


def test_atari_life_loss_does_not_end_the_recorded_episode():
    """episodic_life: life loss terminates the learning episode but the game score goes on."""
    stats = EpisodeStats(num_envs=1)
    returns: list[float] = []
    lengths: list[int] = []
    # (clipped reward, learning terminated, truncated, info reward (raw), info terminated (game over), is_first)
    script = [
        (0.0, False, False, 0.0, 0, True),   # reset
        (1.0, False, False, 4.0, 0, False),
        (1.0, True, False, 7.0, 0, False),   # life lost: learning episode ends, game continues
        (0.0, False, False, 0.0, 0, True),   # envpool's reset step after the life loss
        (1.0, False, False, 1.0, 0, False),
        (0.0, True, False, 0.0, 1, False),   # last life lost: game over
        (0.0, False, False, 0.0, 0, True),   # new game
        (1.0, False, False, 4.0, 0, False),
    ]
    for clipped, terminated, truncated, raw, game_over, first in script:
        raw_reward, over = envpool_episode_signals(
            "atari", np.array([clipped]), np.array([terminated]), np.array([truncated]),
            {"reward": np.array([raw], np.float32), "terminated": np.array([game_over], np.int32)},
        )
        r, n = stats.update(raw_reward, over, np.array([0]), np.array([first]))
        returns += r.tolist()
        lengths += n.tolist()
    # One game: raw score 4 + 7 + 1 + 0 over 4 agent steps (the reset step after the life loss
    # is not an agent decision). The learning rewards (clipped) would have summed to 3.
    assert returns == [12.0]
    assert lengths == [4]
    assert stats.running_returns.tolist() == [4.0]


def test_reported_return_is_the_raw_score_when_learning_rewards_are_clipped():
    raw_reward, over = envpool_episode_signals(
        "atari",
        reward=np.array([1.0, -1.0, 1.0], np.float32),  # sign-clipped
        terminated=np.array([False, False, True]),
        truncated=np.array([False, True, False]),
        info={"reward": np.array([25.0, -3.0, 200.0], np.float32), "terminated": np.array([0, 0, 1], np.int32)},
    )
    assert raw_reward.tolist() == [25.0, -3.0, 200.0]
    assert over.tolist() == [False, True, True]


def test_non_atari_signals_use_reward_and_both_episode_ends():
    raw_reward, over = envpool_episode_signals(
        "mujoco", np.array([0.5, 1.5], np.float32), np.array([True, False]), np.array([False, True]), {}
    )
    assert raw_reward.tolist() == [0.5, 1.5]
    assert over.tolist() == [True, True]


def test_asynchronous_batches_in_any_env_order():
    stats = EpisodeStats(num_envs=4)
    stats.update(np.zeros(2), np.zeros(2, bool), np.array([3, 1]), np.ones(2, bool))
    stats.update(np.array([1.0, 2.0]), np.zeros(2, bool), np.array([1, 3]), np.zeros(2, bool))
    stats.update(np.zeros(2), np.zeros(2, bool), np.array([0, 2]), np.ones(2, bool))
    r, n = stats.update(np.array([10.0, 20.0]), np.array([True, True]), np.array([3, 1]), np.zeros(2, bool))
    assert r.tolist() == [12.0, 21.0]  # batch order: env 3 (2 + 10) first, then env 1 (1 + 20)
    assert n.tolist() == [2, 2]


@pytest.mark.parametrize(
    "rewards, over, env_ids, first, message",
    [
        ([1.0, 1.0], [False, False], [0, 0], [False, False], "repeat"),
        ([1.0], [False, False], [0, 1], [False, False], "shape"),
        ([1.0, 1.0], [False, False], [0, 5], [False, False], r"\[0, 2\)"),
        ([1.0, 1.0], [False, False], [1, -1], [False, False], r"\[0, 2\)"),
    ],
)
def test_rejects_malformed_batches(rewards, over, env_ids, first, message):
    stats = EpisodeStats(num_envs=2)
    with pytest.raises(ValueError, match=message):
        stats.update(np.array(rewards), np.array(over), np.array(env_ids), np.array(first))


def naive_episodes(num_envs: int, stream: list[tuple[int, float, bool, bool]]) -> tuple[list[float], list[int]]:
    """Reference: one Python list of rewards per env, closed at each episode end."""
    current: list[list[float]] = [[] for _ in range(num_envs)]
    returns: list[float] = []
    lengths: list[int] = []
    for env_id, reward, over, first in stream:
        if first:
            continue
        current[env_id].append(reward)
        if over:
            returns.append(sum(current[env_id]))
            lengths.append(len(current[env_id]))
            current[env_id] = []
    return returns, lengths


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_matches_a_naive_per_env_reference(data):
    num_envs = data.draw(st.integers(1, 4))
    num_batches = data.draw(st.integers(1, 25))
    stats = EpisodeStats(num_envs)
    stream: list[tuple[int, float, bool, bool]] = []
    got_returns: list[float] = []
    got_lengths: list[int] = []
    for _ in range(num_batches):
        env_ids = data.draw(st.permutations(range(num_envs)))[: data.draw(st.integers(1, num_envs))]
        rows = [
            (env_id, float(data.draw(st.integers(-5, 5))), data.draw(st.booleans()), data.draw(st.booleans()))
            for env_id in env_ids
        ]
        stream += rows
        r, n = stats.update(
            np.array([row[1] for row in rows]),
            np.array([row[2] for row in rows]),
            np.array([row[0] for row in rows]),
            np.array([row[3] for row in rows]),
        )
        got_returns += r.tolist()
        got_lengths += n.tolist()
    want_returns, want_lengths = naive_episodes(num_envs, stream)
    assert got_returns == want_returns
    assert got_lengths == want_lengths
