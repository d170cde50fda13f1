"""One member of the population: its own envs and learner, hosted by a backend.

The member trains to its next ready point in chunks, sending progress after each chunk (at most
about once a second), then saves a checkpoint, reports it and waits for the controller's
decision. The messages are the types of :mod:`pbt_rl.runtime.protocol`.

A process hosting members never outlives the controller (:func:`die_with_parent`): it asks the
kernel for SIGKILL when its parent dies (Linux) and also polls its parent pid, and a closed pipe
ends it (runtime/member_host.py).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from pbt_rl.config import ExperimentConfig
from pbt_rl.runtime import protocol
from pbt_rl.runtime.store import CheckpointError, RunStore

DEFAULT_LEARNER_FACTORY = "pbt_rl.agents:make_learner"
PROGRESS_SECONDS = 1.0
CHUNK_SECONDS = 2.0
"""Wall time one ``learner.train`` call aims at, so that progress rows arrive every few seconds
whatever the env speed (``ready_after_steps / 8`` env steps can take half a minute on Atari)."""
FIRST_CHUNK_STEPS = 4096
PARENT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Restore:
    """Where a member (re)starts: a checkpoint (its own or a donor's) or nothing (fresh from its seed).

    ``env_steps`` is the member's own counter at that point (after an exploit the member keeps
    its own steps, not the donor's); ``hyperparameters`` are applied after loading (None: keep
    the checkpoint's, or the config's for a fresh start).
    """

    checkpoint: str | None = None
    env_steps: int = 0
    updates: int = 0
    hyperparameters: dict | None = None

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "env_steps": self.env_steps, "updates": self.updates,
                "hyperparameters": self.hyperparameters}

    @classmethod
    def from_dict(cls, raw: dict) -> "Restore":
        return cls(raw.get("checkpoint"), int(raw.get("env_steps", 0)), int(raw.get("updates", 0)),
                   raw.get("hyperparameters"))


@dataclass(frozen=True)
class MemberSpec:
    """Everything a member process needs; picklable, so any backend can ship it."""

    member_id: int
    seed: int
    config: ExperimentConfig
    run_dir: str
    restore: Restore
    device: str | None = None
    num_threads: int = 0
    progress_steps: int = 0  # env steps per training chunk; 0 = ready_after_steps / 8


def load_factory(path: str) -> Callable[..., Any]:
    """``module:function`` -> the function (lets tests and other backends swap the learner)."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def weights_sha256(state: Any) -> str:
    """A fingerprint of every tensor in a (nested) learner state dict, in key order.

    Used to check that a member which exploited holds exactly the donor checkpoint's weights.
    Only floating-point tensors count: the weights, optimizer moments and normaliser statistics.
    """
    import torch

    digest = hashlib.sha256()

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                digest.update(prefix.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{prefix}/{i}", item)

    visit("", state)
    return digest.hexdigest()


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` (the controller) does, even by SIGKILL."""
    try:  # Linux: the kernel kills us when the controller dies, even by SIGKILL.
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # portable fallback
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


TIMING_KEYS = ("wall", "act", "env", "inference", "update")
"""Where a member's training time went (seconds): wall time in ``train`` calls; acting (the
actor thread's busy time for IMPALA), of it blocked on the env and in policy inference; and
gradient updates. IMPALA acts and updates in parallel threads, A2C in turn."""


DIAGNOSTICS = ("grad_norm", "clip_fraction", "approx_kl")


class ProgressAccumulator:
    """Episode returns and losses gathered since the last message to the controller."""

    def __init__(self) -> None:
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.losses: dict[str, float] = {}
        self.steps = 0
        self.seconds = 0.0
        self.timing = dict.fromkeys(TIMING_KEYS, 0.0)

    def add(self, report: Any, steps: int, seconds: float) -> None:
        self.returns.extend(float(r) for r in report.episode_returns)
        self.lengths.extend(int(n) for n in report.episode_lengths)
        # The loss parts plus the update diagnostics (gradient norm, PPO clip fraction, approximate
        # KL) when this call made updates; they reach metrics.jsonl and W&B as losses/<name>.
        diagnostics = {k: report.extra[k] for k in DIAGNOSTICS if math.isfinite(float(report.extra.get(k, math.nan)))}
        self.losses = {**{k: float(v) for k, v in report.losses.items()}, **diagnostics} if report.losses else self.losses
        self.steps += steps
        self.seconds += seconds
        self.timing["wall"] += seconds
        for key in TIMING_KEYS[1:]:
            self.timing[key] += float(report.extra.get(f"{key}_seconds", 0.0))

    def take(self) -> dict:
        out = {"episode_returns": self.returns, "episode_lengths": self.lengths, "losses": self.losses,
               "env_steps_per_second": self.steps / self.seconds if self.seconds > 0 else 0.0,
               "timing_seconds": self.timing}
        self.__init__()
        return out


class MemberWorker:
    """The member loop, separated from the process plumbing so any backend can host it.

    ``learner`` is built by the host (the backend decides how learners are made); ``send`` takes
    a :mod:`protocol <pbt_rl.runtime.protocol>` message, ``receive`` blocks for a command.
    """

    def __init__(self, spec: MemberSpec, learner: Any, send: Callable[[Any], None], receive: Callable[[], Any]):
        self.spec = spec
        self.learner = learner
        self.send = send
        self.receive = receive
        self.store = RunStore(spec.run_dir)
        config = spec.config
        self.total = config.run.total_env_steps
        self.ready_after = config.pbt.ready_after_steps
        self.max_chunk = max(1, self.ready_after // 8)
        self.chunk = spec.progress_steps or min(self.max_chunk, FIRST_CHUNK_STEPS)
        self.offset = 0  # learner.env_steps - this member's env steps (non-zero after an exploit)
        self.updates = 0
        self.last_checkpoint_steps = 0

    @property
    def env_steps(self) -> int:
        return int(self.learner.env_steps) - self.offset

    def _load(self, checkpoint: str, env_steps: int, hyperparameters: dict | None) -> None:
        """Load a checkpoint, keep this member's step counter, THEN apply hyperparameters."""
        payload = self.store.load_checkpoint(checkpoint, map_location=self.spec.device or "cpu")
        # Own checkpoint: a restart, restore counters and RNG streams too. A donor's: an exploit,
        # take weights, optimiser and normalisers but keep this member's own RNG streams.
        own = RunStore.checkpoint_member(checkpoint) == self.spec.member_id
        self.learner.load_state_dict(payload["learner"], resume=own)
        self.offset = int(self.learner.env_steps) - env_steps
        if hyperparameters:
            self.learner.set_hyperparameters(dict(hyperparameters))

    def _fingerprint(self) -> str:
        return weights_sha256(self.learner.state_dict())

    def _save(self) -> str:
        steps = self.env_steps
        payload = {
            "learner": self.learner.state_dict(),
            "member": {"member_id": self.spec.member_id, "seed": self.spec.seed, "env_steps": steps,
                       "updates": self.updates, "hyperparameters": self.learner.hyperparameters(),
                       "time": time.time()},
        }
        checkpoint = self.store.save_checkpoint(self.spec.member_id, steps, payload)
        self.last_checkpoint_steps = steps
        return checkpoint

    def _report(self, kind: type, pending: ProgressAccumulator, **extra: Any) -> Any:
        return kind(env_steps=self.env_steps, updates=self.updates, hyperparameters=self.learner.hyperparameters(),
                    **pending.take(), **extra)

    def run(self) -> None:
        restore = self.spec.restore
        if restore.checkpoint:
            self._load(restore.checkpoint, restore.env_steps, restore.hyperparameters)
        elif restore.hyperparameters:
            self.learner.set_hyperparameters(dict(restore.hyperparameters))
        self.updates = restore.updates
        self.last_checkpoint_steps = self.env_steps
        self.send(protocol.Started(self.env_steps, restore.checkpoint, self.learner.hyperparameters(),
                                   self._fingerprint()))
        pending = ProgressAccumulator()
        last_sent = time.monotonic()
        while True:
            target = min(self.last_checkpoint_steps + self.ready_after, self.total)
            while self.env_steps < target:
                start_steps, start = self.env_steps, time.perf_counter()
                report = self.learner.train(min(target, self.env_steps + self.chunk) + self.offset)
                self.updates += int(report.updates)
                seconds = time.perf_counter() - start
                pending.add(report, self.env_steps - start_steps, seconds)
                if not self.spec.progress_steps and seconds > 0:
                    rate = (self.env_steps - start_steps) / seconds
                    self.chunk = int(min(self.max_chunk, max(1.0, rate * CHUNK_SECONDS)))
                if self.env_steps < target and time.monotonic() - last_sent >= PROGRESS_SECONDS:
                    self.send(self._report(protocol.Progress, pending))
                    last_sent = time.monotonic()
            checkpoint = self._save()
            finished = self.env_steps >= self.total
            self.send(self._report(protocol.Done if finished else protocol.Ready, pending, checkpoint=checkpoint))
            last_sent = time.monotonic()
            if finished:
                return
            command = self.receive()
            if isinstance(command, protocol.Stop):
                return
            if isinstance(command, protocol.Exploit):
                self._exploit(command)

    def _exploit(self, command: protocol.Exploit) -> None:
        try:
            self._load(command.checkpoint, self.env_steps, command.hyperparameters)
        except CheckpointError as exc:
            self.send(protocol.ExploitFailed(command.checkpoint, str(exc)))
            return
        self.learner.drop_stale_experience()
        self.send(protocol.Applied(self.env_steps, command.checkpoint, self.learner.hyperparameters(),
                                   self._fingerprint()))


def failure_message(exc: BaseException) -> protocol.Failed:
    """What a member that stops with ``exc`` tells the controller (any backend)."""
    try:
        from pbt_rl.agents import TrainingDiverged
        diverged = isinstance(exc, TrainingDiverged)
    except ImportError:  # the learner package itself failed to import
        diverged = False
    return protocol.Failed(f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=20), diverged)


def close_learner(learner: Any) -> None:
    """Close a member's learner on the way out; a failure to close must not hide the first one."""
    if learner is None:
        return
    try:
        learner.close()
    except Exception:  # noqa: BLE001
        pass
