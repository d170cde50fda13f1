"""Reference implementations for the learner tests, written from the papers' definitions one step
at a time (python floats and loops), independently of the code under test.

- :func:`naive_lambda_returns`: the forward-view λ-return (Sutton & Barto 2018, eq. 12.9) as an
  explicit weighted sum of n-step returns;
- :func:`naive_gae`: generalised advantage estimation (Schulman et al. 2016, eq. 16) from its
  TD-error form;
- :func:`naive_vtrace`: V-trace (Espeholt et al. 2018, eq. 1) as an explicit double sum, with
  the policy-gradient advantage of section 4.2, weighted and unweighted.

Step semantics as in ``pbt_rl.agents.returns``: ``discounts[t] = gamma * (1 - terminated[t])``;
at a truncated (``cut``) step the target bootstraps from ``V(x_{t+1})`` and nothing later reaches it.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def random_unroll(T: int, B: int, seed: int, gamma: float = 0.9, p_end: float = 0.2):
    """Random [T, B] float64 ``(rewards, values, bootstrap [B], discounts, truncated)`` with
    terminations and truncations inside it."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, B, generator=gen, dtype=torch.float64)
    values = torch.randn(T, B, generator=gen, dtype=torch.float64)
    bootstrap = torch.randn(B, generator=gen, dtype=torch.float64)
    terminated = torch.rand(T, B, generator=gen) < p_end
    truncated = torch.rand(T, B, generator=gen) < p_end
    discounts = gamma * (~terminated).double()
    return rewards, values, bootstrap, discounts, truncated


def random_off_policy_unroll(T: int, B: int, seed: int, gamma: float = 0.95, p_end: float = 0.2):
    """:func:`random_unroll` with behaviour and target log-probabilities in front:
    ``(behaviour, target, rewards, values, bootstrap, discounts, truncated)``."""
    gen = torch.Generator().manual_seed(seed)
    behaviour = torch.log(torch.rand(T, B, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    target = torch.log(torch.rand(T, B, generator=gen, dtype=torch.float64) * 0.9 + 0.05)
    return (behaviour, target, *random_unroll(T, B, seed + 1, gamma, p_end))


def naive_lambda_returns(rewards, values, bootstrap, discounts, cut, lam) -> np.ndarray:
    """Forward-view λ-return as an explicit weighted sum of n-step returns, per env. [T, B]

    G_t = sum_n w_n G_t^(n): within an episode segment that ends (termination, truncation or the
    unroll end) at step e, G_t = (1-λ) sum_{n=1}^{e-t} λ^{n-1} G^(n)_t + λ^{e-t} G^(e-t+1)_t,
    where G^(n)_t is the n-step return bootstrapped from V(x_{t+n}).
    """
    r, v, boot, d, c = (np.asarray(x, dtype=np.float64) for x in (rewards, values, bootstrap, discounts, cut))
    T, B = r.shape
    next_v = np.concatenate([v[1:], boot[None]], axis=0)
    out = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            # last step whose target may follow from t: the trace stops after a cut or at T-1;
            # a termination needs no special case because its discount zeroes everything later.
            end = t
            while end < T - 1 and not c[end, b]:
                end += 1

            def n_step(n):  # return using steps t..t+n-1, bootstrapped from V(x_{t+n})
                total, scale = 0.0, 1.0
                for k in range(t, t + n):
                    total += scale * r[k, b]
                    scale *= d[k, b]
                return total + scale * next_v[t + n - 1, b]

            horizon = end - t + 1
            total = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, horizon))
            out[t, b] = total + lam ** (horizon - 1) * n_step(horizon)
    return out


def naive_gae(rewards, values, bootstrap, discounts, cut, lam) -> np.ndarray:
    """GAE, A_t = sum_{l >= 0} (prod_{i=t}^{t+l-1} d_i λ) δ_{t+l} with δ_t = r_t + d_t V(x_{t+1}) - V(x_t),
    the sum stopping after a cut step and at the end of the unroll. [T, B]"""
    r, v, boot, d, c = (np.asarray(x, dtype=np.float64) for x in (rewards, values, bootstrap, discounts, cut))
    T, B = r.shape
    out = np.zeros((T, B))
    for b in range(B):
        def value(t):
            return boot[b] if t == T else v[t, b]

        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                total += weight * (r[k, b] + d[k, b] * value(k + 1) - v[k, b])
                if c[k, b]:
                    break
                weight *= d[k, b] * lam
            out[t, b] = total
    return out


def naive_vtrace(log_rhos, rewards, values, bootstrap, discounts, cut, rho_clip, c_clip, pg_rho_clip, lam):
    """Eq. (1) of Espeholt et al. (2018) as an explicit double sum, python floats only.

    v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} d_i c_i) δ_t with c_i = 0 at a cut step.
    Returns ``(vs, pg, advantages)`` [T, B]: the targets, the policy-gradient advantage
    ρ^pg_s (r_s + d_s q_{s+1} - V(x_s)) and the same advantage without the ρ^pg_s weight, where
    q_{s+1} is v_{s+1}, V(x_{s+1}) after a cut step, or the bootstrap value after the last step.
    """
    log_rhos, rewards, values, discounts, cut = (np.asarray(x, dtype=np.float64) for x in (log_rhos, rewards, values, discounts, cut))
    bootstrap = np.asarray(bootstrap, dtype=np.float64)
    T, B = rewards.shape
    vs = np.zeros((T, B))
    pg = np.zeros((T, B))
    advantages = np.zeros((T, B))
    for b in range(B):
        def value(t):
            return bootstrap[b] if t == T else values[t, b]

        def rho(t):
            return min(rho_clip, math.exp(log_rhos[t, b]))

        def c(i):
            return 0.0 if cut[i, b] else lam * min(c_clip, math.exp(log_rhos[i, b]))

        def delta(t):
            return rho(t) * (rewards[t, b] + discounts[t, b] * value(t + 1) - value(t))

        for s in range(T):
            total = value(s)
            for t in range(s, T):
                weight = 1.0
                for i in range(s, t):
                    weight *= discounts[i, b] * c(i)
                total += weight * delta(t)
            vs[s, b] = total
        for s in range(T):
            if s == T - 1:
                q_next = bootstrap[b]
            elif cut[s, b]:
                q_next = values[s + 1, b]
            else:
                q_next = vs[s + 1, b]
            advantages[s, b] = rewards[s, b] + discounts[s, b] * q_next - values[s, b]
            pg[s, b] = min(pg_rho_clip, math.exp(log_rhos[s, b])) * advantages[s, b]
    return vs, pg, advantages


class NaiveEnvTrajectories:
    """agents/trajectories.py's definition, one env at a time with Python lists: env ``e``'s
    observations ``obs[e]`` (the last one still to be acted on) and its completed steps; a cut
    takes the first ``length`` steps of the ``group_size`` envs with the most steps (lower ids
    first among equals) and the observation after them."""

    def __init__(self, num_envs: int) -> None:
        self.obs = [[] for _ in range(num_envs)]
        self.steps = [[] for _ in range(num_envs)]
        self.pending = [None] * num_envs

    def drop_experience(self) -> None:
        for e in range(len(self.obs)):
            self.obs[e] = self.obs[e][-1:] if self.pending[e] is None else []
            self.steps[e], self.pending[e] = [], None

    def receive(self, env_ids, obs, rewards, terminated, truncated, is_first) -> None:
        for row, e in enumerate(env_ids):
            if self.pending[e] is None:
                self.obs[e], self.steps[e] = [], []
            else:
                action, log_prob, updates = self.pending[e]
                self.steps[e].append((action, log_prob, updates, rewards[row], terminated[row], truncated[row],
                                      not is_first[row]))
                self.pending[e] = None
            self.obs[e].append(np.array(obs[row]))

    def sent(self, env_ids, actions, log_probs, policy_updates) -> None:
        for row, e in enumerate(env_ids):
            self.pending[e] = (np.array(actions[row]), log_probs[row], policy_updates)

    def cut(self, length: int, group_size: int):
        ready = sorted((e for e in range(len(self.steps)) if len(self.steps[e]) >= length),
                       key=lambda e: (-len(self.steps[e]), e))
        if len(ready) < group_size:
            return None
        group = ready[:group_size]
        columns = {"obs": [self.obs[e][: length + 1] for e in group]}
        names = ("actions", "behaviour_log_probs", "policy_updates", "rewards", "terminated", "truncated", "valid")
        for index, name in enumerate(names):
            columns[name] = [[step[index] for step in self.steps[e][:length]] for e in group]
        for e in group:
            self.obs[e], self.steps[e] = self.obs[e][length:], self.steps[e][length:]
        return group, {name: np.stack([np.stack(column) for column in value], axis=1) for name, value in columns.items()}
