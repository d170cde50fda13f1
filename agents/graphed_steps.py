"""Gradient steps replayed as CUDA graphs, checked for divergence once per update.

A learner's gradient step on a GPU is a few hundred small kernels (a Nature-CNN forward and
backward pass, the V-trace or return targets, the loss, the clip, the optimiser), each launched
from Python: about 6 ms of CPU time per Pong step against well under 1 ms of GPU work, with the
cores shared by the population's env threads. Captured once as a CUDA graph, a step is one launch.

A graph cannot branch on the host, so its step cannot wait for the device to learn whether the
loss and gradient norm are finite, as an eager step does (:meth:`Learner.gradient_step`). Instead
(:class:`DeferredCheck`) the step records a sticky "diverged" flag on the device and takes the
optimiser step only while the flag is clear, so that the failing step and every later one of the
update change no parameter and no optimiser state; the update reads the flag (with its statistics,
in its one wait for the device) and then raises :class:`~pbt_rl.agents.base.TrainingDiverged`:
the same outcome as the eager check, which stops at the failing step.

:class:`GraphedSteps` owns a learner's graph: it takes the first steps eagerly (the warm-up that
CUDA graph capture needs: cuBLAS/cuDNN handles, the optimiser's state), captures one step over
static input buffers, and replays it for every later step, copying each minibatch's column indices
in. Anything the graph baked in is captured again when it changes: the batch's shapes, the
hyperparameters (the loss's constants, the optimiser's lr) and the optimiser's state tensors (a
load replaces them).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pbt_rl.agents.device import sleep_until_done

if TYPE_CHECKING:
    from pbt_rl.agents.base import Learner

WARMUP_STEPS = 3
"""Eager steps (on the capture stream) before a graph is captured, as torch's CUDA graph docs ask."""

CAPTURE_LOCK = threading.Lock()
"""One capture at a time per process (members of one host capture from their own threads)."""


def select_columns(batch: dict[str, Tensor], columns: Tensor | None) -> dict[str, Tensor]:
    """The minibatch of ``batch`` ``[T, B, ...]`` made of env columns ``columns`` (None: all of them)."""
    if columns is None:
        return batch
    return {name: tensor.index_select(1, columns) for name, tensor in batch.items()}


class StepTotals:
    """Per-step statistics (0-d tensors) summed on the device; one host copy for their means."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sum: Tensor | None = None
        self.steps = 0

    def add(self, parts: dict[str, Tensor], steps: int = 1) -> None:
        """Add one step's parts (or, with ``steps``, parts already summed over that many steps)."""
        self.names = list(parts)
        stacked = torch.stack([parts[name].float() for name in self.names])
        self.sum = stacked if self.sum is None else self.sum + stacked
        self.steps += steps

    def means(self) -> dict[str, float]:
        """The means over the steps added, as floats (waits for the device)."""
        if self.sum is None:
            return {}
        return dict(zip(self.names, (self.sum / self.steps).tolist()))


class DeferredCheck:
    """Gradient steps that record divergence on the device instead of waiting to check it.

    ``diverged`` (0 or 1) is sticky: once a step's loss or gradient norm is not finite, that step
    and every later one until :meth:`reset` leave the parameters and the optimiser state exactly as
    they were; ``applied`` counts the steps taken. A fused optimiser skips its step itself
    (``found_inf``, as torch's gradient scaler drives it); any other has its parameters and state
    tensors restored from a copy made before the step. The optimiser's state must exist (it has
    taken a step), since a lazily created one could not be restored.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.diverged = torch.zeros((), dtype=torch.float32, device=device)
        self.applied = torch.zeros((), dtype=torch.float32, device=device)

    def reset(self) -> None:
        """Clear the flag and the count (in place: a captured graph keeps using these tensors)."""
        self.diverged.zero_()
        self.applied.zero_()

    def _fused(self) -> bool:
        return all(group.get("fused") for group in self.optimizer.param_groups)

    def _state_tensors(self) -> list[Tensor]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        missing = [p for p in params if p.requires_grad and p not in self.optimizer.state]
        if missing:
            raise RuntimeError("DeferredCheck needs the optimiser's state: take an eager step first")
        state = [v for p in params for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return params + state

    def step(self, loss: Tensor, max_grad_norm: float) -> Tensor:
        """Backward, clip to ``max_grad_norm`` (0: no clipping), record, step unless diverged.

        Returns the gradient norm before clipping (0-d tensor). Nothing here waits for the device.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf).detach()
        finite = torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all()
        torch.maximum(self.diverged, (~finite).float(), out=self.diverged)
        if self._fused():
            self.optimizer.found_inf = self.diverged  # read by the fused kernel: skip the step when 1
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            tensors = self._state_tensors()
            with torch.no_grad():
                saved = [t.clone() for t in tensors]
                self.optimizer.step()
                keep = self.diverged == 0
                for tensor, before in zip(tensors, saved):
                    tensor.copy_(torch.where(keep, tensor, before))
        self.applied.add_(1.0 - self.diverged)
        return grad_norm


class GraphedSteps:
    """One learner's gradient steps as a replayed CUDA graph (see the module's doc)."""

    def __init__(self, learner: "Learner") -> None:
        self._learner = learner
        self._stream = torch.cuda.Stream(device=learner.device)
        self._check = DeferredCheck(learner.model, learner.optimizer, learner.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None
        self._eager_steps = 0
        self._static: dict[str, Tensor] = {}
        self._columns: Tensor | None = None
        self._totals: Tensor | None = None
        self._names: list[str] = []
        self.captures = 0
        """Graphs captured so far (for tests and reports)."""

    def invalidate(self) -> None:
        """Forget the graph: the next steps warm up and capture again."""
        if self._graph is not None:
            self._graph = None
            self._static, self._columns, self._totals = {}, None, None
            self._learner.optimizer.zero_grad(set_to_none=True)  # the gradients lived in the graph's memory
        self._eager_steps = 0

    @staticmethod
    def can_run(plan: list[Tensor | None]) -> bool:
        """Whether every step of ``plan`` has the same minibatch shape (one graph serves them all)."""
        return len({None if columns is None else columns.numel() for columns in plan}) == 1

    def _shape_key(self, batch: dict[str, Tensor], columns: Tensor | None) -> tuple:
        return (tuple((name, tuple(t.shape), t.dtype) for name, t in batch.items()),
                None if columns is None else columns.numel())

    def update(self, batch: dict[str, Tensor], plan: list[Tensor | None]) -> dict[str, float]:
        """Take one gradient step per entry of ``plan`` (the env columns of each minibatch, None:
        the whole batch) and return the means of the steps' statistics, as :meth:`Learner.update`.

        Raises:
            TrainingDiverged: a step's loss or gradient norm was not finite; it and the later steps
                were not applied, the earlier ones were (and are counted in ``updates``).
        """
        # The graph is captured on, and must be launched from, the learner's device (a member on
        # cuda:1 of a multi-GPU host): the current device of this thread is made that one.
        with torch.cuda.device(self._learner.device):
            return self._update(batch, plan)

    def _update(self, batch: dict[str, Tensor], plan: list[Tensor | None]) -> dict[str, float]:
        from pbt_rl.agents.base import TrainingDiverged

        learner = self._learner
        key = self._shape_key(batch, plan[0])
        if key != self._key:
            self.invalidate()
            self._key = key
        totals = StepTotals()
        self._check.reset()
        replays = 0
        for columns in plan:
            if self._graph is None and self._eager_steps < WARMUP_STEPS:
                self._eager_step(batch, columns, totals)
                continue
            if self._graph is None:
                self._capture(batch, columns)
            if replays == 0:
                for name, tensor in batch.items():
                    self._static[name].copy_(tensor)
                self._totals.zero_()
            if columns is not None:
                self._columns.copy_(columns)
            self._graph.replay()
            replays += 1
        if replays:
            totals.add(dict(zip(self._names, self._totals.unbind())), steps=replays)
            sleep_until_done(learner.device)  # the replays' GPU time, without spinning through it
            flags = torch.stack([self._check.applied, self._check.diverged]).tolist()
            applied, diverged = int(flags[0]), flags[1] > 0
            learner.updates += applied
            if diverged:
                raise TrainingDiverged(f"non-finite loss or gradient norm at update {learner.updates} "
                                       f"(a graphed step: it and the {replays - applied - 1} after it were not applied)")
        return totals.means()

    def _eager_step(self, batch: dict[str, Tensor], columns: Tensor | None, totals: StepTotals) -> None:
        """One ordinary step (:meth:`Learner.minibatch_step`) on the capture stream: the warm-up."""
        current = torch.cuda.current_stream(self._learner.device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream):
                parts, grad_norm = self._learner.minibatch_step(select_columns(batch, columns))
                totals.add({**parts, "grad_norm": grad_norm})
                self._names = totals.names
        finally:
            current.wait_stream(self._stream)
        self._eager_steps += 1

    def _capture(self, batch: dict[str, Tensor], columns: Tensor | None) -> None:
        """Capture one step over static copies of ``batch`` and ``columns`` (nothing runs yet); its
        statistics are summed in the order of the warm-up steps' (``self._names``)."""
        learner = self._learner
        names = self._names
        self._static = {name: tensor.clone() for name, tensor in batch.items()}
        self._columns = None if columns is None else columns.clone()
        self._totals = torch.zeros(len(names), device=learner.device)
        graph = torch.cuda.CUDAGraph()
        learner.optimizer.zero_grad(set_to_none=True)
        # thread_local: the IMPALA actor thread (and the other members of a host) keep acting,
        # waiting for the device as they need to, while this thread captures.
        with CAPTURE_LOCK, torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            loss, parts = learner.minibatch_loss(select_columns(self._static, self._columns))
            grad_norm = self._check.step(loss, learner.agent_cfg.max_grad_norm)
            parts = {**parts, "grad_norm": grad_norm}
            self._totals.add_(torch.stack([parts[name].float() for name in names]))
        self._graph = graph
        self.captures += 1
