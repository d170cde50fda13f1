"""The learner contract (docs/design.md) for A2C and IMPALA: smoke runs on MuJoCo and Atari,
state round trips, hyperparameter changes, divergence, reports and the IMPALA actor thread."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from learner_support import (assert_same_tensors, cartpole_unroll, make_config, parameters, record_updates,
                             round_trip)
from pbt_rl.agents import TrainingDiverged
from pbt_rl.agents.rollout import Unroll
from pbt_rl.config import AgentConfig, tunable_agent_fields

ALGOS = ["a2c", "impala"]


def record_episodes(learner) -> list[float]:
    """Spy on the env: the episode returns of every step batch it delivers (any thread)."""
    returns: list[float] = []
    env = learner.env
    for name in ("step", "recv", "reset"):
        original = getattr(env, name)

        def wrapped(*args, _original=original):
            batch = _original(*args)
            returns.extend(batch.episode_returns.tolist())
            return batch

        setattr(env, name, wrapped)
    return returns


# ----------------------------------------------------------------------------------------
# Smoke runs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo,async_batch_size", [("a2c", 0), ("impala", 2)])
def test_mujoco_smoke_finite_losses_bounded_actions_normalised_obs(learners, algo, async_batch_size):
    # A wide initial policy (std e^1.5) samples far outside Hopper's [-1, 1] action box.
    config = make_config(algo, "Hopper-v5", num_envs=4, async_batch_size=async_batch_size,
                         unroll_length=8, log_std_init=1.5, normalize_returns=True)
    learner = learners(config)
    assert learner.obs_normalizer is not None  # 'auto' turns it on for MuJoCo
    updates = record_updates(learner)
    report = learner.train(2000)

    assert report.env_steps >= 2000 and report.updates == len(updates) > 0
    assert all(math.isfinite(v) for v in report.losses.values())
    assert set(report.losses) == {"policy_loss", "value_loss", "entropy", "total_loss"}
    assert learner.obs_normalizer.count >= 2000
    assert np.abs(learner.obs_normalizer.mean).sum() > 0

    stored = np.concatenate([u.actions.reshape(-1, 3) for u in updates])
    assert np.abs(stored).max() > 1.0  # the learner scores the unclipped samples ...
    obs = np.stack([learner.env.observation_space.sample() for _ in range(256)])
    env_actions = learner.act(obs)
    space = learner.env.action_space
    assert env_actions.shape == (256, 3)
    assert np.all(env_actions >= space.low) and np.all(env_actions <= space.high)  # ... the env gets clipped ones
    assert np.any(env_actions == space.high) and np.any(env_actions == space.low)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("network", ["nature", "impala"])
def test_atari_smoke_uint8_frames_and_batch_shapes(learners, algo, network):
    config = make_config(algo, "Pong-v5", num_envs=2, unroll_length=3, network=network)
    learner = learners(config)
    updates = record_updates(learner)
    report = learner.train(24)

    assert report.updates == 4 and report.extra["batch_shape"] == [3, 2]
    assert all(math.isfinite(v) for v in report.losses.values())
    for unroll in updates:
        assert unroll.obs.dtype == np.uint8 and unroll.obs.shape == (4, 2, 4, 84, 84)  # [T + 1, B, C, H, W]
        assert unroll.actions.shape == (3, 2)
        assert unroll.behaviour_log_probs.shape == unroll.rewards.shape == unroll.valid.shape == (3, 2)
    assert updates[0].valid.all()  # env.reset() is not a step: the first unroll has no auto-reset step
    assert learner.obs_normalizer is None


def greedy_policy(learner) -> None:
    """Replace sampling by a fixed function of the observation (same for any batching)."""
    def policy_step(model, obs, deterministic=False):
        actions = (np.asarray(obs)[:, 2] > 0).astype(np.int64)  # push towards the pole's lean
        return actions, actions, np.full(len(actions), -0.5, dtype=np.float32)

    learner.policy_step = policy_step


def test_a2c_double_buffering_collects_the_same_unrolls_as_synchronous_stepping(learners):
    """Fixed env groups change only the order of the work: the [T, B] batches are identical."""
    sync = learners(make_config("a2c", num_envs=6, unroll_length=7))
    grouped = learners(make_config("a2c", num_envs=6, async_batch_size=2, unroll_length=7))
    assert grouped.env.is_async and grouped.env.batch_size == 2
    unrolls = []
    for learner in (sync, grouped):
        greedy_policy(learner)
        seen = record_updates(learner)
        report = learner.train(6 * 7 * 5)
        assert report.extra["env_seconds"] > 0 and report.extra["inference_seconds"] > 0
        unrolls.append(seen)
    assert len(unrolls[0]) == len(unrolls[1]) == 5
    assert any((~u.valid).any() for u in unrolls[0])  # episodes ended and auto-reset inside the unrolls
    for a, b in zip(*unrolls):
        for name in ("obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert sync.env_steps == grouped.env_steps == 6 * 7 * 5


def test_a2c_unrolls_continue_each_other_and_hold_what_the_policy_acted_on(learners):
    """Each received batch goes straight into its unroll row, which the policy step reads; the
    next unroll starts from the last one's bootstrap row, also when the unroll length changes."""
    learner = learners(make_config("a2c", num_envs=4, async_batch_size=2, unroll_length=3))
    acted_on: list[np.ndarray] = []
    launch = learner.launch_policy_step
    learner.launch_policy_step = lambda model, obs, deterministic=False: (
        acted_on.append(np.array(obs)), launch(model, obs, deterministic))[1]
    unrolls: list[Unroll] = []
    update = learner.update
    learner.update = lambda unroll: (
        unrolls.append(dataclasses.replace(unroll, **{name: np.copy(getattr(unroll, name)) for name in (
            "obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid", "policy_updates")})),
        update(unroll))[1]
    learner.train(2 * 4 * 3)
    learner.set_hyperparameters({"unroll_length": 5})
    learner.train(learner.env_steps + 4 * 5)
    assert [u.length for u in unrolls] == [3, 3, 5]
    for before, after in zip(unrolls, unrolls[1:]):
        np.testing.assert_array_equal(after.obs[0], before.obs[-1])
        assert not np.array_equal(after.obs[0], after.obs[1])  # the rows are distinct steps
    expected = [u.obs[t, g * 2:(g + 1) * 2] for u in unrolls for t in range(u.length) for g in range(2)]
    assert len(acted_on) == len(expected)
    for seen, row in zip(acted_on, expected):
        np.testing.assert_array_equal(seen, row)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("algo", ALGOS)
def test_a_learner_on_a_gpu_updates_from_pinned_memory_the_device_copies_from_directly(learners, algo):
    """A2C's reused unroll and IMPALA's cut unrolls are page-locked: no staging copy of their frames."""
    config = make_config(algo, num_envs=4, async_batch_size=2, unroll_length=3)
    agent = dataclasses.replace(config.agent, device="cuda",
                                **({"learner_batch_unrolls": 2} if algo == "impala" else {}))  # concatenated too
    learner = learners(dataclasses.replace(config, agent=agent))
    seen = record_updates(learner)
    learner.train(2 * 4 * 3)
    assert seen
    unroll = seen[-1]
    for name in ("obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid"):
        assert torch.from_numpy(getattr(unroll, name)).is_pinned(), name
    row = torch.from_numpy(unroll.obs[1, 0:2])  # an A2C policy step reads such a row
    assert row.is_pinned() and row.pin_memory().data_ptr() == row.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device rings need CUDA")
def test_impala_cuts_the_same_unrolls_with_observation_rings_on_the_device_or_on_the_host(learners):
    first_unrolls = []
    for on_device in (True, False):
        config = make_config("impala", num_envs=4, unroll_length=3)  # synchronous: a seeded order of envs
        agent = dataclasses.replace(config.agent, device="cuda", trajectories_on_device=on_device)
        learner = learners(dataclasses.replace(config, agent=agent))
        seen = record_updates(learner)
        learner.train(4 * 3 * 2)
        first_unrolls.append(seen[0])  # acted on by the initial weights: the same seeded run either way
    on_device, on_host = first_unrolls
    assert isinstance(on_device.obs, torch.Tensor) and on_device.obs.device.type == "cuda"  # never on the host
    np.testing.assert_array_equal(on_device.obs.cpu().numpy(), on_host.obs)
    for name in ("actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid"):
        np.testing.assert_array_equal(getattr(on_device, name), getattr(on_host, name), err_msg=name)


@pytest.mark.parametrize("algo", ALGOS)
def test_auto_reset_steps_do_not_reach_the_loss(learners, algo):
    """Env 0 terminates at step 1 and env 1 is truncated there; step 2 is their auto-reset step.

    Whatever the auto-reset step holds (its ignored action, its behaviour log-prob, a reward)
    must not change the update: same loss parts and same new weights.
    """
    config = make_config(algo, num_envs=2, unroll_length=4)
    clean_learner, poisoned_learner = learners(config, seed=5), learners(config, seed=5)
    rng = np.random.default_rng(0)
    clean = Unroll.empty(4, 2, (4,), np.float32, (), np.int64)
    clean.obs[:] = rng.normal(size=clean.obs.shape)
    clean.actions[:] = rng.integers(0, 2, size=(4, 2))
    clean.behaviour_log_probs[:] = np.log(0.5)
    clean.rewards[:] = 1.0
    clean.terminated[1, 0] = True
    clean.truncated[1, 1] = True
    clean.valid[:] = True
    clean.valid[2, :] = False
    clean.rewards[2, :] = 0.0
    poisoned = Unroll(**{name: np.copy(getattr(clean, name)) for name in clean.__dataclass_fields__})
    poisoned.rewards[2, :] = 1e6
    poisoned.actions[2, :] = 1 - clean.actions[2, :]
    poisoned.behaviour_log_probs[2, :] = -60.0

    clean_stats = clean_learner.update(clean)
    poisoned_stats = poisoned_learner.update(poisoned)
    assert clean_stats == pytest.approx(poisoned_stats, rel=1e-6)
    for name, value in parameters(clean_learner).items():
        torch.testing.assert_close(parameters(poisoned_learner)[name], value, msg=name)


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo,async_batch_size", [("a2c", 0), ("impala", 0), ("impala", 2)])
def test_train_report_covers_only_its_own_call(learners, algo, async_batch_size):
    learner = learners(make_config(algo, num_envs=4, async_batch_size=async_batch_size, unroll_length=5))
    delivered = record_episodes(learner)

    first = learner.train(3000)
    assert first.env_steps == learner.env_steps >= 3000
    assert first.episode_returns == delivered and len(first.episode_returns) > 10
    assert len(first.episode_lengths) == len(first.episode_returns)
    assert sum(first.episode_lengths) <= first.env_steps

    delivered.clear()
    second = learner.train(6000)
    assert second.env_steps == learner.env_steps >= 6000
    assert second.episode_returns == delivered  # only the episodes finished during this call
    assert second.extra["env_steps_in_call"] == second.env_steps - first.env_steps
    assert second.extra["updates_total"] == first.updates + second.updates == learner.updates
    assert second.env_steps_per_second > 0
    # One policy step per env batch, and the acting thread's CPU time split around it.
    batch = async_batch_size or 4
    for report in (first, second):
        extra = report.extra
        assert extra["policy_steps"] * batch == extra["env_steps_in_call"]
        assert 0 < extra["inference_cpu_seconds"] < extra["act_cpu_seconds"]

    idle = learner.train(100)  # already past the target: no work
    assert idle.updates == 0 and idle.env_steps == learner.env_steps and idle.episode_returns == []
    assert idle.extra["policy_steps"] == 0 and idle.extra["act_cpu_seconds"] == 0.0


@pytest.mark.parametrize("algo,async_batch_size", [("a2c", 2), ("impala", 0), ("impala", 2)])
def test_a_received_batchs_bookkeeping_is_done_while_its_policy_step_computes(learners, algo, async_batch_size):
    """Each policy step is launched, then the received batch's bookkeeping (rewards scaled into the
    unroll or the trajectories) is done, then the step is waited for: on a GPU that CPU work fills
    what was a spinning wait. Every received batch is accounted exactly once, and IMPALA's actor
    does the last one's before it pauses, so a train call leaves nothing half recorded (A2C's
    first batches, from resetting its envs, have no rewards to account)."""
    learner = learners(make_config(algo, num_envs=4, async_batch_size=async_batch_size, unroll_length=5))
    events: list[str] = []
    for name, event in (("launch_policy_step", "launch"), ("finish_policy_step", "finish"),
                        ("_scale_rewards", "record")):
        original = getattr(learner, name)

        def spy(*args, _original=original, _event=event, **kwargs):
            events.append(_event)
            return _original(*args, **kwargs)

        setattr(learner, name, spy)
    batches = []
    for name in ("step", "recv", "reset"):
        original = getattr(learner.env, name)

        def counted(*args, _original=original):
            batches.append(1)
            return _original(*args)

        setattr(learner.env, name, counted)
    for target in (400, 800):
        learner.train(target)
        # Paused: every batch received so far is recorded (IMPALA flushes the last one).
        expected = len(batches) - (learner.env.num_envs // learner.env.batch_size if algo == "a2c" else 0)
        assert events.count("record") == expected
    launches = events.count("launch")
    assert launches == events.count("finish") > 0
    overlapped = sum(1 for i in range(len(events) - 2) if events[i:i + 3] == ["launch", "record", "finish"])
    # A2C's first step of an unroll acts on the observations its last one received (no batch of
    # its own to account): T - 1 of every T steps overlap. IMPALA's every step but each call's first.
    assert overlapped >= (launches * 4 // 5 if algo == "a2c" else launches - 2)


# ----------------------------------------------------------------------------------------
# Hyperparameters
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_every_numeric_agent_field_is_a_hyperparameter_and_unknown_names_raise(learners, algo):
    learner = learners(make_config(algo))
    values = learner.hyperparameters()
    assert set(values) == set(tunable_agent_fields())
    assert values["lr"] == AgentConfig().lr and values["unroll_length"] == AgentConfig().unroll_length

    with pytest.raises(KeyError, match="learning_rate"):
        learner.set_hyperparameters({"lr": 1e-3, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="unroll_length"):
        learner.set_hyperparameters({"unroll_length": 2.5})
    with pytest.raises(ValueError, match="gamma"):
        learner.set_hyperparameters({"gamma": 1.5})
    assert learner.hyperparameters() == values  # nothing was applied
    assert learner.optimizer.param_groups[0]["lr"] == AgentConfig().lr


@pytest.mark.parametrize("algo", ALGOS)
def test_changing_lr_and_unroll_length_mid_training(learners, algo):
    learner = learners(make_config(algo, num_envs=4, unroll_length=5))
    learner.train(400)
    learner.set_hyperparameters({"lr": 3e-3, "unroll_length": 7, "entropy_cost": 0.05})
    assert learner.optimizer.param_groups[0]["lr"] == 3e-3
    assert learner.hyperparameters()["unroll_length"] == 7

    updates = record_updates(learner)
    report = learner.train(1000)
    assert report.updates > 0 and report.extra["batch_shape"] == [7, 4]
    assert {u.length for u in updates} == {7}
    if algo == "a2c":
        assert learner._unroll.rewards.shape == (7, 4)  # the rollout buffer was resized


def test_optimizer_constants_change_in_place_without_losing_statistics(learners):
    learner = learners(make_config("a2c", rmsprop_momentum=0.0))
    learner.train(200)
    square_avg = {id(p): s["square_avg"].clone() for p, s in learner.optimizer.state.items()}
    learner.set_hyperparameters({"rmsprop_momentum": 0.9, "rmsprop_alpha": 0.95, "optimizer_eps": 1e-4, "lr": 2e-3})
    group = learner.optimizer.param_groups[0]
    assert (group["momentum"], group["alpha"], group["eps"], group["lr"]) == (0.9, 0.95, 1e-4, 2e-3)
    assert all(torch.equal(s["square_avg"], square_avg[id(p)]) for p, s in learner.optimizer.state.items())

    # The next steps are RMSProp with momentum (Tieleman & Hinton 2012; Graves 2013) with the new
    # constants, continuing the kept square averages, momentum buffers starting at zero:
    # v <- a v + (1 - a) g^2,  b <- m b + g / (sqrt(v) + eps),  theta <- theta - lr b.
    momentum = {id(p): torch.zeros_like(p) for p in learner.model.parameters()}
    for seed in range(2):  # the second step carries the first one's momentum
        before = {id(p): (p.detach().clone(), learner.optimizer.state[p]["square_avg"].clone())
                  for p in learner.model.parameters()}
        learner.update(cartpole_unroll(5, 4, seed))
        for name, p in learner.model.named_parameters():
            theta, v = before[id(p)]
            v = 0.95 * v + 0.05 * p.grad**2
            momentum[id(p)] = 0.9 * momentum[id(p)] + p.grad / (v.sqrt() + 1e-4)
            torch.testing.assert_close(p.detach(), theta - 2e-3 * momentum[id(p)], rtol=1e-5, atol=1e-7, msg=name)
            state = learner.optimizer.state[p]
            torch.testing.assert_close(state["square_avg"], v, msg=name)
            torch.testing.assert_close(state["momentum_buffer"], momentum[id(p)], msg=name)
        assert any(b.abs().max() > 0 for b in momentum.values())

    adam = learners(make_config("a2c", optimizer="adam"))
    adam.train(200)
    moments = {id(p): (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), int(s["step"]))
               for p, s in adam.optimizer.state.items()}
    adam.set_hyperparameters({"adam_beta1": 0.5, "adam_beta2": 0.9})
    assert adam.optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    # Adam (Kingma & Ba 2015) with the new betas, continuing the kept moments and step count t:
    # m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
    # theta <- theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    before = {id(p): p.detach().clone() for p in adam.model.parameters()}
    adam.update(cartpole_unroll(5, 4))
    lr, eps = AgentConfig().lr, AgentConfig().optimizer_eps
    for name, p in adam.model.named_parameters():
        m, v, step = moments[id(p)]
        t = step + 1
        m = 0.5 * m + 0.5 * p.grad
        v = 0.9 * v + 0.1 * p.grad**2
        expected = before[id(p)] - lr * (m / (1 - 0.5**t)) / ((v / (1 - 0.9**t)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(adam.optimizer.state[p]["exp_avg"], m, msg=name)


# ----------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_nan_reward_raises_before_any_parameter_changes(learners, algo):
    learner = learners(make_config(algo, num_envs=4))
    learner.train(200)
    before = parameters(learner)
    optimizer_before = {id(p): s["square_avg"].clone() for p, s in learner.optimizer.state.items()}
    updates_before = learner.updates

    original_step = learner.env.step

    def poisoned_step(actions):
        batch = original_step(actions)
        batch.reward = np.full_like(batch.reward, np.nan)
        return batch

    learner.env.step = poisoned_step
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        learner.train(2000)
    assert_same_tensors(parameters(learner), before)
    assert all(torch.equal(s["square_avg"], optimizer_before[id(p)]) for p, s in learner.optimizer.state.items())
    assert learner.updates == updates_before


def test_nan_weights_raise_training_diverged_and_stay_as_they_were(learners):
    learner = learners(make_config("a2c", num_envs=4))
    learner.train(100)
    with torch.no_grad():
        learner.model.value_head.bias.fill_(float("nan"))
    before = parameters(learner)
    with pytest.raises(TrainingDiverged):
        learner.train(1000)
    assert_same_tensors(parameters(learner), before)


@pytest.mark.parametrize("algo", ALGOS)
def test_an_update_with_non_finite_policy_weights_is_refused_as_diverged(learners, algo):
    # The distributions are not validated (a device wait each on a GPU): non-finite logits reach
    # the loss, and the gradient step refuses it, the weights as they were.
    learner = learners(make_config(algo, num_envs=4))
    with torch.no_grad():
        learner.model.policy_head.bias.fill_(float("nan"))
    before = parameters(learner)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        learner.update(cartpole_unroll(5, 4))
    assert_same_tensors(parameters(learner), before)
    assert learner.updates == 0


# ----------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_save_load_gives_the_same_next_actions(learners, algo):
    # Continuous actions (Pendulum) make "same actions" mean same weights, normaliser and RNG.
    config = make_config(algo, "Pendulum-v1", num_envs=4, normalize_observations="on",
                         normalize_returns=True, unroll_length=5)
    saved = learners(config, seed=1)
    saved.train(1000)
    saved.set_hyperparameters({"lr": 2e-3, "unroll_length": 6})
    state = round_trip(saved.state_dict())
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    expected = [saved.act(obs) for _ in range(3)]

    other = learners(config, seed=2)
    other.train(1500)
    other.load_state_dict(state)
    for step, actions in enumerate(expected):  # the same future, draw after draw
        np.testing.assert_array_equal(other.act(obs), actions, err_msg=f"draw {step}")
    assert other.env_steps == state["env_steps"] and other.updates == state["updates"]
    assert other.hyperparameters() == saved.hyperparameters()
    assert other.optimizer.param_groups[0]["lr"] == 2e-3
    np.testing.assert_array_equal(other.obs_normalizer.mean, saved.obs_normalizer.mean)
    np.testing.assert_array_equal(other.reward_scaler.statistics.var, saved.reward_scaler.statistics.var)
    report = other.train(other.env_steps + 600)  # training continues from the loaded member
    assert report.updates > 0 and report.extra["batch_shape"][0] == 6


def test_a2c_resume_reproduces_the_uninterrupted_run(learners):
    """Same seed and same env history: continuing after a load equals never having stopped."""
    config = make_config("a2c", num_envs=4, unroll_length=5)
    reference = learners(config, seed=3)
    reference.train(1000)
    state = round_trip(reference.state_dict())
    reference.train(2000)

    resumed = learners(config, seed=3)
    resumed.train(1000)  # the same env history as the reference
    with torch.no_grad():  # ... then scramble everything the state must restore
        for p in resumed.model.parameters():
            p.add_(1.0)
    resumed.set_hyperparameters({"lr": 0.1, "entropy_cost": 0.5})
    torch.manual_seed(12345)
    resumed.load_state_dict(state)
    resumed.train(2000)
    assert_same_tensors(parameters(resumed), parameters(reference))


@pytest.mark.parametrize("algo", ALGOS)
def test_exploit_load_keeps_own_counters(learners, algo):
    donor = learners(make_config(algo), seed=1)
    donor.train(1000)
    member = learners(make_config(algo), seed=2)
    member.train(300)
    steps, updates, streams = member.env_steps, member.updates, member.state_dict()["rng"]
    member.load_state_dict(donor.state_dict(), resume=False)
    assert (member.env_steps, member.updates) == (steps, updates)
    assert_same_tensors(parameters(member), parameters(donor))
    assert_same_streams(member.state_dict()["rng"], streams)  # its own random streams, not the donor's


def assert_same_streams(a: dict, b: dict) -> None:
    """Two learners' saved generator states (``state_dict()["rng"]``) are equal."""
    assert a.keys() == b.keys() == {"acting", "update"}
    for name in a:
        assert a[name]["device"] == b[name]["device"], name
        assert torch.equal(a[name]["state"], b[name]["state"]), name


# ----------------------------------------------------------------------------------------
# Random streams: a learner's own, and the process's untouched
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_building_a_second_learner_does_not_change_the_first_ones_future(learners, algo):
    """Two learners of the same seed, built and used interleaved, act each as one learner alone."""
    config = make_config(algo, "Pendulum-v1", num_envs=4, unroll_length=5)
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    alone = learners(config, seed=1)
    expected = [alone.act(obs) for _ in range(3)]

    process_stream = torch.get_rng_state()
    first = learners(config, seed=1)
    first_actions = [first.act(obs)]
    second = learners(config, seed=1)  # a learner that seeded the process would restart first's stream here
    second_actions = [second.act(obs)]
    first_actions.append(first.act(obs))
    second_actions.append(second.act(obs))
    first_actions.append(first.act(obs))
    for step, actions in enumerate(expected[:2]):
        np.testing.assert_array_equal(second_actions[step], actions, err_msg=f"second learner, draw {step}")
    for step, actions in enumerate(expected):
        np.testing.assert_array_equal(first_actions[step], actions, err_msg=f"first learner, draw {step}")
    assert torch.equal(torch.get_rng_state(), process_stream)  # nobody drew from the process's generator


def test_interleaved_a2c_training_equals_training_alone(learners):
    config = make_config("a2c", num_envs=4, unroll_length=5)
    alone = learners(config, seed=4)
    alone.train(500)
    alone.train(1000)

    process_stream = torch.get_rng_state()
    first = learners(config, seed=4)
    first.train(500)
    second = learners(config, seed=4)
    second.train(700)
    first.train(1000)
    assert_same_tensors(parameters(first), parameters(alone))
    assert torch.equal(torch.get_rng_state(), process_stream)


def test_learners_built_in_parallel_threads_get_their_own_seeds_weights():
    """Members of one host process build their learners in parallel threads (runtime/member_host.py).

    The first build pauses half-way until the second build is inside its own ``build`` (which
    means the second has seeded the process's generator), or for at most 2 s: builds that were not
    kept apart would finish the first model from the second's seed."""
    import threading

    from pbt_rl.agents.state import seeded_build

    def layers() -> list[torch.nn.Linear]:
        return [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]

    reference, _, _ = seeded_build(11, torch.device("cpu"), lambda: torch.nn.Sequential(*layers()))
    second_inside = threading.Event()

    def first_build() -> torch.nn.Module:
        head = torch.nn.Linear(8, 8)
        second_inside.wait(timeout=2.0)
        return torch.nn.Sequential(head, torch.nn.Linear(8, 8))

    def second_build() -> torch.nn.Module:
        second_inside.set()
        return torch.nn.Sequential(*layers())

    built: dict[str, torch.nn.Module] = {}
    first = threading.Thread(target=lambda: built.update(first=seeded_build(11, torch.device("cpu"), first_build)[0]))
    first.start()
    second = threading.Thread(target=lambda: built.update(second=seeded_build(12, torch.device("cpu"), second_build)[0]))
    second.start()
    first.join()
    second.join()
    assert all(torch.equal(a, b) for a, b in zip(built["first"].state_dict().values(),
                                                               reference.state_dict().values()))


@pytest.mark.parametrize("algo", ALGOS)
def test_acting_and_update_draw_from_separate_generators(learners, algo):
    """Acting (IMPALA: the actor thread) draws only from the acting generator, minibatch
    permutations (IMPALA: the learner thread) only from the update generator: more permutations
    leave the acting stream where it was, and the update stream advances by exactly the
    permutations of the update."""
    num_envs, epochs, minibatches = 4, 2, 2
    one_step = learners(make_config(algo, num_envs=num_envs), seed=5)
    permuting = learners(make_config(algo, num_envs=num_envs, num_epochs=epochs, num_minibatches=minibatches,
                                     ppo_clip=0.2), seed=5)
    initial = permuting.state_dict()["rng"]
    assert_same_streams(one_step.state_dict()["rng"], initial)  # same seed, same streams

    one_step.train(1200)
    report = permuting.train(1200)
    after = permuting.state_dict()["rng"]
    assert one_step.env_steps == permuting.env_steps
    assert torch.equal(after["acting"]["state"], one_step.state_dict()["rng"]["acting"]["state"])
    assert not torch.equal(after["acting"]["state"], initial["acting"]["state"])
    assert torch.equal(one_step.state_dict()["rng"]["update"]["state"], initial["update"]["state"])  # no permutation

    batches = report.updates // (epochs * minibatches)
    assert batches > 0
    expected = torch.Generator()
    expected.set_state(initial["update"]["state"])
    for _ in range(batches * epochs):
        torch.randperm(num_envs, generator=expected)
    assert torch.equal(after["update"]["state"], expected.get_state())


def non_plain_values(value, where: str = "state") -> list[str]:
    """Where a nested state holds anything but tensors and plain Python values (or non-str/int keys)."""
    if isinstance(value, dict):
        keys = [f"{where}: key {key!r}" for key in value if not isinstance(key, (str, int))]
        return keys + [path for key, item in value.items() for path in non_plain_values(item, f"{where}/{key}")]
    if isinstance(value, (list, tuple)):
        return [path for i, item in enumerate(value) for path in non_plain_values(item, f"{where}/{i}")]
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return []
    return [f"{where}: {type(value).__name__}"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_learner_state_loads_with_weights_only(learners, algo, optimizer):
    config = make_config(algo, "Pendulum-v1", normalize_observations="on", normalize_returns=True,
                         optimizer=optimizer, num_minibatches=2)
    learner = learners(config, seed=1)
    learner.train(400)
    state = learner.state_dict()
    assert non_plain_values(state) == []
    loaded = round_trip(state)  # torch.load(..., weights_only=True)
    other = learners(config, seed=2)
    other.load_state_dict(loaded)
    assert_same_tensors(parameters(other), parameters(learner))
    assert_same_streams(other.state_dict()["rng"], state["rng"])


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


class _FakeDriver:
    """Stands in for libcuda: records the driver calls of :func:`set_gpu_wait`."""

    def __init__(self, init_status: int = 0, with_v2: bool = True) -> None:
        self.calls: list[tuple] = []
        self.init_status = init_status
        if with_v2:
            self.cuDevicePrimaryCtxSetFlags_v2 = self._set_flags

    def cuInit(self, flags):
        self.calls.append(("init", flags))
        return self.init_status

    def cuDeviceGet(self, handle, ordinal):
        self.calls.append(("device", ordinal))
        return 0

    def _set_flags(self, handle, flags):
        self.calls.append(("flags", flags.value))
        return 0


def use_driver(monkeypatch, driver) -> list[str]:
    """Make ``driver`` the CUDA driver library; returns the list of times it was loaded."""
    from pbt_rl.agents import device

    loads: list[str] = []

    def load():
        loads.append("libcuda")
        return driver

    monkeypatch.setattr(device, "load_cuda_driver", load)
    return loads


@pytest.mark.parametrize("mode, flags", [("block", 0x04), ("yield", 0x02), ("spin", 0x01)])
def test_set_gpu_wait_sets_the_primary_context_scheduling_flag(monkeypatch, mode, flags):
    from pbt_rl.agents.device import set_gpu_wait

    driver = _FakeDriver()
    use_driver(monkeypatch, driver)
    assert set_gpu_wait(torch.device("cuda:1"), mode)
    assert driver.calls == [("init", 0), ("device", 1), ("flags", flags)]


def test_set_gpu_wait_changes_nothing_without_a_usable_driver(monkeypatch):
    from pbt_rl.agents.device import set_gpu_wait

    loads = use_driver(monkeypatch, _FakeDriver())
    assert not set_gpu_wait(torch.device("cpu"), "block")
    assert not set_gpu_wait(torch.device("cuda"), "auto")
    assert loads == []  # a CPU learner, or CUDA's own choice, never touches the driver
    use_driver(monkeypatch, None)  # no libcuda.so.1
    assert not set_gpu_wait(torch.device("cuda"), "block")
    use_driver(monkeypatch, _FakeDriver(with_v2=False))
    assert not set_gpu_wait(torch.device("cuda"), "block")
    failing = _FakeDriver(init_status=100)  # CUDA_ERROR_NO_DEVICE
    use_driver(monkeypatch, failing)
    assert not set_gpu_wait(torch.device("cuda"), "block")
    assert ("flags", 0x04) not in failing.calls


class _FakeEvent:
    """A recorded CUDA event that has happened after ``pending`` queries."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.queries > self.pending


def test_a_learners_update_end_sleeps_until_the_device_is_done_and_not_at_all_on_the_cpu(monkeypatch):
    from pbt_rl.agents import device

    sleeps: list[float] = []
    monkeypatch.setattr(device.time, "sleep", sleeps.append)
    event = _FakeEvent(2)
    device.sleep_until(event, 0.5)
    assert sleeps == [0.5, 0.5] and event.queries == 3
    sleeps.clear()
    device.sleep_until_done(torch.device("cpu"))  # nothing queued anywhere: returns at once
    assert sleeps == []


def test_unrolls_concatenate_side_by_side_with_their_dtypes_and_observations_on_a_device_stay_tensors():
    first, second = cartpole_unroll(4, 2, seed=0), cartpole_unroll(4, 3, seed=1)
    second.policy_version = 5
    joined = Unroll.concatenate([first, second])
    for name in ("obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid", "policy_updates"):
        expected = np.concatenate([getattr(first, name), getattr(second, name)], axis=1)
        np.testing.assert_array_equal(getattr(joined, name), expected, err_msg=name)
        assert getattr(joined, name).dtype == expected.dtype, name
    assert joined.num_envs == 5 and joined.policy_version == 0
    on_device = [dataclasses.replace(u, obs=torch.from_numpy(u.obs)) for u in (first, second)]  # as the device rings cut
    joined_tensors = Unroll.concatenate(on_device)
    assert isinstance(joined_tensors.obs, torch.Tensor)
    np.testing.assert_array_equal(joined_tensors.obs.numpy(), joined.obs)
