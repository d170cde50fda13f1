"""A member host: one process (or one Ray actor) that runs several members, each in its own thread.

Why: a process per member costs a Python interpreter, a torch import (~300 MB resident on the CPU
machine) and, on a GPU, a CUDA context per member, all time-slicing one GPU. A host pays those
once for ``run.members_per_host`` members. Each member keeps everything it is: its own learner
(weights, optimiser, normalisers, generators, envs, unroll length), its own
:class:`~pbt_rl.runtime.member.MemberWorker` loop, its checkpoints and its messages. The members
of a host share the process-wide settings (:func:`~pbt_rl.runtime.host.configure_process`, made
once by the host) and the interpreter. How they share it is ``run.host_sharing``
(:func:`sharing_factory`): taking turns at training (:class:`Turns`), training at once and
acting in one batched forward pass per step (:mod:`pbt_rl.agents.acting_pool`), or training at
once, each acting alone.

Inside the process each member is an
:class:`~pbt_rl.runtime.in_process.InProcessHandle` (a thread speaking the
:mod:`protocol <pbt_rl.runtime.protocol>`). The host's main loop forwards the controller's
commands to them and their messages to the controller, together (one pipe; for a Ray actor its
``take`` calls, runtime/ray_backend.py), tagged with the member's
*incarnation*: the number the backend gave this start of the member, so that a restarted
member never receives, and the controller never reads, the messages of its previous life.

Faults (the backend's side is :class:`pbt_rl.runtime.backend.HostedMemberHandle`): an exception
in a member ends that member's thread only (``Failed``, then ``Exited``), and the host takes the
member's restart. When the host process dies (kill -9, OOM) every member on it has ended. A
hung member (no message for too long) cannot be stopped alone: its host is killed, and the
other members of that host restart from their restore points too.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from pbt_rl.runtime import protocol
from pbt_rl.runtime.member import MemberSpec, die_with_parent, failure_message, load_factory

WAKE_SECONDS = 1.0


@dataclass(frozen=True)
class HostSettings:
    """The process-wide settings of a host, made once before its first learner (runtime/host.py).

    ``num_threads`` is one member's share of the cores (its env threads; on the CPU also torch's
    intra-op threads unless ``torch_threads``): the members of a host each act in their own
    thread, so each keeps the share it would have in a process of its own.
    """

    device: str | None
    num_threads: int
    torch_threads: int = 0
    gpu_wait: str = "auto"
    sharing: str = "turns"
    environment: tuple[tuple[str, str], ...] = ()
    """Environment variables set before the host touches CUDA (a CUDA MPS daemon's pipes: runtime/mps.py)."""


@dataclass(frozen=True)
class StartMember:
    """controller -> host: start ``spec`` as this incarnation."""

    incarnation: int
    spec: MemberSpec


@dataclass(frozen=True)
class ToMember:
    """controller -> host: a command for one incarnation."""

    incarnation: int
    command: protocol.Command


@dataclass(frozen=True)
class FromMember:
    """host -> controller: a message of one incarnation (its ``Exited`` ends it)."""

    incarnation: int
    message: protocol.MemberMessage


@dataclass(frozen=True)
class HostFailed:
    """host -> controller: the host itself could not start (the members it was given have failed)."""

    failure: protocol.Failed


def host_settings(spec: MemberSpec) -> HostSettings:
    """The settings of a host whose members are specs like ``spec`` (one config per run)."""
    run = spec.config.run
    device = spec.device if spec.device is not None else spec.config.agent.device
    return HostSettings(device, spec.num_threads, run.torch_threads, run.gpu_wait, run.host_sharing)


class Turns:
    """``run.host_sharing: turns``: the members of a host train one at a time, in the order they
    asked (first come, first served).

    Threads of one process share one interpreter lock; members that trained at the same time would
    hand it to each other at every env step and torch call (measured on 2 cores, quickstart, 4
    members: 36.3k env steps/s as 4 processes, 10.8k as 4 free threads of one process, 13.7k
    taking turns). Taking turns, a host does one member's work at a time, as a process of its own
    would, with nothing lost to the lock. Only ``learner.train`` takes turns; checkpoints and messages do not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._busy = False

    @property
    def waiting(self) -> int:
        """Members waiting for their turn now."""
        with self._lock:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        """Whether a member has the turn now."""
        with self._lock:
            return self._busy

    @contextlib.contextmanager
    def turn(self):
        with self._lock:
            mine = None
            if self._busy:
                mine = threading.Event()
                self._waiting.append(mine)
            self._busy = True
        if mine is not None:
            mine.wait()  # the member before hands its turn to this one
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting.popleft().set()
                else:
                    self._busy = False


class TakingTurns:
    """A learner whose ``train`` calls wait for the host's :class:`Turns`; everything else is the
    learner's own (attributes and methods pass through)."""

    def __init__(self, learner: Any, turns: Turns):
        self._learner = learner
        self._turns = turns

    def train(self, until_env_steps: int) -> Any:
        with self._turns.turn():
            return self._learner.train(until_env_steps)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._learner, name)


def sharing_factory(learner_factory: Any, sharing: str) -> Any:
    """The host's learner factory for ``run.host_sharing``: ``turns`` wraps each learner in
    :class:`TakingTurns`, ``batched`` lets them act through one
    :class:`~pbt_rl.agents.acting_pool.ActingPool`, ``free`` leaves them alone."""
    if sharing == "turns":
        turns = Turns()
        return lambda *args, **kwargs: TakingTurns(learner_factory(*args, **kwargs), turns)
    if sharing == "batched":
        from pbt_rl.agents.acting_pool import ActingPool

        pool = ActingPool()

        def acting_together(*args: Any, **kwargs: Any) -> Any:
            learner = learner_factory(*args, **kwargs)
            if hasattr(learner, "act_with"):  # a learner of pbt_rl.agents (a test's fake acts alone)
                learner.act_with(pool)
            return learner

        return acting_together
    return learner_factory


class MemberHost:
    """The members of one host and the forwarding between them and the controller.

    ``send`` carries a :class:`FromMember` or :class:`HostFailed` to the controller; every call
    is made from the thread that calls :meth:`serve`.
    """

    def __init__(self, learner_factory: Any, send: Any, sharing: str = "turns"):
        self.learner_factory = sharing_factory(learner_factory, sharing)
        self.send = send
        self.wake = threading.Event()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.members: dict[int, Any] = {}

    def put(self, item: StartMember | ToMember | None) -> None:
        """From the controller (any thread); None: the controller is gone."""
        self.inbox.put(item)
        self.wake.set()

    def serve(self) -> None:
        """Forward until the controller is gone. Members' messages go out in the order they came."""
        from pbt_rl.runtime.in_process import InProcessHandle

        while True:
            self.wake.wait(WAKE_SECONDS)
            self.wake.clear()  # before draining: a message that comes after this sets it again
            while True:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return
                if isinstance(item, StartMember):
                    self.members[item.incarnation] = InProcessHandle(item.spec, self.learner_factory, self.wake)
                elif item.incarnation in self.members:
                    self.members[item.incarnation].send(item.command)
            for incarnation, member in list(self.members.items()):
                for message in member.poll():
                    self.send(FromMember(incarnation, message))
                    if isinstance(message, protocol.Exited):
                        del self.members[incarnation]


def start_host(learner_factory: str, settings: HostSettings, send: Any) -> MemberHost | None:
    """This process set up for its members (once), and their host; None when that failed, after
    sending :class:`HostFailed` (a process host or a Ray actor alike)."""
    try:
        from pbt_rl.runtime.host import configure_process

        os.environ.update(dict(settings.environment))
        configure_process(settings.device, num_threads=settings.num_threads,
                          torch_threads=settings.torch_threads, gpu_wait=settings.gpu_wait)
        return MemberHost(load_factory(learner_factory), send, settings.sharing)
    except BaseException as exc:  # noqa: BLE001 - reported to the controller
        try:
            send(HostFailed(failure_message(exc)))
        except (OSError, EOFError, BrokenPipeError):
            pass
        return None


def host_main(connection: Any, parent_pid: int, learner_factory: str, settings: HostSettings) -> None:
    """Entry point of a member host process (multiprocessing target)."""
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the controller handles it and stops the members.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host = start_host(learner_factory, settings, connection.send)
    if host is None:
        sys.exit(1)

    def read() -> None:
        try:
            while True:
                host.put(connection.recv())
        except (EOFError, OSError):
            host.put(None)  # the controller is gone or closed our pipe

    threading.Thread(target=read, name="host-reader", daemon=True).start()
    try:
        host.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        try:
            connection.close()
        except OSError:
            pass
