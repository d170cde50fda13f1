"""What the machine and a process tree use: CPU, GPU (nvidia-smi), resident memory, and CPU time
per thread (Linux's /proc), sampled while the bench trains a population (:class:`MachineSampler`).

The bench uses these to say where a population's cores go. Threads are told apart by their OS
names (``/proc/<pid>/task/<tid>/comm``), which pbt-rl sets for its own threads (:data:`ENVPOOL`,
:data:`ACTOR`, :data:`MEMBER`, with :func:`set_thread_name`); a thread inherits its creator's name,
so envpool's C++ workers are named by creating the pool inside :func:`thread_named`, and a member's
torch CPU threads carry its member thread's name. Elsewhere than Linux every reader returns None
and naming does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# OS thread names (at most 15 bytes): the kinds of thread the bench reports.
ENVPOOL = "pbt-envpool"   # envpool's worker threads
ACTOR = "pbt-actor"       # an IMPALA member's actor thread (acting, trajectories)
MEMBER = "pbt-member"     # a member's own thread: its training loop (A2C: acting and updates; IMPALA: updates)

_PR_SET_NAME, _PR_GET_NAME = 15, 16
_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


# Linux's prctl (None elsewhere, e.g. macOS, whose libc has no such call).
_PRCTL = getattr(_libc(), "prctl", None) if sys.platform.startswith("linux") else None


def thread_name() -> str | None:
    """The calling thread's OS name (None where it cannot be read)."""
    if _PRCTL is None:
        return None
    buffer = ctypes.create_string_buffer(16)
    if _PRCTL(_PR_GET_NAME, buffer, 0, 0, 0) != 0:
        return None
    return buffer.value.decode(errors="replace")


def set_thread_name(name: str) -> None:
    """Give the calling thread an OS name (cut to 15 bytes), as ``top -H`` and /proc show it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@contextlib.contextmanager
def thread_named(name: str) -> Iterator[None]:
    """The calling thread named ``name`` while the block runs (threads it starts keep the name)."""
    previous = thread_name()
    set_thread_name(name)
    try:
        yield
    finally:
        if previous is not None:
            set_thread_name(previous)


def process_tree(root_pid: int) -> list[int] | None:
    """``root_pid`` and every descendant's pid (None where /proc cannot be listed)."""
    children: dict[int, list[int]] = {}
    try:
        for entry in _PROC.iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue  # ended while we looked
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    except OSError:
        return None
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def resident_mib(root_pid: int) -> float | None:
    """Resident memory (MiB) of a process and all its descendants, summed (None where /proc is missing).

    Pages shared between processes (libraries) count once per process, as ``ps`` shows them.
    """
    pids = process_tree(root_pid)
    return None if pids is None else _resident_mib(pids)


def _resident_mib(pids: list[int]) -> float:
    total_kib = 0
    for pid in pids:
        try:
            for line in (_PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total_kib / 1024


ThreadTimes = dict[tuple[int, int], tuple[str, float]]


def thread_cpu_seconds(pids: list[int]) -> ThreadTimes:
    """``(pid, tid) -> (OS name, CPU seconds used so far, user and system)`` for every thread of ``pids``."""
    times: ThreadTimes = {}
    for pid in pids:
        try:
            tids = [int(entry.name) for entry in (_PROC / str(pid) / "task").iterdir()]
        except (OSError, ValueError):
            continue
        for tid in tids:
            try:
                stat = (_PROC / str(pid) / "task" / str(tid) / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1: stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is the state (stat's 3rd field)
            times[(pid, tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICKS)
    return times


def cores_by_thread_name(before: ThreadTimes, after: ThreadTimes, seconds: float) -> dict[str, float]:
    """Cores used between two :func:`thread_cpu_seconds` readings ``seconds`` apart, summed by OS
    thread name, most first. Threads that started in between count from zero; threads that ended
    in between are not seen (read while the threads of interest run)."""
    if seconds <= 0:
        return {}
    cores: dict[str, float] = {}
    for key, (name, used) in after.items():
        earlier = before.get(key)
        start = earlier[1] if earlier is not None else 0.0
        cores[name] = cores.get(name, 0.0) + max(0.0, used - start) / seconds
    return dict(sorted(cores.items(), key=lambda item: -item[1]))


def members_cores(cores: dict[str, float]) -> float:
    """Of :func:`cores_by_thread_name`'s result: the cores of the members' own threads (IMPALA
    actors and members' threads, with the torch threads they start), the per-step work that raw
    envpool stepping does not do."""
    return cores.get(ACTOR, 0.0) + cores.get(MEMBER, 0.0)


class MachineSampler:
    """Samples machine-wide CPU use (/proc/stat), GPU use (nvidia-smi), and the resident memory and
    CPU time per thread of this process with its children (the controller and its member hosts)
    about once a second; every sample carries its time, seconds since the sampler started, so that
    :meth:`summary` covers a window of wall time however long sampling takes."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._has_nvidia_smi = shutil.which("nvidia-smi") is not None
        self._started = time.monotonic()

    @staticmethod
    def _cpu_times() -> tuple[float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        values = [float(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        return sum(values), idle

    def _gpu(self) -> tuple[float, float] | None:
        """Mean utilisation (%) over every GPU and their memory in use (MiB), or None."""
        if not self._has_nvidia_smi:
            return None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip().splitlines()
            per_gpu = [[float(x) for x in line.split(",")] for line in out]
            return float(np.mean([util for util, _ in per_gpu])), sum(memory for _, memory in per_gpu)
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            self._has_nvidia_smi = False
            return None

    def _run(self) -> None:
        previous = self._cpu_times()
        while not self._stop.wait(1.0):
            sample: dict[str, Any] = {"seconds": time.monotonic() - self._started}
            current = self._cpu_times()
            if previous and current and current[0] > previous[0]:
                total, idle = current[0] - previous[0], current[1] - previous[1]
                sample["cpu_busy"] = 1.0 - idle / total
            previous = current
            pids = process_tree(os.getpid())
            sample["resident"] = _resident_mib(pids) if pids is not None else None
            sample["threads"] = thread_cpu_seconds(pids) if pids is not None else None
            gpu = self._gpu()
            if gpu is not None:
                sample["gpu_util"], sample["gpu_memory_mib"] = gpu
            self.samples.append(sample)

    def __enter__(self) -> "MachineSampler":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, Any]:
        """Means over the samples taken from ``start`` to ``end`` seconds after the sampler started
        (all samples when none fall there), maxima over all samples, and the cores used by each
        OS thread name between the window's first and last samples (None with fewer than two)."""
        window = [s for s in self.samples if start <= s["seconds"] <= end] or self.samples

        def mean(key: str) -> float | None:
            values = [s[key] for s in window if s.get(key) is not None]
            return float(np.mean(values)) if values else None

        def maximum(key: str) -> float | None:
            values = [s[key] for s in self.samples if s.get(key) is not None]
            return max(values) if values else None

        with_threads = [s for s in window if s.get("threads") is not None]
        cores = None
        if len(with_threads) >= 2:
            first, last = with_threads[0], with_threads[-1]
            cores = cores_by_thread_name(first["threads"], last["threads"], last["seconds"] - first["seconds"])
        return {
            "cores_by_thread": cores,
            "cpu_busy_fraction": mean("cpu_busy"),
            "gpu_utilization_percent": mean("gpu_util"),
            "gpu_memory_mib_max": maximum("gpu_memory_mib"),
            "resident_mib_max": maximum("resident"),
        }


__all__ = ["ACTOR", "ENVPOOL", "MEMBER", "MachineSampler", "ThreadTimes", "cores_by_thread_name", "process_tree",
           "resident_mib", "set_thread_name", "thread_cpu_seconds", "thread_name", "thread_named"]
