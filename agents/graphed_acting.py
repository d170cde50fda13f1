"""The acting step (forward pass and sampling) replayed as a CUDA graph.

Every env step of a member runs its policy once: a Nature-CNN forward pass and the sampling are
some thirty small kernels, each launched from Python by the member's acting thread, on cores the
envs need. The bench's CPU attribution showed those threads taking 1.3-4.2 of 16 cores
(docs/design.md, "Where the cores go"), most of it per acting step whatever the batch size.
Captured once per batch shape, a step is one copy of the observations in, one draw of the
random numbers, one graph launch and one copy of the actions out.

The random numbers stay outside the graph: they are drawn eagerly from the member's acting
generator (:meth:`~pbt_rl.agents.networks.ActorCritic.draw_noise`, one kernel) into the graph's
static input, exactly the draws the eager step makes (the forward pass draws nothing), so a
graphed member samples the same actions as an eager one and seeded runs stay seeded.

On by default (``agent.graphed_acting``): on the H100 machine it raised the population's env
steps/s 1.09-1.19x (Pong A2C and HalfCheetah at 8 members, Pong IMPALA at 64; docs/design.md,
"Where the cores go").

The graph reads the model's parameters where they are, so weight updates in place (optimiser
steps, ``load_state_dict``, the IMPALA actor loading published weights) are seen by the next
replay; a model whose parameters moved (or another model) gets its own capture. A capture keeps
its model's parameter and buffer tensors, so that each step checks their addresses without
walking the module tree (``Module.parameters()`` cost 43-62 us per step on the GPU machine, a
sixth of the graphed step's CPU time).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pbt_rl.agents.device import HostCopy, to_device
from pbt_rl.agents.graphed_steps import CAPTURE_LOCK, WARMUP_STEPS


@dataclass
class _Captured:
    """One model's acting graph for one observation shape and dtype, and where that model's
    parameters and buffers were when it was made (:meth:`of`)."""

    model: weakref.ref
    tensors: tuple[Tensor, ...]
    addresses: tuple[int, ...]
    warmups: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    obs: Tensor | None = None
    noise: Tensor | None = None
    packed: Tensor | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "_Captured":
        tensors = (*model.parameters(), *model.buffers())
        return cls(model=weakref.ref(model), tensors=tensors, addresses=_addresses(tensors))

    def serves(self, model: torch.nn.Module) -> bool:
        """Whether this is ``model``'s entry, its parameters and buffers where they were."""
        return self.model() is model and _addresses(self.tensors) == self.addresses


def _addresses(tensors: tuple[Tensor, ...]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


class GraphedActing:
    """A learner's sampling acting steps on a GPU as replayed CUDA graphs (see the module's doc).

    :meth:`launch` returns what ``model.act_packed(obs, generator=generator)`` returns eagerly,
    on its way to the host (:class:`~pbt_rl.agents.device.HostCopy`): the first
    :data:`WARMUP_STEPS` calls for a model and shape run eagerly (on a side stream, as capture
    needs), the next one captures and replays.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device=device)
        self._captured: dict[tuple, _Captured] = {}
        self._lock = threading.Lock()  # one caller at a time (the acting thread; an evaluation)
        self.captures = 0
        """Graphs captured so far (for tests and reports)."""

    def launch(self, model: torch.nn.Module, obs: np.ndarray | Tensor, generator: torch.Generator) -> HostCopy:
        """Rows ``(action..., log_prob)`` for the prepared observations ``obs`` ``[N, ...]`` (a host
        array, or a tensor on the device), sampled with ``generator`` (float64 ``[N, k + 1]``), their
        copy to the host queued before anyone can launch again (a replay overwrites the graph's output)."""
        with self._lock, torch.cuda.device(self.device), torch.no_grad():
            dtype = obs.dtype if isinstance(obs, Tensor) else torch.from_numpy(obs[:0]).dtype
            key = (id(model), tuple(obs.shape), dtype)
            entry = self._captured.get(key)
            if entry is None or not entry.serves(model):
                self._forget_dead_models()
                entry = self._captured[key] = _Captured.of(model)
            if entry.graph is None and entry.warmups < WARMUP_STEPS:
                entry.warmups += 1
                return HostCopy(self._eager(model, obs, generator))
            if entry.graph is None:
                self._capture(entry, model, tuple(obs.shape), dtype)
            to_device(obs, self.device, out=entry.obs)  # pinned host (or the device) -> the graph's input
            model.draw_noise(entry.noise, generator)
            entry.graph.replay()
            return HostCopy(entry.packed)

    def _forget_dead_models(self) -> None:
        """Drop the captures of models that no longer exist (with the tensors they kept)."""
        self._captured = {key: entry for key, entry in self._captured.items() if entry.model() is not None}

    def _eager(self, model: torch.nn.Module, obs: np.ndarray | Tensor, generator: torch.Generator) -> Tensor:
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream):
                packed = model.act_packed(to_device(obs, self.device), generator=generator)
        finally:
            current.wait_stream(self._stream)
        packed.record_stream(current)  # used on the current stream from here (the copy to the host)
        return packed

    def _capture(self, entry: _Captured, model: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Capture forward and sampling over static observations and noise (nothing runs yet)."""
        entry.obs = torch.zeros(shape, dtype=dtype, device=self.device)
        entry.noise = torch.zeros((shape[0], model.policy_head.out_features), dtype=torch.float32,
                                  device=self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the other threads of the process (an IMPALA learner, the host's other
        # members) keep launching work while this one captures.
        with CAPTURE_LOCK, torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            dist_params, _value = model(entry.obs)
            entry.packed = model.sample_packed(dist_params, noise=entry.noise)
        entry.graph = graph
        self.captures += 1


__all__ = ["GraphedActing"]
