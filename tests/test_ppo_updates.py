"""Multi-epoch, minibatched, PPO-clipped updates (agent.num_epochs, num_minibatches, ppo_clip,
normalize_advantages): the clipped surrogate against the PPO paper's definition, the defaults
against a naive per-step computation of the classic single A2C / IMPALA step, minibatch
bookkeeping, the unweighted V-trace advantage of APPO against the naive V-trace. The CartPole learning check with these updates is in tests/test_learning.py."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from learner_support import assert_same_tensors, cartpole_unroll, make_config, parameters, round_trip
from pbt_rl.agents import TrainingDiverged
from pbt_rl.agents.losses import ValidSteps, actor_critic_loss, masked_mean, normalized_advantages
from pbt_rl.agents.rollout import Unroll
from pbt_rl.agents.vtrace import vtrace
from pbt_rl.config import AgentConfig, ConfigError, from_dict
from references import naive_lambda_returns, naive_vtrace, random_off_policy_unroll

ALGOS = ["a2c", "impala"]


# ----------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------


def naive_clipped_policy_loss(log_probs, behaviour_log_probs, advantages, valid, eps):
    """PPO's L^CLIP (Schulman et al. 2017, eq. 7), negated, one step at a time:
    -mean over valid steps of min(r A, clip(r, 1 - eps, 1 + eps) A), r = pi / mu."""
    terms = []
    for t in range(log_probs.shape[0]):
        for b in range(log_probs.shape[1]):
            if not valid[t, b]:
                continue
            ratio = torch.exp(log_probs[t, b] - behaviour_log_probs[t, b])
            advantage = float(advantages[t, b])
            low, high = (torch.tensor(bound, dtype=ratio.dtype) for bound in (1.0 - eps, 1.0 + eps))
            clipped = min(max(ratio, low), high)
            terms.append(min(ratio * advantage, clipped * advantage))
    return -sum(terms) / len(terms)


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.5])
def test_clipped_surrogate_matches_the_ppo_paper_value_and_gradient(eps):
    T, B = 5, 3
    gen = torch.Generator().manual_seed(0)
    behaviour = torch.log(torch.rand(T, B, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    # Ratios between e^-1.5 and e^1.5: clipped from below and from above, with either sign of A.
    log_probs = (behaviour + (torch.rand(T, B, generator=gen, dtype=torch.float64) * 2 - 1) * 1.5).requires_grad_()
    advantages = torch.randn(T, B, generator=gen, dtype=torch.float64)
    valid = torch.ones(T, B, dtype=torch.bool)
    valid[2, 1] = valid[4, 0] = False
    behaviour_poisoned = torch.where(valid, behaviour, torch.full_like(behaviour, -math.inf))
    zeros = torch.zeros(T, B, dtype=torch.float64)
    agent = AgentConfig(ppo_clip=eps, value_cost=0.0, entropy_cost=0.0)

    loss, parts = actor_critic_loss(log_probs, zeros, zeros, advantages, zeros, valid.double(), agent,
                                    behaviour_log_probs=behaviour_poisoned)
    (gradient,) = torch.autograd.grad(loss, log_probs)
    reference_log_probs = log_probs.detach().clone().requires_grad_()
    reference = naive_clipped_policy_loss(reference_log_probs, behaviour, advantages, valid, eps)
    (reference_gradient,) = torch.autograd.grad(reference, reference_log_probs)

    ratios = torch.exp(log_probs.detach() - behaviour)[valid]
    assert (ratios < 1 - eps).any() and (ratios > 1 + eps).any()  # both clips are exercised
    torch.testing.assert_close(parts["policy_loss"], reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, reference_gradient, rtol=1e-12, atol=1e-12)
    assert (gradient[~valid] == 0).all()
    assert (gradient == 0).any()  # clipped steps push no further


def test_clip_zero_is_the_plain_policy_gradient_and_needs_no_behaviour_policy():
    gen = torch.Generator().manual_seed(1)
    log_probs, advantages = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    zeros = torch.zeros(4, 2)
    _, parts = actor_critic_loss(log_probs, zeros, zeros, advantages, zeros, mask, AgentConfig())
    assert torch.equal(parts["policy_loss"], -masked_mean(advantages * log_probs, mask))
    with pytest.raises(ValueError, match="behaviour_log_probs"):
        actor_critic_loss(log_probs, zeros, zeros, advantages, zeros, mask, AgentConfig(ppo_clip=0.2))


def test_the_masked_mean_is_over_the_valid_steps_only_whatever_the_others_hold():
    values = torch.tensor([[1.0, math.inf], [3.0, math.nan], [-math.inf, 8.0]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False], [True, False], [False, True]])
    for mask in (valid, valid.double(), ValidSteps(valid)):
        mean = masked_mean(values, mask)
        assert mean.item() == pytest.approx(4.0)
        (grad,) = torch.autograd.grad(mean, values)
        assert torch.equal(grad, valid.double() / 3)  # nothing flows to (or from) the masked steps
    assert masked_mean(values, torch.zeros(3, 2, dtype=torch.bool)).item() == 0.0  # no valid step: 0


def test_normalized_advantages_have_mean_zero_and_std_one_over_valid_steps():
    gen = torch.Generator().manual_seed(2)
    advantages = 5.0 + 3.0 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 4, generator=gen) > 0.3).double()
    advantages = torch.where(mask > 0, advantages, torch.full_like(advantages, 1e6))  # junk at masked steps
    normalized = normalized_advantages(advantages, mask)
    valid = normalized[mask > 0]
    assert abs(valid.mean().item()) < 1e-9
    assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)

    # In the loss: shifting and scaling the advantages then changes nothing.
    log_probs, zeros = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    agent = AgentConfig(normalize_advantages=True)
    _, parts = actor_critic_loss(log_probs, zeros, zeros, advantages, zeros, mask, agent)
    _, moved = actor_critic_loss(log_probs, zeros, zeros, 10.0 * advantages - 7.0, zeros, mask, agent)
    torch.testing.assert_close(parts["policy_loss"], -masked_mean(normalized * log_probs, mask))
    torch.testing.assert_close(moved["policy_loss"], parts["policy_loss"])


# ----------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------


class NaiveClassicStep:
    """The classic A2C / IMPALA gradient step from the papers' definitions, one env step at a time.

    Per step: ``log pi(a|x)``, ``H(pi(.|x))`` and ``V(x)`` from a copy of the network, one
    observation at a time; targets ``G`` and advantages ``A`` (A2C: λ-returns, ``A = G - V``;
    IMPALA: V-trace's ``v_s`` and ``min(ρ̄_pg, π/μ) (r + d q - V)``, ``π/μ = 1`` at auto-reset
    steps) from the naive references; the loss
    ``-mean(A log pi) + value_cost mean((G - V)^2) - entropy_cost mean(H)`` over the valid steps,
    its gradient clipped to the global norm ``max_grad_norm``, and an RMSProp step
    ``v <- a v + (1 - a) g^2, theta <- theta - lr g / (sqrt(v) + eps)``.
    """

    def __init__(self, learner) -> None:
        self.model = copy.deepcopy(learner.model)
        self.agent = learner.agent_cfg
        self.algo = learner.algo
        self.square_avg = [torch.zeros_like(p) for p in self.model.parameters()]

    def step(self, weights: dict[str, torch.Tensor], unroll: Unroll) -> dict[str, float]:
        """One step from ``weights`` (this reference keeps its own square averages)."""
        self.model.load_state_dict(weights)
        agent, (T, B) = self.agent, unroll.rewards.shape
        log_pi, entropy, value = {}, {}, {}
        for t in range(T + 1):
            for b in range(B):
                logits, v = self.model(torch.as_tensor(unroll.obs[t, b])[None])
                value[t, b] = v[0]
                if t < T:
                    log_softmax = logits[0] - torch.logsumexp(logits[0], dim=0)
                    log_pi[t, b] = log_softmax[int(unroll.actions[t, b])]
                    entropy[t, b] = -(log_softmax.exp() * log_softmax).sum()
        values = np.array([[value[t, b].item() for b in range(B)] for t in range(T)])
        bootstrap = np.array([value[T, b].item() for b in range(B)])
        discounts = agent.gamma * (1.0 - unroll.terminated)
        if self.algo == "a2c":
            targets = naive_lambda_returns(unroll.rewards, values, bootstrap, discounts, unroll.truncated,
                                           agent.td_lambda)
            advantages = targets - values
        else:
            log_rhos = [[log_pi[t, b].item() - float(unroll.behaviour_log_probs[t, b]) if unroll.valid[t, b] else 0.0
                         for b in range(B)] for t in range(T)]
            targets, advantages, _ = naive_vtrace(log_rhos, unroll.rewards, values, bootstrap, discounts,
                                                  unroll.truncated, agent.vtrace_rho_clip, agent.vtrace_c_clip,
                                                  agent.vtrace_pg_rho_clip, agent.td_lambda)
        valid = [(t, b) for t in range(T) for b in range(B) if unroll.valid[t, b]]
        policy_loss = -sum(float(advantages[i]) * log_pi[i] for i in valid) / len(valid)
        value_loss = sum((float(targets[i]) - value[i]) ** 2 for i in valid) / len(valid)
        mean_entropy = sum(entropy[i] for i in valid) / len(valid)
        total = policy_loss + agent.value_cost * value_loss - agent.entropy_cost * mean_entropy

        params = list(self.model.parameters())
        grads = torch.autograd.grad(total, params)
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        scale = min(1.0, agent.max_grad_norm / (norm + 1e-6))
        with torch.no_grad():
            for p, g, v in zip(params, grads, self.square_avg):
                g = g * scale
                v.mul_(agent.rmsprop_alpha).add_((1.0 - agent.rmsprop_alpha) * g**2)
                p.sub_(agent.lr * g / (v.sqrt() + agent.optimizer_eps))
        parts = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": mean_entropy, "total_loss": total}
        return {**{name: float(part.detach()) for name, part in parts.items()}, "grad_norm": norm}


@pytest.mark.parametrize("algo", ALGOS)
def test_defaults_are_the_classic_single_gradient_step(learners, algo):
    config = make_config(algo, num_envs=4)
    assert (config.agent.num_epochs, config.agent.num_minibatches, config.agent.ppo_clip) == (1, 1, 0.0)
    assert not config.agent.normalize_advantages and config.agent.optimizer == "rmsprop"
    learner = learners(config, seed=3)
    reference = NaiveClassicStep(learner)
    for seed in range(3):  # RMSProp's square averages carry over from step to step
        unroll = cartpole_unroll(6, 4, seed)
        before = parameters(learner)
        update_stream = learner.state_dict()["rng"]["update"]["state"]
        expected = reference.step(learner.model.state_dict(), unroll)
        stats = learner.update(unroll)
        assert learner.updates == seed + 1  # one gradient step per batch
        assert torch.equal(learner.state_dict()["rng"]["update"]["state"], update_stream)  # no permutation drawn
        for name, value in expected.items():
            assert stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] > 0  # off-policy unroll, nothing clipped
        for name, p in reference.model.named_parameters():
            torch.testing.assert_close(parameters(learner)[name] - before[name], p.detach() - before[name],
                                       rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("algo", ALGOS)
def test_epochs_times_minibatches_gradient_steps_over_whole_unrolls(learners, algo):
    learner = learners(make_config(algo, num_envs=4, num_epochs=3, num_minibatches=2, ppo_clip=0.2))
    unroll = cartpole_unroll(6, 4)
    seen_columns = []
    original = learner.minibatch_step

    def minibatch_step(batch):
        obs = batch["obs"].numpy()  # [T + 1, b, 4]
        # Every minibatch column is one whole column (unroll) of the batch.
        columns = [next(c for c in range(4) if np.array_equal(obs[:, j], unroll.obs[:, c])) for j in range(obs.shape[1])]
        for j, column in enumerate(columns):
            np.testing.assert_array_equal(batch["rewards"][:, j].numpy(), unroll.rewards[:, column])
            np.testing.assert_array_equal(batch["valid"][:, j].numpy(), unroll.valid[:, column])
        seen_columns.append(columns)
        return original(batch)

    learner.minibatch_step = minibatch_step
    stats = learner.update(unroll)

    assert learner.updates == 6 and len(seen_columns) == 6
    assert all(state["step"] == 6 for state in learner.optimizer.state.values())
    for epoch in range(3):  # each pass covers every env exactly once, in two halves
        first, second = seen_columns[2 * epoch: 2 * epoch + 2]
        assert len(first) == len(second) == 2 and sorted(first + second) == [0, 1, 2, 3]
    assert 0.0 < stats["clip_fraction"] <= 1.0 and stats["approx_kl"] > 0
    assert all(math.isfinite(value) for value in stats.values())


def test_more_minibatches_than_envs_takes_one_env_per_step(learners):
    learner = learners(make_config("a2c", num_envs=3, num_epochs=2, num_minibatches=8))
    widths = []
    original = learner.minibatch_step

    def minibatch_step(batch):
        widths.append(batch["rewards"].shape[1])
        return original(batch)

    learner.minibatch_step = minibatch_step
    learner.update(cartpole_unroll(5, 3))
    assert widths == [1] * 6 and learner.updates == 6


def test_minibatch_order_comes_from_the_saved_update_generator(learners):
    config = make_config("impala", num_envs=4, num_epochs=2, num_minibatches=4, ppo_clip=0.1)
    unroll = cartpole_unroll(6, 4)
    reference = learners(config, seed=1)
    state = round_trip(reference.state_dict())
    reference.update(unroll)

    resumed = learners(config, seed=2)
    torch.manual_seed(12345)
    resumed.load_state_dict(state)
    resumed.update(unroll)
    assert_same_tensors(parameters(resumed), parameters(reference))


def test_a_diverged_minibatch_step_is_not_applied_but_earlier_ones_are(learners):
    learner = learners(make_config("a2c", num_envs=4, num_minibatches=2, ppo_clip=0.2))
    after_each_step = []
    original_step, original_targets = learner.gradient_step, learner.targets
    calls = {"targets": 0}

    def gradient_step(loss):
        grad_norm = original_step(loss)
        after_each_step.append(parameters(learner))
        return grad_norm

    def targets(*args):
        calls["targets"] += 1
        advantages, value_targets = original_targets(*args)
        return (advantages * math.nan if calls["targets"] == 2 else advantages), value_targets

    learner.gradient_step, learner.targets = gradient_step, targets
    before = parameters(learner)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        learner.update(cartpole_unroll(6, 4))
    assert len(after_each_step) == 1 and learner.updates == 1
    assert_same_tensors(parameters(learner), after_each_step[0])
    assert any(not torch.equal(before[name], value) for name, value in after_each_step[0].items())


def test_train_reports_ratio_statistics_beside_the_losses(learners):
    learner = learners(make_config("a2c", num_envs=4, num_epochs=2, num_minibatches=2, ppo_clip=0.2,
                                   normalize_advantages=True))
    report = learner.train(400)
    assert set(report.losses) == {"policy_loss", "value_loss", "entropy", "total_loss"}
    assert 0.0 <= report.extra["clip_fraction"] <= 1.0 and report.extra["approx_kl"] >= -1e-6
    assert report.extra["updates_total"] == learner.updates == report.updates  # gradient steps


# ----------------------------------------------------------------------------------------
# IMPALA + clip: the unweighted V-trace advantage
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pg_rho_clip,lam", [(1.0, 1.0), (0.7, 0.9), (2.5, 0.5)])
def test_unweighted_vtrace_advantage_matches_naive_reference(pg_rho_clip, lam):
    for seed in range(3):
        behaviour, target, rewards, values, bootstrap, discounts, cut = random_off_policy_unroll(7, 3, seed)
        out = vtrace(behaviour, target, rewards, values, bootstrap, discounts, cut, 1.0, 1.0, pg_rho_clip, lam)
        _, _, expected = naive_vtrace(target - behaviour, rewards, values, bootstrap, discounts, cut, 1.0, 1.0,
                                      pg_rho_clip, lam)
        np.testing.assert_allclose(out.advantages.numpy(), expected, rtol=1e-10, atol=1e-10)
        pg_rhos = torch.clamp(torch.exp(target - behaviour), max=pg_rho_clip)
        torch.testing.assert_close(out.advantages, out.pg_advantages / pg_rhos, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ppo_clip", [0.0, 0.2])
def test_impala_uses_the_unweighted_advantage_only_with_the_clip(learners, ppo_clip):
    """IMPALA's targets are V-trace's (eq. 1 of the paper, naive reference) with π/μ = 1 at
    auto-reset steps; the advantage is the weighted ``min(ρ̄_pg, π/μ) (r + d q - V)`` without the
    PPO clip and the unweighted ``r + d q - V`` with it (APPO)."""
    learner = learners(make_config("impala", num_envs=3, ppo_clip=ppo_clip, vtrace_pg_rho_clip=0.8))
    unroll = cartpole_unroll(5, 3)
    batch = learner._batch_tensors(unroll)
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.log(torch.rand(5, 3, generator=gen) * 0.9 + 0.05)
    values, bootstrap = torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen)
    advantages, value_targets = learner.targets(batch, log_probs, values, bootstrap)

    log_rhos = np.where(unroll.valid, log_probs.numpy() - unroll.behaviour_log_probs, 0.0)
    discounts = 0.99 * (1.0 - unroll.terminated)
    vs, weighted, unweighted = naive_vtrace(log_rhos, unroll.rewards, values.numpy(), bootstrap.numpy(), discounts,
                                            unroll.truncated, 1.0, 1.0, 0.8, 1.0)
    np.testing.assert_allclose(value_targets.numpy(), vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages.numpy(), unweighted if ppo_clip > 0 else weighted, rtol=1e-5, atol=1e-5)
    assert not np.allclose(weighted, unweighted, rtol=1e-3)  # the two choices differ on this unroll


# ----------------------------------------------------------------------------------------
# Hyperparameters and config
# ----------------------------------------------------------------------------------------


def test_set_hyperparameters_changes_epochs_minibatches_and_clip(learners):
    learner = learners(make_config("a2c", num_envs=4))
    values = learner.hyperparameters()
    assert (values["num_epochs"], values["num_minibatches"], values["ppo_clip"]) == (1, 1, 0.0)
    assert "normalize_advantages" not in values  # a switch, not a number PBT can perturb

    learner.set_hyperparameters({"num_epochs": 3.0, "num_minibatches": 2, "ppo_clip": 0.25})
    assert learner.agent_cfg.num_epochs == 3 and isinstance(learner.agent_cfg.num_epochs, int)
    assert learner.hyperparameters()["ppo_clip"] == 0.25
    learner.update(cartpole_unroll(5, 4))
    assert learner.updates == 6

    for bad in ({"ppo_clip": 1.0}, {"num_epochs": 0}, {"num_epochs": 101}, {"num_minibatches": 0},
                {"num_epochs": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            learner.set_hyperparameters(bad)
    assert learner.hyperparameters()["num_epochs"] == 3


@pytest.mark.parametrize("key,value", [("ppo_clip", 1.5), ("ppo_clip", -0.1), ("num_epochs", 0),
                                       ("num_minibatches", 0)])
def test_config_rejects_out_of_range_values_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"agent.{key}"):
        from_dict({"agent": {key: value}})


def test_config_accepts_ppo_settings_and_a_search_space_over_them():
    config = from_dict({
        "agent": {"num_epochs": 4, "num_minibatches": 4, "ppo_clip": 0.2, "normalize_advantages": True},
        "pbt": {"population_size": 2, "search_space": {
            "num_epochs": {"kind": "int", "low": 1, "high": 8},
            "ppo_clip": {"kind": "uniform", "low": 0.1, "high": 0.3},
        }},
    })
    assert (config.agent.num_epochs, config.agent.num_minibatches, config.agent.ppo_clip) == (4, 4, 0.2)
    assert config.agent.normalize_advantages is True
