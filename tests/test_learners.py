"""The learner contract (docs/design.md) for A2C and IMPALA: smoke runs on MuJoCo and Atari,
hyperparameter changes, divergence and reports. State and random streams: test_learner_state.py;
the IMPALA actor thread: test_impala_actor.py; GPU waits and unroll concatenation: test_device_waits.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from learner_support import ALGOS, assert_same_tensors, cartpole_unroll, make_config, parameters, record_updates
from pbt_rl.agents import TrainingDiverged
from pbt_rl.agents.rollout import Unroll
from pbt_rl.config import AgentConfig, tunable_agent_fields


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
