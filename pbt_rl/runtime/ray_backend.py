"""Members as Ray actors on a cluster (``run.backend: ray``; docs/cluster.md).

One actor per member host (``run.members_per_host`` members; 1 unless set), each in its own
worker process, placed in one bundle of a placement group that :mod:`~pbt_rl.runtime.ray_cluster`
reserves (spread or packed over the nodes). The actor hosts its members exactly as a local host
process does (:class:`~pbt_rl.runtime.member_host.MemberHost`): same learner factory, same
:class:`~pbt_rl.runtime.member.MemberWorker` per member, sharing as ``run.host_sharing`` says, same
messages tagged with each member's incarnation; the controller's side is the local backend's
:class:`~pbt_rl.runtime.backend.HostedMemberHandle` over a Ray transport (:class:`RayHost`).

Transport: the controller sends a command with a fire-and-forget actor call; the host's messages
wait in the actor's outbox, and the controller keeps one ``take`` call outstanding per host (it
returns as soon as a message is there, or after ``TAKE_SECONDS``). ``poll`` never blocks (a
``ray.wait`` with timeout 0); ``Backend.wait`` blocks on all outstanding ``take`` calls at once.

Faults: actors have ``max_restarts=0``; Ray does not restart them, the controller does. A member
that raises restarts on its live host; a host actor that dies (node lost, worker killed) fails
its outstanding call, and every member on it becomes :class:`protocol.Exited` with exit code
None, the controller's crash path; their restarts start a new actor in the same bundle, which Ray
moves to a live node when its node is lost. The actors belong to the controller's Ray job, so Ray
ends them when the controller dies (even by SIGKILL); a host that hears no ``take`` call for
``orphan_seconds`` ends itself as well. Ray is imported only here and in ray_cluster.py.
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
from pbt_rl.runtime.backend import HostedMemberHandle, HostMailboxes
from pbt_rl.runtime.member import DEFAULT_LEARNER_FACTORY, MemberSpec
from pbt_rl.runtime.member_host import (FromMember, HostSettings, MemberHost, StartMember, ToMember, host_settings,
                                        start_host)
from pbt_rl.runtime.resources import hosts_layout

TAKE_SECONDS = 1.0
"""Longest a ``take`` call waits in the actor for a message before it returns empty."""
ORPHAN_SECONDS = 120.0
"""A host actor whose controller has not asked for messages for this long assumes it is gone and
exits (a second guard behind Ray's fate-sharing of a job's actors with its driver)."""
KILL_WAIT_SECONDS = 5.0
NAMESPACE = "pbt-rl"
_log = logging.getLogger(__name__)


class HostActor:
    """The body of a member host's Ray actor (threaded: the host forwards while ``take``/``command`` talk)."""

    def __init__(self, learner_factory: str, settings: HostSettings, orphan_seconds: float = ORPHAN_SECONDS,
                 python_path: tuple[str, ...] = ()):
        for entry in reversed(python_path):  # lets a learner factory live outside installed packages
            if entry not in sys.path:
                sys.path.insert(0, entry)
        self._outbox: queue.Queue = queue.Queue()
        self._last_take = time.monotonic()
        self._host: MemberHost | None = None
        if orphan_seconds > 0:
            threading.Thread(target=self._watch_controller, args=(orphan_seconds,), name="controller-watch",
                             daemon=True).start()
        self._host = start_host(learner_factory, settings, self._outbox.put)  # None: HostFailed is sent
        if self._host is not None:
            threading.Thread(target=self._host.serve, name="member-host", daemon=True).start()

    def _watch_controller(self, orphan_seconds: float) -> None:
        while True:
            time.sleep(min(5.0, orphan_seconds / 4))
            if time.monotonic() - self._last_take > orphan_seconds:
                os._exit(1)  # the controller is gone: write nothing more into its run

    def where(self) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def command(self, item: StartMember | ToMember) -> None:
        """A start or a command from the controller, for the host to carry out."""
        if self._host is None:
            return  # the host could not start: HostFailed is in the outbox
        if isinstance(item, StartMember) and not self._run_dir_visible(item):
            return
        self._host.put(item)

    def _run_dir_visible(self, item: StartMember) -> bool:
        """Whether this node sees the run directory; if not, the member fails with the reason."""
        from pbt_rl.runtime.store import RunStore

        if not RunStore(item.spec.run_dir).state_path.is_file():
            error = (f"the run directory {item.spec.run_dir} is not visible on this node ({_node_ip()}): it must be "
                     f"on storage every node mounts (docs/cluster.md)")
            self._outbox.put(FromMember(item.incarnation, protocol.Failed(f"RuntimeError: {error}")))
            self._outbox.put(FromMember(item.incarnation, protocol.Exited(1)))
            return False
        return True

    def take(self, timeout: float = TAKE_SECONDS) -> list:
        """What the host's members sent since the last call (FromMember, HostFailed): waits up to
        ``timeout`` seconds for the first."""
        self._last_take = time.monotonic()
        items = []
        try:
            items.append(self._outbox.get(timeout=timeout))
            while True:
                items.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        return items


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for an error message
        return "unknown node"


class RayHost(HostMailboxes):
    """The controller's end of one host actor: commands as actor calls, one ``take`` outstanding."""

    def __init__(self, actor: Any, on_placed: Any):
        super().__init__()
        self.actor = actor
        self.node: dict | None = None
        self._on_placed = on_placed
        self._unplaced: list[int] = []  # members started before Ray said where the actor runs
        self._where = actor.where.remote()
        self._take = actor.take.remote(TAKE_SECONDS)

    def start(self, incarnation: int, spec: MemberSpec) -> None:
        super().start(incarnation, spec)
        self._unplaced.append(spec.member_id)
        self._note_placement()

    def _note_placement(self) -> None:
        import ray

        if self.node is None and ray.wait([self._where], timeout=0)[0]:
            try:
                self.node = ray.get(self._where)
            except ray.exceptions.RayError:
                self.node = {}
        if self.node is not None:
            for member_id in self._unplaced:
                self._on_placed(member_id, self.node)
            self._unplaced.clear()

    def send(self, item: object) -> bool:
        if self.ended:
            return False
        self.actor.command.remote(item)  # a dead actor shows up in the next pump
        return True

    def pump(self) -> None:
        import ray

        if self.ended:
            return
        self._note_placement()
        if not ray.wait([self._take], timeout=0)[0]:
            return
        try:
            items = ray.get(self._take)
        except ray.exceptions.RayError as exc:  # the actor died: node lost, worker killed, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _log.warning("a member host's Ray actor died (%s: %s)", type(exc).__name__, first[:300])
            self.ended = True
            return
        for item in items:
            self.deliver(item)
        self._take = self.actor.take.remote(TAKE_SECONDS)

    def alive(self) -> bool:
        return not self.ended and self.failure is None

    def kill(self) -> None:
        import ray

        if not self.ended:
            self.ended = True
            self._note_placement()
            try:
                ray.kill(self.actor, no_restart=True)
            except ray.exceptions.RayError:
                pass
            ray.wait([self._take], timeout=KILL_WAIT_SECONDS)

    def outstanding(self) -> Any | None:
        return None if self.ended else self._take

    def wait_object(self) -> None:
        return None  # Backend.wait blocks on outstanding() refs instead


class RayBackend:
    """Members on Ray actors, a host actor of ``run.members_per_host`` members per placement-group
    bundle (host ``h`` in bundle ``h``, member ``i`` on host ``i // k``).

    Built before the run directory is written: connecting, the capacity check and the
    reservation raise :class:`~pbt_rl.config.ConfigError` (one line, exit 2). ``learner_factory``
    (``module:function``) is imported in each actor, after ``python_path`` joins its sys.path;
    ``env_vars`` are set in the actors' processes (Ray runtime_env). ``placements`` lists
    ``(member_id, node)`` for every start, in order, once Ray has placed its host's actor.
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
        self.per_host, self.host_count = hosts_layout(config)
        self.hosts: dict[int, RayHost] = {}
        self.placements: list[tuple[int, dict]] = []
        self.starts = 0
        self._incarnations = 0
        self._closed = False
        self._started_here = ray_cluster.connect(config)
        try:
            self.bundle = ray_cluster.host_bundle(config)
            self.group = ray_cluster.reserve(config)
        except BaseException:
            ray_cluster.disconnect(self._started_here)
            raise
        import ray

        self.address = ray.get_runtime_context().gcs_address
        self.job_id = ray.get_runtime_context().get_job_id()
        self._actor_class = ray.remote(max_concurrency=4, max_restarts=0)(HostActor)

    def _spec_for_actor(self, spec: MemberSpec) -> MemberSpec:
        """Ray decides devices and cores: its GPU share (cuda:0 of what Ray lets it see) or the CPU,
        and env threads from the CPUs it reserved per member when env.num_threads is 0."""
        device = "cuda:0" if self.bundle.get("GPU", 0) > 0 else "cpu"
        threads = self.config.env.num_threads or max(1, int(self.config.run.ray_cpus_per_member))
        return dataclasses.replace(spec, device=device, num_threads=threads,
                                   run_dir=str(Path(spec.run_dir).absolute()))

    def _host(self, index: int, spec: MemberSpec) -> RayHost:
        """Host ``index``'s actor, started (in bundle ``index``) unless it is alive."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        host = self.hosts.get(index)
        if host is not None and host.alive():
            return host
        if host is not None:
            host.kill()  # a dead or failed actor: free its bundle for the new one
        self.starts += 1
        options: dict[str, Any] = {
            "num_cpus": self.bundle["CPU"], "num_gpus": self.bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
            "name": f"{spec.run_dir} host {index} job {self.job_id} start {self.starts}",
            "namespace": NAMESPACE,
        }
        if self.env_vars:
            options["runtime_env"] = {"env_vars": self.env_vars}
        actor = self._actor_class.options(**options).remote(self.learner_factory, host_settings(spec),
                                                            self.orphan_seconds, self.python_path)
        host = self.hosts[index] = RayHost(actor, lambda member_id, node: self.placements.append((member_id, node)))
        return host

    def start(self, spec: MemberSpec) -> HostedMemberHandle:
        spec = self._spec_for_actor(spec)
        host = self._host((spec.member_id // self.per_host) % self.host_count, spec)
        self._incarnations += 1
        host.start(self._incarnations, spec)
        return HostedMemberHandle(spec.member_id, host, self._incarnations)

    def wait(self, handles: list, timeout: float) -> None:
        import ray

        refs = [ref for host in self.hosts.values() if (ref := host.outstanding()) is not None]
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
        for host in self.hosts.values():
            host.kill()
        self.hosts.clear()
        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - the cluster may be gone already
            pass
        ray_cluster.disconnect(self._started_here)
