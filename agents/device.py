"""Devices and the CUDA driver: which device a learner runs on, how host arrays reach it, and how
a process's threads wait for a GPU.

Nothing here is called per learner to change the process: :func:`set_gpu_wait` is applied once
per process by its host (:func:`pbt_rl.runtime.host.configure_process`), before any learner is built.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pbt_rl.config import ConfigError


def resolve_device(requested: str | torch.device | None) -> torch.device:
    """``'auto'`` / None -> CUDA when available, else CPU; otherwise the named device."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"agent.device: {str(requested)!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def to_device(array: np.ndarray | Tensor, device: torch.device, out: Tensor | None = None) -> Tensor:
    """A host array as a tensor on ``device``, keeping its dtype (uint8 frames stay uint8); with
    ``out`` (a tensor of that shape on ``device``, e.g. a CUDA graph's static input) copied into
    it instead of a new tensor. A tensor on a GPU is moved or copied by the device (a tensor
    already on ``device`` is returned as it is).

    For CUDA the copy goes through pinned memory and does not block the host.
    """
    if isinstance(array, Tensor) and array.device.type != "cpu":  # on a device: copied there
        return array.to(device) if out is None else out.copy_(array, non_blocking=True)
    tensor = array if isinstance(array, Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    if out is not None:
        return out.copy_(tensor, non_blocking=True)
    return tensor.to(device, non_blocking=True) if device.type == "cuda" else tensor


class HostCopy:
    """A result on its way to the host: for a CUDA tensor the copy is queued (non-blocking, into
    pinned memory, ordered after the work that computes it) and waited for only when
    :meth:`array` is asked for, so the calling thread can do other work while the GPU finishes
    instead of spinning in a synchronous copy. A CPU tensor or a host array is there already.

    The wait is on a CUDA event, which spins. Blocking events (sleeping through the GPU's work)
    were tried with ``run.gpu_wait=block`` and not kept: a graphed Pong step's parts alone took
    93-104 us of CPU on a blocking event against 180-193 us spinning, but in the 64-member
    population the members' CPU per env batch rose (1,360 against 1,271 us per 16 envs, CUDA's
    event handler thread taking 0.28 cores) and the rate fell (27,724 against 28,495 env
    steps/s, H100 lease, 2026-12-06, one invocation).
    """

    def __init__(self, value: Tensor | np.ndarray) -> None:
        self._device_value: Tensor | None = None
        self._done: Any = None
        if isinstance(value, Tensor) and value.device.type == "cuda":
            stream = torch.cuda.current_stream(value.device)
            self._device_value = value  # kept until the copy is waited for: its memory is not reused before
            self._host: Tensor | np.ndarray = value.to("cpu", non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(stream)
        else:
            self._host = value

    def array(self) -> np.ndarray:
        """The value as a host array (waits for the copy the first time)."""
        if self._done is not None:
            self._done.synchronize()
            self._done = self._device_value = None
        return self._host.numpy() if isinstance(self._host, Tensor) else self._host


UPDATE_POLL_SECONDS = 200e-6
"""The sleep between checks of a learner's update (:func:`sleep_until_done`)."""


def sleep_until(event: Any, poll_seconds: float) -> None:
    """Return once ``event`` (a recorded ``torch.cuda.Event``) has happened, sleeping
    ``poll_seconds`` between its checks instead of spinning."""
    while not event.query():
        time.sleep(poll_seconds)


def sleep_until_done(device: torch.device, poll_seconds: float = UPDATE_POLL_SECONDS) -> None:
    """On a GPU, wait for the work queued so far on ``device``'s current stream, sleeping between
    checks; nothing on the CPU. A graphed update calls it before the host copy that ends it, so
    that its thread does not spin on a core for the whole update's GPU time (milliseconds, where a
    wake-up a fraction of a millisecond late costs nothing).

    The same sleeping wait for a policy step's copy (:class:`HostCopy`, 50 us between checks, as
    a ``run.gpu_wait`` mode) was tried and not kept: 0.917 of raw envpool against 0.927 spinning
    at 64 Pong IMPALA members, and 0.711 against 0.726 for HalfCheetah at 8 (H100 machine,
    2026-12-06, one invocation each)."""
    if device.type != "cuda":
        return
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    sleep_until(event, poll_seconds)


_CU_CTX_SCHED = {"auto": 0x00, "spin": 0x01, "yield": 0x02, "block": 0x04}
"""CUDA driver context flags CU_CTX_SCHED_AUTO, _SPIN, _YIELD and _BLOCKING_SYNC."""


def load_cuda_driver() -> Any | None:
    """The CUDA driver library (``libcuda.so.1`` through ctypes), or None when it cannot be loaded."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def set_gpu_wait(device: torch.device, mode: str) -> bool:
    """How this process's threads wait for ``device`` (``run.gpu_wait``); True if it was set.

    CUDA's default (``'auto'``) spins while a process has fewer contexts than the machine has
    cores, so every synchronising copy of a member busy-waits, on a core that env threads could
    use, for as long as the GPU is busy with the other members' work. ``'block'`` makes a
    waiting thread sleep until the GPU signals, ``'yield'`` spin but yield the core to other
    runnable threads. The flag is the primary context's CU_CTX_SCHED_* flag, set through the
    driver API (``cuDevicePrimaryCtxSetFlags_v2``, which also applies to an already active
    context) of the library :func:`load_cuda_driver` returns. ``'auto'`` and CPU devices change
    nothing and return False, as does a missing driver library or call.

    Measured on the H100 machine (README, Performance): for Pong A2C, 'block' lowered the
    population's rate (0.76 of raw envpool, against 0.82 spinning in the same lease), and for
    HalfCheetah with graphed acting (0.600 against 0.712): the wake-up latency on busy cores
    cost more than the freed core time. At 64 Pong IMPALA members (16 hosts on 16 cores) it
    raised the rate 1.06x.
    """
    if device.type != "cuda" or mode == "auto":
        return False
    driver = load_cuda_driver()
    set_flags = getattr(driver, "cuDevicePrimaryCtxSetFlags_v2", None)
    if set_flags is None:
        return False
    handle = ctypes.c_int()
    ordinal = device.index if device.index is not None else 0
    if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(handle), ordinal) != 0:
        return False
    return set_flags(handle, ctypes.c_uint(_CU_CTX_SCHED[mode])) == 0
