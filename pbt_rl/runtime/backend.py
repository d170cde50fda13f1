"""Where members run. The controller sees only :class:`MemberHandle` and :class:`Backend`.

``LocalProcessBackend`` hosts each member in its own process on this machine (multiprocessing,
spawn context: no forked torch/envpool state). Another backend (e.g. Ray actors on a cluster)
implements the same two small interfaces around :class:`pbt_rl.runtime.member.MemberWorker`,
carrying the :mod:`protocol <pbt_rl.runtime.protocol>` messages; the backend also decides how
learners are built. The scheduler, learners and controller do not change.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection, wait
from typing import Protocol

from pbt_rl.runtime import protocol
from pbt_rl.runtime.member import DEFAULT_LEARNER_FACTORY, MemberSpec, member_main

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


class LocalProcessHandle:
    def __init__(self, spec: MemberSpec, context: multiprocessing.context.BaseContext, learner_factory: str):
        self.member_id = spec.member_id
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(
            target=member_main, args=(spec, child_end, os.getpid(), learner_factory),
            name=f"pbt-member-{spec.member_id}", daemon=True,
        )
        self.process.start()
        child_end.close()  # so EOF reaches us when the child dies
        self._exited = False

    def send(self, message: protocol.Command) -> bool:
        try:
            self.connection.send(message)
            return True
        except (OSError, EOFError, BrokenPipeError, ValueError):
            return False

    def poll(self) -> list[protocol.MemberMessage]:
        messages: list[protocol.MemberMessage] = []
        if self._exited:
            return messages
        try:
            while self.connection.poll():
                messages.append(self.connection.recv())
        except (EOFError, OSError, ValueError):
            # The pipe closed: the process ended (or is ending). Reap it for the exit code.
            self.process.join(timeout=KILL_GRACE_SECONDS)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self._exited = True
            messages.append(protocol.Exited(self.process.exitcode))
        return messages

    def alive(self) -> bool:
        return not self._exited and self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=KILL_GRACE_SECONDS)
        self._exited = True
        try:
            self.connection.close()
        except OSError:
            pass

    def wait_object(self) -> Connection | None:
        return None if self._exited else self.connection


class LocalProcessBackend:
    """Members as processes of this machine.

    ``learner_factory`` (``module:function``, imported in each member process) builds the
    learners: :func:`pbt_rl.agents.make_learner` unless a test or another tool hosts its own.
    """

    def __init__(self, learner_factory: str = DEFAULT_LEARNER_FACTORY) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.learner_factory = learner_factory
        self.handles: list[LocalProcessHandle] = []

    def start(self, spec: MemberSpec) -> LocalProcessHandle:
        handle = LocalProcessHandle(spec, self.context, self.learner_factory)
        self.handles.append(handle)
        return handle

    def wait(self, handles: list, timeout: float) -> None:
        objects = [o for h in handles if (o := h.wait_object()) is not None]
        if objects:
            wait(objects, timeout=timeout)
        else:
            import time

            time.sleep(timeout)

    def close(self) -> None:
        for handle in self.handles:
            handle.kill()
        self.handles.clear()


def make_backend(name: str, config=None) -> Backend:
    """The backend ``run.backend`` names. 'ray' joins the cluster and reserves the members'
    resources now (``config``: the experiment's), so call it before writing anything."""
    if name == "local":
        return LocalProcessBackend()
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
