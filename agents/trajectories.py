"""Per-env trajectories of an actor, cut into unrolls (IMPALA's actor thread; numpy, and torch for
observations kept on the learner's device).

How unrolls are cut (synchronous and asynchronous envs alike). Every env id keeps its own
trajectory: the observations it was acted on, and its completed steps (action, behaviour
log-prob, reward, end flags, the update count of the acting weights). An env step of env ``e``
is completed when the env returns ``e`` again. As soon as ``B = env.batch_size`` env ids
(``num_envs`` for a synchronous env, ``async_batch_size`` for an asynchronous one) each hold
``T = unroll_length`` completed steps, the first ``T`` steps of those ``B`` envs (the ones with
the most steps waiting first, lower env ids first among equals) become one unroll, and
``obs[T]`` of each is its bootstrap observation. envpool's asynchronous ``recv`` returns
whichever envs are ready, so an unroll's envs need not have been received together; each column
is still ``T`` consecutive steps of one env. A new ``unroll_length`` applies to unrolls cut after
the change; one update only concatenates unrolls of equal length.

Storage. The actor calls :meth:`~EnvTrajectories.receive` and :meth:`~EnvTrajectories.sent` for
every env batch, so they are vectorised over the batch: each field lives in one array ``[envs,
capacity, ...]`` used as a ring per env, with a window (``head``, ``steps``) per env, and a batch
is written with one fancy-indexed assignment per field instead of a Python loop over its envs. A
cut gathers the unroll ``[T, B, ...]`` in one copy per field and moves the windows on; the rings
grow (rarely: a longer ``unroll_length``) when a window needs more room. For a learner on a GPU
the observations' ring is a tensor on the device (``obs_device``): a batch's observations arrive
there already (the policy step needs them there), are written into the ring by one indexed copy on
the device, and a cut gathers the unroll's observations there, so the frames are not copied on the
host at all after the policy step's copy; the other fields are cut into pinned memory, which the
update copies to the device from directly. Indices reach the device as one small copy each.

Measured on the 2-core CPU machine with Pong-sized frames (uint8 4 x 84 x 84), receive, sent and
cut per env batch: 128 envs in batches of 64, 580-634 us against 1,001-1,082 us for the lists of
Python tuples this replaced; 16 envs in batches of 8, 49-54 us against 288-322 us (alternating
runs of 3,000 batches).
"""

from __future__ import annotations

import numpy as np
import torch

from pbt_rl.agents.device import to_device
from pbt_rl.agents.rollout import Unroll, host_array

_STEP_FIELDS = {"behaviour_log_probs": np.float32, "policy_updates": np.int64, "rewards": np.float32,
                "terminated": bool, "truncated": bool, "valid": bool}


class EnvTrajectories:
    """Per env id: the observations acted on and the completed steps not yet cut into unrolls.

    For env ``e``, the observation at ring position ``head[e] + i`` (modulo the capacity) of its
    row is the one step ``i`` acted on (``i < steps[e]``); the one at ``head[e] + steps[e]`` is the
    observation its next (possibly in-flight, ``pending[e]``) action is chosen on.
    """

    def __init__(self, num_envs: int, pinned: bool = False, obs_device: torch.device | None = None) -> None:
        self.num_envs = num_envs
        self.pinned = pinned  # cut the host fields into page-locked memory (needs CUDA)
        # Observations as tensors on this device (received as such, cut as such); None: numpy.
        self.obs_device = obs_device
        self.head = np.zeros(num_envs, dtype=np.int64)
        self.steps = np.zeros(num_envs, dtype=np.int64)  # completed steps held
        self.pending = np.zeros(num_envs, dtype=bool)  # an action was sent and not yet returned
        self._capacity = 0
        # One ring per Unroll field, [envs, capacity, ...]: "obs" and the step fields from the first
        # received batch, "actions" from the first sent one (their shapes and dtypes come with them).
        self._rings: dict[str, np.ndarray] = {}
        # The in-flight step of each env: its action, log-prob and the acting weights' update count.
        self._pending_action: np.ndarray | None = None
        self._pending_log_prob = np.zeros(num_envs, dtype=np.float32)
        self._pending_updates = np.zeros(num_envs, dtype=np.int64)

    def drop_experience(self) -> None:
        """Forget every completed and in-flight step; keep only observations still to be acted on."""
        waiting = np.flatnonzero(~self.pending)  # their last observation is still to be acted on
        if "obs" in self._rings and waiting.size:
            obs = self._rings["obs"]
            last = _gather(obs, waiting * self._capacity + self._at(waiting, self.steps[waiting]), pinned=False)
            _write(obs, waiting * self._capacity, last)
        self.head[:] = 0
        self.steps[:] = 0
        self.pending[:] = False  # in flight: its env's next arrival starts a fresh trajectory

    def receive(self, env_ids: np.ndarray, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray, is_first: np.ndarray) -> None:
        """Complete the in-flight steps of a received batch ``[B]`` (distinct env ids) and record
        its observations (a tensor on ``obs_device`` when that is set)."""
        env_ids = np.asarray(env_ids, dtype=np.int64)
        if env_ids.size == 0:
            return
        if "obs" not in self._rings:
            self._add_ring("obs", obs.shape[1:], obs.dtype)
            for name, dtype in _STEP_FIELDS.items():
                self._add_ring(name, (), dtype)
        completes = self.pending[env_ids]
        # First arrival (reset) or after dropped experience: a fresh trajectory.
        fresh = env_ids[~completes]
        self.head[fresh] = 0
        self.steps[fresh] = 0
        self._make_room(env_ids, completes.astype(np.int64))
        rows = np.flatnonzero(completes)
        if rows.size:
            ids = env_ids[rows]
            at = self._at(ids, self.steps[ids])
            step = {"actions": self._pending_action[ids], "behaviour_log_probs": self._pending_log_prob[ids],
                    "policy_updates": self._pending_updates[ids], "rewards": rewards[rows],
                    "terminated": terminated[rows], "truncated": truncated[rows],
                    "valid": ~np.asarray(is_first, dtype=bool)[rows]}
            for name, values in step.items():
                self._rings[name][ids, at] = values
            self.steps[ids] += 1
            self.pending[ids] = False
        _write(self._rings["obs"], env_ids * self._capacity + self._at(env_ids, self.steps[env_ids]), obs)

    def sent(self, env_ids: np.ndarray, actions: np.ndarray, log_probs: np.ndarray, policy_updates: int) -> None:
        """Record the actions sent for envs ``env_ids`` (chosen on their last observations)."""
        env_ids = np.asarray(env_ids, dtype=np.int64)
        actions = np.asarray(actions)
        if self._pending_action is None:
            self._pending_action = np.zeros((self.num_envs, *actions.shape[1:]), dtype=actions.dtype)
            self._add_ring("actions", actions.shape[1:], actions.dtype)
        self._pending_action[env_ids] = actions
        self._pending_log_prob[env_ids] = log_probs
        self._pending_updates[env_ids] = policy_updates
        self.pending[env_ids] = True

    def cut(self, length: int, group_size: int, version: int) -> Unroll | None:
        """An unroll ``[length, group_size]`` if that many envs have ``length`` steps, else None."""
        ready = np.flatnonzero(self.steps >= length)
        if ready.size < group_size:
            return None
        group = ready[np.argsort(-self.steps[ready], kind="stable")[:group_size]]  # most steps first
        times = (self.head[group][None, :] + np.arange(length + 1)[:, None]) % self._capacity  # [T + 1, B]
        entries = group[None, :] * self._capacity + times  # [T + 1, B] rows of the flattened rings
        steps = {name: _gather(ring, entries[:length], self.pinned)
                 for name, ring in self._rings.items() if name != "obs"}
        unroll = Unroll(obs=_gather(self._rings["obs"], entries, self.pinned), policy_version=version, **steps)
        self.head[group] = (self.head[group] + length) % self._capacity
        self.steps[group] -= length
        return unroll

    def _at(self, env_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Ring positions of entries ``offsets`` of the windows of ``env_ids``."""
        return (self.head[env_ids] + offsets) % self._capacity

    def _make_room(self, env_ids: np.ndarray, extra: np.ndarray) -> None:
        """Room in the rings of ``env_ids`` for their windows after a batch: ``steps + 1``
        observations, and one entry more where the batch completes a step (``extra`` 1)."""
        needed = self.steps[env_ids] + 1 + extra
        if needed.max(initial=0) > self._capacity:
            # A little room past the largest window (a ring needs no more), at least 1.5 times the
            # old rings so that a window growing one step at a time does not copy every step.
            self._grow(max(int(needed.max()) + 4, 3 * self._capacity // 2))

    def _add_ring(self, name: str, shape: tuple[int, ...], dtype: np.dtype | torch.dtype) -> None:
        self._rings[name] = _zeros_like_ring((self.num_envs, self._capacity, *shape), dtype, self._ring_device(name))

    def _ring_device(self, name: str) -> torch.device | None:
        """Where ring ``name`` lives: the observations on ``obs_device``; None, numpy on the host."""
        return self.obs_device if name == "obs" else None

    def _grow(self, capacity: int) -> None:
        """Rings of ``capacity`` entries, every window copied to the start of its ring."""
        width = int(self.steps.max()) + 1
        envs, offsets = np.arange(self.num_envs)[:, None], np.arange(width)[None, :]
        source = (self.head[:, None] + offsets) % max(self._capacity, 1)  # [envs, width] ring positions
        for name, ring in self._rings.items():
            grown = _zeros_like_ring((self.num_envs, capacity, *ring.shape[2:]), ring.dtype, self._ring_device(name))
            if self._capacity:
                _write(grown, envs * capacity + offsets, _gather(ring, envs * self._capacity + source, pinned=False))
            self._rings[name] = grown
        self.head[:] = 0
        self._capacity = capacity


# -- a ring's storage: a numpy array, or (observations on the learner's device) a torch tensor ---------------
# Entries are indices into a ring's flattened [envs * capacity] axis, as an int64 numpy array of any shape.

def _zeros_like_ring(shape: tuple[int, ...], dtype: np.dtype | torch.dtype,
                     device: torch.device | None) -> np.ndarray | torch.Tensor:
    if device is None:
        return np.zeros(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def _gather(ring: np.ndarray | torch.Tensor, entries: np.ndarray, pinned: bool) -> np.ndarray | torch.Tensor:
    """``ring``'s ``entries``, ``[*entries.shape, ...]``, one copy (numpy: into pinned memory when
    ``pinned``; a tensor: on its device, the indices copied there first)."""
    item_shape = tuple(ring.shape[2:])
    if isinstance(ring, torch.Tensor):
        index = to_device(entries.reshape(-1), ring.device)
        return ring.view(-1, *item_shape).index_select(0, index).view(*entries.shape, *item_shape)
    out = host_array((*entries.shape, *item_shape), ring.dtype, pinned)
    # The entries are in range by construction; mode "clip" because with "raise" np.take writes
    # through a temporary buffer when given ``out`` (16x slower for Pong frames).
    return np.take(ring.reshape(-1, *item_shape), entries, axis=0, out=out, mode="clip")


def _write(ring: np.ndarray | torch.Tensor, entries: np.ndarray, values: np.ndarray | torch.Tensor) -> None:
    """``ring``'s ``entries`` (distinct) set to ``values`` ``[*entries.shape, ...]``."""
    item_shape = tuple(ring.shape[2:])
    if isinstance(ring, torch.Tensor):
        index = to_device(entries.reshape(-1), ring.device)
        ring.view(-1, *item_shape).index_copy_(0, index, to_device(values, ring.device).reshape(-1, *item_shape))
    else:
        ring.reshape(-1, *item_shape)[entries] = values
