"""Members as Ray actors on a cluster (``run.backend: ray``; docs/cluster.md).

One actor per member, each in its own worker process, placed in one bundle of a placement group
that :mod:`~pbt_rl.runtime.ray_cluster` reserves (spread or packed over the nodes). The actor
hosts the member exactly as a local member process does (:func:`~pbt_rl.runtime.member.host_member`):
same learner factory, same :class:`~pbt_rl.runtime.member.MemberWorker`, same messages.

Transport: the controller sends a command with a fire-and-forget actor call; the member's
messages wait in the actor's outbox, and the handle keeps one ``take`` call outstanding (it
returns as soon as a message is there, or after ``TAKE_SECONDS``). ``poll`` never blocks (a
``ray.wait`` with timeout 0); ``Backend.wait`` blocks on all outstanding ``take`` calls at once.

Faults: actors have ``max_restarts=0``; Ray does not restart them, the controller does (through
:meth:`RayBackend.start`, into the same bundle, which Ray moves to a live node when its node is
lost). An actor that dies (node lost, worker killed) fails its outstanding call: the handle
turns that into :class:`protocol.Exited` with exit code None, the controller's crash path. The
actors belong to the controller's Ray job, so Ray ends them when the controller dies (even by
SIGKILL); a member that hears no ``take`` call for ``orphan_seconds`` ends itself as well.
Ray is imported only here and in ray_cluster.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pbt_rl.config import ExperimentConfig
from pbt_rl.runtime import protocol
from pbt_rl.runtime.member import DEFAULT_LEARNER_FACTORY, MemberSpec, failure_message, host_member

TAKE_SECONDS = 1.0
"""Longest a ``take`` call waits in the actor for a message before it returns empty."""
ORPHAN_SECONDS = 120.0
"""A member whose controller has not asked for messages for this long assumes it is gone and
exits (a second guard behind Ray's fate-sharing of a job's actors with its driver)."""
KILL_WAIT_SECONDS = 5.0
NAMESPACE = "pbt-rl"
_log = logging.getLogger(__name__)
_WAKE = object()


class MemberActor:
    """The body of a member's Ray actor (threaded: ``run`` trains while ``take``/``command`` talk)."""

    def __init__(self, orphan_seconds: float = ORPHAN_SECONDS, python_path: tuple[str, ...] = ()):
        for entry in reversed(python_path):  # lets a learner factory live outside installed packages
            if entry not in sys.path:
                sys.path.insert(0, entry)
        self._outbox: queue.Queue = queue.Queue()
        self._inbox: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._exitcode: int | None = None
        self._last_take = time.monotonic()
        if orphan_seconds > 0:
            threading.Thread(target=self._watch_controller, args=(orphan_seconds,), name="controller-watch",
                             daemon=True).start()

    def _watch_controller(self, orphan_seconds: float) -> None:
        while not self._finished.is_set():
            time.sleep(min(5.0, orphan_seconds / 4))
            if time.monotonic() - self._last_take > orphan_seconds:
                os._exit(1)  # the controller is gone: write nothing more into its run

    def where(self) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def run(self, spec: MemberSpec, learner_factory: str) -> int:
        code = 0
        try:
            from pbt_rl.runtime.store import RunStore

            if not RunStore(spec.run_dir).state_path.is_file():
                raise RuntimeError(f"the run directory {spec.run_dir} is not visible on this node "
                                   f"({_node_ip()}): it must be on storage every node mounts (docs/cluster.md)")
            host_member(spec, learner_factory, self._outbox.put, self._inbox.get)
        except BaseException as exc:  # noqa: BLE001 - reported to the controller, as a member process does
            self._outbox.put(failure_message(exc))
            code = 1
        self._exitcode = code
        self._finished.set()
        self._outbox.put(_WAKE)
        return code

    def command(self, command: protocol.Command) -> None:
        self._inbox.put(command)

    def take(self, timeout: float = TAKE_SECONDS) -> tuple[list, bool, int | None]:
        """(messages so far, whether the member has ended and all its messages are taken, exit code)."""
        self._last_take = time.monotonic()
        messages = []
        try:
            messages.append(self._outbox.get(timeout=timeout))
            while True:
                messages.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        finished = self._finished.is_set() and self._outbox.empty()
        return [m for m in messages if m is not _WAKE], finished, self._exitcode


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for an error message
        return "unknown node"


class RayMemberHandle:
    """The controller's view of one member actor."""

    def __init__(self, actor: Any, spec: MemberSpec, learner_factory: str, on_placed: Any):
        self.member_id = spec.member_id
        self.actor = actor
        self.node: dict | None = None
        self._on_placed = on_placed
        self._where = actor.where.remote()
        self._run = actor.run.remote(spec, learner_factory)
        self._take = actor.take.remote(TAKE_SECONDS)
        self._exited = False

    def outstanding(self) -> Any | None:
        return None if self._exited else self._take

    def _note_placement(self) -> None:
        import ray

        if self.node is None and ray.wait([self._where], timeout=0)[0]:
            try:
                self.node = ray.get(self._where)
            except ray.exceptions.RayError:
                self.node = {}
            self._on_placed(self.member_id, self.node)

    def send(self, message: protocol.Command) -> bool:
        if self._exited:
            return False
        self.actor.command.remote(message)  # a dead actor shows up in the next poll
        return True

    def poll(self) -> list[protocol.MemberMessage]:
        import ray

        if self._exited:
            return []
        self._note_placement()
        if not ray.wait([self._take], timeout=0)[0]:
            return []
        try:
            messages, finished, code = ray.get(self._take)
        except ray.exceptions.RayError as exc:  # the actor died: node lost, worker killed, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _log.warning("member %d: its Ray actor died (%s: %s)", self.member_id, type(exc).__name__, first[:300])
            messages, finished, code = [], True, None
        if finished:
            self.kill()  # frees the bundle for a restart
            return [*messages, protocol.Exited(code)]
        self._take = self.actor.take.remote(TAKE_SECONDS)
        return list(messages)

    def alive(self) -> bool:
        return not self._exited

    def kill(self) -> None:
        import ray

        if not self._exited:
            self._exited = True
            self._note_placement()
            try:
                ray.kill(self.actor, no_restart=True)
            except ray.exceptions.RayError:
                pass
            ray.wait([self._run], timeout=KILL_WAIT_SECONDS)

    def wait_object(self) -> None:
        return None  # Backend.wait blocks on outstanding() refs instead


class RayBackend:
    """Members as Ray actors, one bundle of a placement group each.

    Built before the run directory is written: connecting, the capacity check and the
    reservation raise :class:`~pbt_rl.config.ConfigError` (one line, exit 2). ``learner_factory``
    (``module:function``) is imported in each actor, after ``python_path`` joins its sys.path;
    ``env_vars`` are set in the actors' processes (Ray runtime_env). ``placements`` lists
    ``(member_id, node)`` for every start, in order, once Ray has placed the actor.
    """

    def __init__(self, config: ExperimentConfig, *, learner_factory: str = DEFAULT_LEARNER_FACTORY,
                 env_vars: dict[str, str] | None = None, python_path: tuple[str, ...] = (),
                 orphan_seconds: float = ORPHAN_SECONDS):
        from pbt_rl.runtime import ray_cluster

        self.config = config
        self.learner_factory = learner_factory
        self.env_vars = dict(env_vars or {})
        self.python_path = tuple(str(p) for p in python_path)
        self.orphan_seconds = orphan_seconds
        self.handles: list[RayMemberHandle] = []
        self.placements: list[tuple[int, dict]] = []
        self.starts = 0
        self._closed = False
        self._started_here = ray_cluster.connect(config)
        try:
            self.bundle = ray_cluster.member_bundle(config)
            self.group = ray_cluster.reserve(config)
        except BaseException:
            ray_cluster.disconnect(self._started_here)
            raise
        import ray

        self.address = ray.get_runtime_context().gcs_address
        self.job_id = ray.get_runtime_context().get_job_id()
        self._actor_class = ray.remote(max_concurrency=4, max_restarts=0)(MemberActor)

    def _spec_for_actor(self, spec: MemberSpec) -> MemberSpec:
        """Ray decides devices and cores: its GPU share (cuda:0 of what Ray lets it see) or the CPU,
        and env threads from the CPUs it reserved when env.num_threads is 0."""
        device = "cuda:0" if self.bundle.get("GPU", 0) > 0 else "cpu"
        threads = self.config.env.num_threads or max(1, int(self.config.run.ray_cpus_per_member))
        return dataclasses.replace(spec, device=device, num_threads=threads,
                                   run_dir=str(Path(spec.run_dir).absolute()))

    def start(self, spec: MemberSpec) -> RayMemberHandle:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.starts += 1
        options: dict[str, Any] = {
            "num_cpus": self.bundle["CPU"], "num_gpus": self.bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=spec.member_id % self.config.pbt.population_size),
            "name": f"{spec.run_dir} member {spec.member_id} job {self.job_id} start {self.starts}",
            "namespace": NAMESPACE,
        }
        if self.env_vars:
            options["runtime_env"] = {"env_vars": self.env_vars}
        actor = self._actor_class.options(**options).remote(self.orphan_seconds, self.python_path)
        handle = RayMemberHandle(actor, self._spec_for_actor(spec), self.learner_factory,
                                 lambda member_id, node: self.placements.append((member_id, node)))
        self.handles.append(handle)
        return handle

    def wait(self, handles: list, timeout: float) -> None:
        import ray

        refs = [ref for h in handles if (ref := h.outstanding()) is not None]
        if refs:
            ray.wait(refs, num_returns=1, timeout=timeout)
        else:
            time.sleep(timeout)

    def close(self) -> None:
        """Kill the actors, free the reservation, leave the cluster (once: a Ray call after
        leaving would join a cluster again by itself)."""
        from ray.util.placement_group import remove_placement_group

        from pbt_rl.runtime import ray_cluster

        if self._closed:
            return
        self._closed = True
        for handle in self.handles:
            handle.kill()
        self.handles.clear()
        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass
        ray_cluster.disconnect(self._started_here)
