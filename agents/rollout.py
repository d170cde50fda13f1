"""Rollout storage: :class:`Unroll`, ``T`` consecutive env steps of ``B`` envs as host arrays.

A2C fills one reused unroll in place per update; IMPALA's actor cuts one from each env's
trajectory and the learner concatenates several side by side. Arrays stay on the host (numpy)
until the update copies them to the device in one go. An unroll made ``pinned`` (for a learner
on a GPU) lives in page-locked memory, which the device copies from directly: no staging copy
for the policy steps that read its observation rows or for the update.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


def host_array(shape: tuple[int, ...], dtype: np.dtype, pinned: bool, zeroed: bool = False) -> np.ndarray:
    """A host array, in page-locked memory when ``pinned`` (the array keeps the torch tensor that
    owns it). Uninitialised unless ``zeroed``. A device copy from pinned memory runs after the
    call that queued it returns, so the memory must stay unchanged and alive until the copy is
    done: a learner's update ends with a host copy of its statistics, which waits for it."""
    if not pinned:
        return np.zeros(shape, dtype=dtype) if zeroed else np.empty(shape, dtype=dtype)
    torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    make = torch.zeros if zeroed else torch.empty
    return make(shape, dtype=torch_dtype, pin_memory=True).numpy()


@dataclass
class Unroll:
    """``T`` consecutive env steps of ``B`` envs, as host (numpy) arrays.

    ``obs[t]`` is the (normalised) observation action ``actions[t]`` was chosen on; ``obs[T]``
    is the bootstrap observation after the last step. ``valid[t]`` is False for auto-reset
    steps (their action was ignored); those are left out of every loss term.
    """

    obs: np.ndarray | torch.Tensor  # [T + 1, B, *obs_shape] uint8 or float32 (IMPALA on a GPU: on the device)
    actions: np.ndarray  # [T, B, *action_shape] as sampled (before clipping to the bounds)
    behaviour_log_probs: np.ndarray  # [T, B] float32 log mu(a_t | x_t) of the acting policy
    rewards: np.ndarray  # [T, B] float32 reward to learn from (scaled when normalize_returns)
    terminated: np.ndarray  # [T, B] bool
    truncated: np.ndarray  # [T, B] bool
    valid: np.ndarray  # [T, B] bool, not is_first
    policy_updates: np.ndarray  # [T, B] int64 learner update count of the weights that acted
    policy_version: int = 0  # IMPALA: experience from an older version is dropped

    @property
    def length(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_envs(self) -> int:
        return int(self.rewards.shape[1])

    @classmethod
    def empty(cls, length: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
              action_shape: tuple[int, ...], action_dtype: np.dtype, pinned: bool = False) -> "Unroll":
        """Zeros of these shapes; ``pinned``: in page-locked host memory (needs CUDA)."""
        def zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            return host_array(shape, dtype, pinned, zeroed=True)

        return cls(
            obs=zeros((length + 1, num_envs, *obs_shape), obs_dtype),
            actions=zeros((length, num_envs, *action_shape), action_dtype),
            behaviour_log_probs=zeros((length, num_envs), np.float32),
            rewards=zeros((length, num_envs), np.float32),
            terminated=zeros((length, num_envs), bool),
            truncated=zeros((length, num_envs), bool),
            valid=zeros((length, num_envs), bool),
            policy_updates=zeros((length, num_envs), np.int64),
        )

    @classmethod
    def concatenate(cls, unrolls: list["Unroll"], pinned: bool = False) -> "Unroll":
        """Unrolls of equal length side by side: ``[T, B1 + B2 + ...]``; host arrays into pinned
        memory when ``pinned`` (observations on a device stay there)."""
        if len(unrolls) == 1:
            return unrolls[0]

        def side_by_side(parts: list[np.ndarray]) -> np.ndarray:
            shape = (parts[0].shape[0], sum(part.shape[1] for part in parts), *parts[0].shape[2:])
            return np.concatenate(parts, axis=1, out=host_array(shape, parts[0].dtype, pinned))

        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("obs", "policy_version")]
        obs = [u.obs for u in unrolls]
        return cls(obs=torch.cat(obs, dim=1) if isinstance(obs[0], torch.Tensor) else side_by_side(obs),
                   **{name: side_by_side([getattr(u, name) for u in unrolls]) for name in names},
                   policy_version=min(u.policy_version for u in unrolls))
