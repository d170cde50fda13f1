"""IMPALA's actor thread: after a load it learns only from the loaded policy, a dropped queue makes
the next update on-policy, its exceptions reach train(), and close() joins it."""

from __future__ import annotations

import pytest

from learner_support import make_config, record_updates


# ----------------------------------------------------------------------------------------
# IMPALA actor thread
# ----------------------------------------------------------------------------------------


def test_impala_after_load_learns_only_from_the_loaded_policy(learners):
    config = make_config("impala", num_envs=8, async_batch_size=4, unroll_length=5, learner_batch_unrolls=2,
                         queue_size=4)
    member = learners(config, seed=1)
    member.train(4000)  # ~100 updates; partial trajectories and maybe queued unrolls remain
    donor = learners(config, seed=2)
    donor.train(600)  # ~15 updates
    member.load_state_dict(donor.state_dict())
    assert member.updates == donor.updates

    updates = record_updates(member)
    lags = []
    original = member.update

    def update(unroll):
        lags.append(member.updates - unroll.policy_updates.max())
        return original(unroll)

    member.update = update
    report = member.train(member.env_steps + 1200)
    assert len(updates) == report.updates > 0
    # Experience of the member's old policy would carry update counts ~100, far in the future
    # of the loaded counter: every step must come from weights at or before the current update.
    assert min(lags) >= 0
    assert 0 <= report.extra["policy_lag"] <= 2 * config.agent.queue_size + 2


def test_impala_first_update_after_drop_stale_experience_is_on_policy(learners):
    learner = learners(make_config("impala", num_envs=8, async_batch_size=4, learner_batch_unrolls=2))
    learner.train(2000)
    learner.drop_stale_experience()
    assert len(learner._queue) == 0
    stamps = []
    original = learner.update

    def update(unroll):
        stamps.append((learner.updates, unroll.policy_updates.min(), unroll.policy_updates.max()))
        return original(unroll)

    learner.update = update
    learner.train(3000)
    current, oldest, newest = stamps[0]
    assert oldest == newest == current  # nothing acted on by weights older than the drop


def test_impala_actor_exception_is_raised_by_train_and_close_joins(learners):
    learner = learners(make_config("impala", num_envs=4))
    learner.train(200)
    calls = {"n": 0}
    original_step = learner.env.step

    def failing_step(actions):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("env worker died")
        return original_step(actions)

    learner.env.step = failing_step
    with pytest.raises(OSError, match="env worker died"):
        learner.train(10_000)
    with pytest.raises(OSError):  # the learner stays failed
        learner.train(20_000)
    learner.close()
    assert not learner._thread.is_alive()


def test_impala_close_stops_a_running_actor(learners):
    learner = learners(make_config("impala", num_envs=4, queue_size=1))
    learner.train(500)
    assert learner._thread.is_alive()
    learner.close()
    assert not learner._thread.is_alive()
    learner.close()  # twice is harmless
