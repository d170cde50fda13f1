"""Observation and return normalisation on the host, before data goes to the device: running mean
and variance of a stream of batches (numpy, float64), and the reward scaler built on them.

Batches are merged with the parallel-variance formula of Chan, Golub & LeVeque (1979): for
statistics (mean_a, var_a, n_a) and a batch (mean_b, var_b, n_b), with δ = mean_b - mean_a and
n = n_a + n_b,

    mean = mean_a + δ n_b / n,
    M2   = var_a n_a + var_b n_b + δ² n_a n_b / n,   var = M2 / n,

which is exact (population variance of everything seen so far) and stable in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pbt_rl.config import AgentConfig


def _to_float64_array(value) -> np.ndarray:
    """A tensor (any device) or array-like as a fresh float64 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=np.float64)


def _clipped_float32(values: np.ndarray, clip: float | None) -> np.ndarray:
    """``values`` (a float64 array of the caller's own) clipped in place to ``[-clip, clip]``
    (None = not clipped) and cast to float32; NaN stays NaN, as with ``np.clip``."""
    values = np.asarray(values)  # a 0-d result of scalar arithmetic becomes an array to clip in place
    if clip is not None:
        np.minimum(values, clip, out=values)
        np.maximum(values, -clip, out=values)
    return values.astype(np.float32)


class RunningMeanStd:
    """Mean and (population) variance per feature of every sample seen, ``shape`` = one sample.

    Before the first update the statistics are mean 0, variance 1, count 0, so
    :meth:`normalize` is the identity (up to ``epsilon`` and clipping).
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-8) -> None:
        self.shape = tuple(shape)
        self.epsilon = epsilon  # added to the variance before the square root
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self._var = np.ones(self.shape, dtype=np.float64)
        self._std: np.ndarray | None = None  # sqrt(var + epsilon), computed once per change
        self.count = 0.0  # samples seen (float so that state dicts stay plain numbers)

    # Every batch of an acting step is normalised, so the square root is kept between updates;
    # the variance is set only through this property, which drops it.
    @property
    def var(self) -> np.ndarray:
        return self._var

    @var.setter
    def var(self, value: np.ndarray) -> None:
        self._var = np.asarray(value, dtype=np.float64)
        self._std = None

    def update(self, batch: np.ndarray) -> None:
        """Merge a batch ``[N, *shape]`` of samples into the statistics (no-op for N = 0)."""
        batch = np.asarray(batch, dtype=np.float64)
        if batch.shape[1:] != self.shape:
            raise ValueError(f"batch must be [N, *{self.shape}], got shape {batch.shape}")
        batch_count = batch.shape[0]
        if batch_count == 0:
            return
        # The batch's mean and sum of squared deviations in plain ufunc calls: np.mean and np.var
        # cost several times more in Python overhead at an acting step's batch size.
        batch_mean = batch.sum(axis=0) / batch_count
        centred = batch - batch_mean
        batch_squares = np.einsum("i...,i...->...", centred, centred)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        sum_squares = self._var * self.count + batch_squares + delta * delta * (self.count * batch_count / total)
        # np.asarray keeps 0-d statistics (shape ()) arrays rather than numpy scalars.
        self.mean = np.asarray(self.mean + delta * (batch_count / total), dtype=np.float64)
        self.var = sum_squares / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """``sqrt(var + epsilon)``, ``shape``."""
        if self._std is None:
            self._std = np.sqrt(self._var + self.epsilon)
        return self._std

    def normalize(self, x: np.ndarray, clip: float | None = 10.0) -> np.ndarray:
        """``(x - mean) / std`` clipped to ``[-clip, clip]`` (None = no clip), as float32."""
        normalized = np.subtract(x, self.mean, dtype=np.float64)  # a new array: changed in place below
        normalized /= self.std
        return _clipped_float32(normalized, clip)

    def scale(self, x: np.ndarray, clip: float | None = 10.0) -> np.ndarray:
        """``x / std`` without centring (reward scaling by the std of discounted returns), float32."""
        return _clipped_float32(np.asarray(x, dtype=np.float64) / self.std, clip)

    def state_dict(self) -> dict:
        """Statistics as float64 tensors and a float, loadable by ``torch.load(weights_only=True)``."""
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "var": torch.from_numpy(self.var.copy()),
            "count": float(self.count),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore statistics saved by :meth:`state_dict` (tensors or arrays of this ``shape``)."""
        mean, var = (_to_float64_array(state[key]) for key in ("mean", "var"))
        if mean.shape != self.shape or var.shape != self.shape:
            raise ValueError(f"state has shape {mean.shape}/{var.shape}, this normaliser has {self.shape}")
        self.mean, self.var, self.count = mean, var, float(state["count"])


def uses_observation_normalization(agent: AgentConfig, env_family: str) -> bool:
    """'on', or 'auto' for MuJoCo envs (vector observations of very different scales)."""
    return agent.normalize_observations == "on" or (agent.normalize_observations == "auto" and env_family == "mujoco")


class RewardScaler:
    """Divides rewards by a running standard deviation of each env's discounted return.

    The discounted return ``R <- gamma * R + r`` is tracked per env id and restarted at the end
    of every learning episode (terminated or truncated); auto-reset steps (reward 0) are not
    counted. Only the scale changes, never the sign or the mean, so the optimal policy is the same.
    """

    def __init__(self, num_envs: int) -> None:
        # Shape (1,) rather than (): RunningMeanStd's 0-d statistics decay to numpy scalars.
        self.statistics = RunningMeanStd((1,))
        self.discounted_returns = np.zeros(num_envs, dtype=np.float64)  # [num_envs]

    def __call__(self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                 is_first: np.ndarray, env_ids: np.ndarray, gamma: float) -> np.ndarray:
        """Scaled rewards float32 ``[B]`` (clipped to +-10) for one batch; updates the statistics."""
        ids = np.asarray(env_ids)
        counted_rewards = rewards
        ended = np.asarray(terminated) | np.asarray(truncated)
        is_first = np.asarray(is_first, dtype=bool)
        if is_first.any():  # most batches have no reset step: no masks to apply
            counted = ~is_first
            ids, counted_rewards, ended = ids[counted], rewards[counted], ended[counted]
        returns = gamma * self.discounted_returns[ids] + counted_rewards
        self.discounted_returns[ids] = returns
        self.statistics.update(returns[:, None])
        if ended.any():
            self.discounted_returns[ids[ended]] = 0.0
        return self.statistics.scale(rewards)

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": self.statistics.state_dict(), "discounted_returns": torch.from_numpy(self.discounted_returns.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics.load_state_dict(state["statistics"])
        returns = torch.as_tensor(state["discounted_returns"]).cpu().numpy().astype(np.float64)
        if returns.shape == self.discounted_returns.shape:
            self.discounted_returns[:] = returns
