"""Where members run. The controller sees only :class:`MemberHandle` and :class:`Backend`.

``LocalProcessBackend`` hosts members in processes of this machine (multiprocessing, spawn context:
no forked torch/envpool state), ``run.members_per_host`` to a process (runtime/member_host.py).
Another backend (Ray actors on a cluster, ray_backend.py) implements the same two small
interfaces, carrying the :mod:`protocol <pbt_rl.runtime.protocol>` messages; it can reuse
:class:`HostedMemberHandle` by giving it a :class:`HostMailboxes` transport. The backend also
decides how learners are built. The scheduler, learners and controller do not change.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import sys
from multiprocessing.connection import Connection, wait
from typing import Protocol

from pbt_rl.runtime import protocol
from pbt_rl.runtime.member import DEFAULT_LEARNER_FACTORY, MemberSpec
from pbt_rl.runtime.member_host import HostFailed, HostSettings, StartMember, ToMember, host_main, host_settings
from pbt_rl.runtime.resources import hosts_layout

KILL_GRACE_SECONDS = 5.0


class MemberHandle(Protocol):
    """The controller's view of one running member."""

    member_id: int

    def send(self, message: protocol.Command) -> bool:
        """Deliver a command; False if the member is gone."""

    def poll(self) -> list[protocol.MemberMessage]:
        """Messages received so far (non-blocking). A :class:`protocol.Exited` ends the stream."""

    def alive(self) -> bool: ...

    def kill(self) -> None:
        """Stop the member now and wait for it (idempotent)."""

    def wait_object(self) -> object | None:
        """Something :func:`multiprocessing.connection.wait` can block on, or None."""


class Backend(Protocol):
    def start(self, spec: MemberSpec) -> MemberHandle: ...

    def wait(self, handles: list[MemberHandle], timeout: float) -> None:
        """Block until some handle may have messages, or ``timeout`` seconds."""

    def close(self) -> None: ...


class HostMailboxes:
    """The controller's end of one member host, whatever carries its messages (a pipe here, a Ray
    actor in ray_backend.py): what the host sent so far, kept per incarnation until that member's
    handle takes it. A transport implements ``send``, ``pump``, ``alive``, ``kill`` and
    ``wait_object``, and sets ``failure`` (the host could not start), ``ended`` and ``exitcode``."""

    def __init__(self) -> None:
        self.mailboxes: dict[int, list] = {}
        self.failure: protocol.Failed | None = None
        self.ended = False
        self.exitcode: int | None = None

    def deliver(self, item: object) -> None:
        """Route one item the host sent (a FromMember or HostFailed)."""
        if isinstance(item, HostFailed):
            self.failure = item.failure
        elif item.incarnation in self.mailboxes:  # else: a forgotten incarnation's
            self.mailboxes[item.incarnation].append(item.message)

    def start(self, incarnation: int, spec: MemberSpec) -> None:
        self.mailboxes[incarnation] = []
        self.send(StartMember(incarnation, spec))

    def take(self, incarnation: int) -> list:
        self.pump()
        messages, self.mailboxes[incarnation] = self.mailboxes.get(incarnation, []), []
        return messages

    def forget(self, incarnation: int) -> None:
        self.mailboxes.pop(incarnation, None)

    def send(self, item: object) -> bool:
        raise NotImplementedError

    def pump(self) -> None:
        raise NotImplementedError


class _HostProcess(HostMailboxes):
    """A member host process of this machine (runtime/member_host.py) and its pipe."""

    def __init__(self, index: int, context: multiprocessing.context.BaseContext, learner_factory: str,
                 settings: HostSettings):
        super().__init__()
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(
            target=host_main, args=(child_end, os.getpid(), learner_factory, settings),
            name=f"pbt-host-{index}", daemon=True,
        )
        self.process.start()
        child_end.close()  # so EOF reaches us when the child dies

    def send(self, item: object) -> bool:
        try:
            self.connection.send(item)
            return True
        except (OSError, EOFError, BrokenPipeError, ValueError):
            return False

    def pump(self) -> None:
        """Read everything the host has sent so far (non-blocking) into the mailboxes."""
        if self.ended:
            return
        try:
            while self.connection.poll():
                self.deliver(self.connection.recv())
        except (EOFError, OSError, ValueError):
            # The pipe closed: the process ended (or is ending). Reap it for the exit code.
            self.process.join(timeout=KILL_GRACE_SECONDS)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self.ended, self.exitcode = True, self.process.exitcode

    def alive(self) -> bool:
        return not self.ended and self.failure is None and self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=KILL_GRACE_SECONDS)
        self.pump()  # what the host sent before it ended still reaches its members' handles
        self.ended, self.exitcode = True, self.process.exitcode
        try:
            self.connection.close()
        except OSError:
            pass

    def wait_object(self) -> Connection | None:
        return None if self.ended else self.connection


class HostedMemberHandle:
    """One member (one incarnation of it) on a member host (a process, or a Ray actor)."""

    def __init__(self, member_id: int, host: HostMailboxes, incarnation: int):
        self.member_id = member_id
        self.host = host
        self.incarnation = incarnation
        self._exited = False
        self._ending = False  # it reported Failed: its thread ends by itself

    def send(self, message: protocol.Command) -> bool:
        if self._exited or not self.host.alive():
            return False
        return self.host.send(ToMember(self.incarnation, message))

    def poll(self) -> list[protocol.MemberMessage]:
        if self._exited:
            return []
        messages = self.host.take(self.incarnation)
        if self.host.failure is not None and not self._ending:
            messages.append(self.host.failure)  # the host could not start: neither could this member
        for i, message in enumerate(messages):
            self._ending |= isinstance(message, protocol.Failed)
            if isinstance(message, protocol.Exited):
                messages = messages[: i + 1]
                break
        else:
            if self.host.ended:  # the process died: this member ended with it
                messages.append(protocol.Exited(self.host.exitcode))
        if messages and isinstance(messages[-1], protocol.Exited):
            self._exited = True
            self.host.forget(self.incarnation)
        return messages

    def alive(self) -> bool:
        return not self._exited and self.host.alive()

    def kill(self) -> None:
        """Stop this member now. One that failed ends by itself; one that is still running (hung)
        cannot be stopped alone: its host is killed, and its other members end with it."""
        if not (self._exited or self._ending):
            self.host.kill()
        self._exited = True
        self.host.forget(self.incarnation)

    def wait_object(self) -> Connection | None:
        return None if self._exited else self.host.wait_object()


class LocalProcessBackend:
    """Members on host processes of this machine, ``run.members_per_host`` to a host
    (:func:`~pbt_rl.runtime.resources.members_per_host`; member ``i`` on host ``i // k``).

    ``learner_factory`` (``module:function``, imported in each host process) builds the
    learners: :func:`pbt_rl.agents.make_learner` unless a test or another tool hosts its own.
    A member restarted while its host lives starts again on that host; a member whose host died
    starts a new host for its slot.
    """

    def __init__(self, learner_factory: str = DEFAULT_LEARNER_FACTORY, config=None) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.learner_factory = learner_factory
        self.hosts: dict[int, _HostProcess] = {}
        self._incarnations = itertools.count()
        self.mps = _start_mps(config) if config is not None else None

    def start(self, spec: MemberSpec) -> HostedMemberHandle:
        per_host, _ = hosts_layout(spec.config)
        index = spec.member_id // per_host
        host = self.hosts.get(index)
        if host is None or not host.alive():
            if host is not None:
                host.kill()  # reap a dead or failed host before its slot gets a new one
            settings = host_settings(spec)
            if self.mps is not None:
                settings = dataclasses.replace(settings, environment=tuple(self.mps.environment().items()))
            host = self.hosts[index] = _HostProcess(index, self.context, self.learner_factory, settings)
        incarnation = next(self._incarnations)
        host.start(incarnation, spec)
        return HostedMemberHandle(spec.member_id, host, incarnation)

    def wait(self, handles: list, timeout: float) -> None:
        objects = list({id(o): o for h in handles if (o := h.wait_object()) is not None}.values())
        if objects:
            wait(objects, timeout=timeout)
        else:
            import time

            time.sleep(timeout)

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill()
        self.hosts.clear()
        if self.mps is not None:
            self.mps.stop()  # after the hosts: its clients have ended


def _start_mps(config):
    """The run's private MPS daemon when ``run.cuda_mps`` wants one (runtime/mps.py), else None.

    Raises:
        ConfigError: ``on`` and the daemon cannot start (``auto`` says so in one line and goes on
            without: the hosts then time-slice the GPU).
    """
    from pbt_rl.runtime import mps

    if not mps.plan(config):
        return None
    try:
        return mps.MpsDaemon.start()
    except mps.MpsError as exc:
        if config.run.cuda_mps == "on":
            from pbt_rl.config import ConfigError

            raise ConfigError(f"run.cuda_mps: {exc}") from None
        print(f"run.cuda_mps: auto: no MPS daemon ({exc}); the hosts time-slice the GPU", file=sys.stderr)
        return None


def make_backend(name: str, config=None) -> Backend:
    """The backend ``run.backend`` names. 'ray' joins the cluster and reserves the members'
    resources now (``config``: the experiment's), so call it before writing anything."""
    if name == "local":
        return LocalProcessBackend(config=config)
    from pbt_rl.config import ConfigError

    if name == "ray":
        if config is None:
            raise ConfigError("run.backend=ray: the backend needs the experiment config (make_backend(name, config))")
        try:
            from pbt_rl.runtime.ray_backend import RayBackend
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("run.backend=ray needs Ray: pip install 'pbt-rl[ray]'") from None
        return RayBackend(config)
    raise ConfigError(f"run.backend: {name!r} is not available; choose 'local' or 'ray'")
