"""Acting together: the members of one host choose their actions in one forward pass.

A member host (pbt_rl/runtime/member_host.py, ``run.host_sharing: batched``) runs several
members as threads of one process. Acting alone, each member launches its own forward pass per
env step: ``M`` members launch ``M`` small ones, which on a GPU is launch overhead and small
kernels. An :class:`ActingPool` runs the policy steps that members ask for at the same time as
one: the members' parameters stacked (:func:`torch.func.stack_module_state`) and their
observations stacked, one :func:`torch.func.vmap` of the shared architecture
(:func:`torch.func.functional_call`), then each member's actions sampled from *its own* acting
generator (:meth:`~pbt_rl.agents.networks.ActorCritic.sample_packed`) and one device-to-host
copy for all of them.

Batching without waiting (flat combining): a member that asks while no pass is running runs a
pass over every request pending at that moment, its own included; requests that come while a
pass runs wait for it and go together in the next one. Nobody waits for a member that is not
acting (updating, or waiting for its envs), so acting together never costs a member more than
one pass of latency.

What stays each member's own: weights (read at the moment of the pass: a member's weights do
not change while it waits for its actions, since the thread that would change them is the one
waiting), observations (normalised by the member before it asks), the random draws (each
member's generator, the same draws in the same order as alone: the same seeded actions) and
the checks of the result. The stacked forward pass computes the same function as the member's
own; its floating-point rounding may differ in the last bits (batched against single matrix
products), which changes a sampled action only where two actions' Gumbel-perturbed scores tie
to those bits.

Requests are grouped by what a batched pass needs in common: the model class and its
parameters' names, shapes and dtypes, the observation shape, dtype and device. A group of one
runs the member's own :meth:`~pbt_rl.agents.networks.ActorCritic.act_packed`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(eq=False)
class _Request:
    model: torch.nn.Module
    obs: Tensor
    deterministic: bool
    generator: torch.Generator | None
    packed: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False

    def key(self) -> tuple:
        shapes = tuple((name, tuple(p.shape), p.dtype) for name, p in self.model.named_parameters())
        return (type(self.model), shapes, tuple(self.obs.shape), self.obs.dtype, self.obs.device, self.deterministic)


@dataclass
class PoolStats:
    """Counters of a pool: ``passes`` run and ``requests`` served (mean batch = requests / passes)."""

    passes: int = 0
    requests: int = 0
    largest: int = 0


class ActingPool:
    """Policy steps of a host's members, run together when they are asked for together (module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running = False
        self.stats = PoolStats()

    def act(self, model: torch.nn.Module, obs: Tensor, deterministic: bool = False,
            generator: torch.Generator | None = None) -> np.ndarray:
        """``model.act_packed(obs, deterministic, generator)`` on the host: float64 rows
        ``[N, k + 1]``, computed together with the other members' requests pending now.

        Re-raises in this member's thread whatever its part of the pass raised.
        """
        request = _Request(model, obs, deterministic, generator)
        with self._cond:
            self._pending.append(request)
            while self._running and not request.done:
                self._cond.wait()
            if not request.done:  # nobody is running a pass: run one for everything pending
                batch, self._pending = self._pending, []
                self._running = True
            else:
                batch = []
        if batch:
            try:
                act_together(batch)
            except BaseException as exc:  # noqa: BLE001 - a failure outside the groups: everyone's
                for waiting in batch:
                    if not waiting.done:
                        waiting.error, waiting.done = exc, True
            finally:
                with self._cond:
                    self._running = False
                    self.stats.passes += 1
                    self.stats.requests += len(batch)
                    self.stats.largest = max(self.stats.largest, len(batch))
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        assert request.packed is not None
        return request.packed


def act_together(requests: list[_Request]) -> None:
    """Answer every request (``packed`` or ``error``, and ``done``): one forward pass per group
    of alike requests, each member's own sampling, one device-to-host copy per device."""
    groups: dict[tuple, list[_Request]] = {}
    for request in requests:
        groups.setdefault(request.key(), []).append(request)
    answered: list[tuple[_Request, Tensor]] = []
    for group in groups.values():
        try:
            with torch.no_grad():
                answered += zip(group, _sample_group(group))
        except BaseException as exc:  # noqa: BLE001 - every member of the group gets its error
            for request in group:
                request.error = exc
    by_device: dict[torch.device, list[tuple[_Request, Tensor]]] = {}
    for request, packed in answered:
        by_device.setdefault(packed.device, []).append((request, packed))
    for pairs in by_device.values():
        try:
            host = torch.cat([packed.reshape(-1) for _, packed in pairs]).cpu().numpy()
            start = 0
            for request, packed in pairs:
                request.packed = host[start:start + packed.numel()].reshape(packed.shape)
                start += packed.numel()
        except BaseException as exc:  # noqa: BLE001
            for request, _ in pairs:
                request.error = exc
    for request in requests:
        request.done = True


def _sample_group(group: list[_Request]) -> list[Tensor]:
    """Packed rows (on the device) for requests that share an architecture and observation shape."""
    if len(group) == 1:
        request = group[0]
        return [request.model.act_packed(request.obs, deterministic=request.deterministic, generator=request.generator)]
    from torch.func import functional_call, stack_module_state, vmap

    models = [request.model for request in group]
    params, buffers = stack_module_state(models)
    base = models[0]

    def forward(member_params: dict, member_buffers: dict, obs: Tensor) -> Tensor:
        return functional_call(base, (member_params, member_buffers), (obs,))[0]

    dist_params = vmap(forward)(params, buffers, torch.stack([request.obs for request in group]))
    return [request.model.sample_packed(dist_params[i], request.deterministic, request.generator)
            for i, request in enumerate(group)]
