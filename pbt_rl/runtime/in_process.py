"""Members as threads of the controller's own process, with learners from any callable.

The one seam for running a population without member processes: tests use it with fake
learners (no process start-up, no importable factory string), and notebooks can use it for tiny
populations. It speaks the same :mod:`protocol <pbt_rl.runtime.protocol>` through the same
:class:`MemberWorker` as the process backend. What a thread cannot do is die from outside: kill
marks the member stopped, and its thread ends at its next message or command; process deaths,
hangs and parent-death handling are tested with :class:`LocalProcessBackend`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from pbt_rl.machine_use import MEMBER, set_thread_name
from pbt_rl.runtime import protocol
from pbt_rl.runtime.member import MemberSpec, MemberWorker, close_learner, failure_message

JOIN_SECONDS = 5.0


class _Killed(Exception):
    """Raised inside a member thread whose handle was killed."""


class InProcessHandle:
    def __init__(self, spec: MemberSpec, learner_factory: Callable[..., Any], wake: threading.Event):
        self.member_id = spec.member_id
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._killed = threading.Event()
        self._wake = wake
        self._exited = False
        self._thread = threading.Thread(target=self._main, args=(spec, learner_factory),
                                        name=f"pbt-member-{spec.member_id}", daemon=True)
        self._thread.start()

    def _emit(self, message: Any) -> None:
        if self._killed.is_set():
            raise _Killed()
        self._outbox.put(message)
        self._wake.set()

    def _receive(self) -> Any:
        command = self._inbox.get()
        if command is None:
            raise _Killed()
        return command

    def _main(self, spec: MemberSpec, learner_factory: Callable[..., Any]) -> None:
        set_thread_name(MEMBER)  # its envs' and torch's threads start from it with that name
        learner, code = None, 0
        try:
            learner = learner_factory(spec.config, seed=spec.seed, device=spec.device, num_threads=spec.num_threads)
            MemberWorker(spec, learner, self._emit, self._receive).run()
        except _Killed:
            code = None
        except Exception as exc:  # noqa: BLE001 - reported to the controller as the process backend does
            self._outbox.put(failure_message(exc))
            code = 1
        finally:
            close_learner(learner)
            self._outbox.put(protocol.Exited(code))
            self._wake.set()

    def send(self, message: protocol.Command) -> bool:
        if self._exited or self._killed.is_set() or not self._thread.is_alive():
            return False
        self._inbox.put(message)
        return True

    def poll(self) -> list[protocol.MemberMessage]:
        messages: list[protocol.MemberMessage] = []
        while not self._exited:
            try:
                message = self._outbox.get_nowait()
            except queue.Empty:
                break
            messages.append(message)
            self._exited = isinstance(message, protocol.Exited)
        return messages

    def alive(self) -> bool:
        return not self._exited and self._thread.is_alive()

    def kill(self) -> None:
        self._killed.set()
        self._inbox.put(None)
        self._thread.join(timeout=JOIN_SECONDS)
        self._exited = True

    def wait_object(self) -> None:
        return None


class InProcessBackend:
    """Each member a thread of this process; ``learner_factory(config, seed, device=, num_threads=)``."""

    def __init__(self, learner_factory: Callable[..., Any]):
        self.learner_factory = learner_factory
        self.handles: list[InProcessHandle] = []
        self._wake = threading.Event()

    def start(self, spec: MemberSpec) -> InProcessHandle:
        handle = InProcessHandle(spec, self.learner_factory, self._wake)
        self.handles.append(handle)
        return handle

    def wait(self, handles: list, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.kill()
        self.handles.clear()
