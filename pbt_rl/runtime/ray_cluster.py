"""Joining a Ray cluster for the Ray backend, and the checks made before anything is written.

``connect`` joins the cluster that ``run.ray_address`` names (else ``RAY_ADDRESS``, Ray's own
convention), or starts a Ray instance on this machine for the run when neither is set.
``reserve`` checks that the cluster can host every member (``run.ray_cpus_per_member`` and
``run.ray_gpus_per_member`` each, a host's ``run.members_per_host`` members on one node) and
reserves them as one Ray placement group, a bundle per host
(strategy ``SPREAD`` or ``PACK`` from ``run.ray_placement``). Every failure is a
:class:`~pbt_rl.config.ConfigError`: one line, exit code 2, and since the backend is built before
the run directory, nothing is written. Only the Ray backend imports this module (and Ray).
"""

from __future__ import annotations

import logging
import math
import os
import socket

from pbt_rl.config import ConfigError, ExperimentConfig

CONNECT_SECONDS = 5.0
"""How long a TCP connection to the head's address may take before the cluster counts as
unreachable (``ray.init`` itself retries for minutes)."""
RESERVE_SECONDS = 60.0
"""How long the placement group may wait for resources that other jobs hold."""
PLACEMENT_STRATEGIES = {"spread": "SPREAD", "pack": "PACK"}


def cluster_address(config: ExperimentConfig) -> str:
    """``run.ray_address``, else ``RAY_ADDRESS``, else '' (a Ray instance of this run's own)."""
    return config.run.ray_address or os.environ.get("RAY_ADDRESS", "")


def _check_reachable(address: str) -> None:
    """A ``host:port`` address must accept a TCP connection: one line instead of a long retry."""
    if address in ("auto", "local") or "://" in address:
        return  # Ray finds 'auto' itself; ray:// (Ray Client) is checked by ray.init
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"run.ray_address: {address!r} is not host:port (the head node's GCS address, as "
                          "`ray start --head` prints it), 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise ConfigError(f"run.ray_address: no Ray cluster answers at {address} ({exc.strerror or exc}); start "
                          "one with `ray start --head` or fix run.ray_address / RAY_ADDRESS") from None


def connect(config: ExperimentConfig) -> bool:
    """Join (or start) the cluster; True if this call started the connection (close it after)."""
    import ray

    if ray.is_initialized():
        return False  # the caller (a notebook, a test) connected already: use that cluster
    address = cluster_address(config)
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.ERROR)
        else:
            # This machine only: like the local backend, the population shares the cores, so the
            # instance offers at least one bundle per member (GPUs as Ray detects them).
            cpus = max(os.cpu_count() or 1, math.ceil(config.pbt.population_size * config.run.ray_cpus_per_member))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ConfigError(f"run.backend=ray: could not join {where}: {first}") from None
    return True


def member_bundle(config: ExperimentConfig) -> dict[str, float]:
    """The Ray resources one member asks for (checked: Ray takes fractions below 1 or whole GPUs)."""
    run = config.run
    gpus = run.ray_gpus_per_member
    if gpus > 1 and not float(gpus).is_integer():
        raise ConfigError(f"run.ray_gpus_per_member: Ray takes a fraction below 1 or a whole number of GPUs, "
                          f"got {gpus}")
    if gpus > 0 and config.agent.device == "cpu":
        raise ConfigError("run.ray_gpus_per_member: > 0 asks Ray for a GPU but agent.device is 'cpu'; "
                          "set agent.device=auto or run.ray_gpus_per_member=0")
    bundle = {"CPU": float(run.ray_cpus_per_member)}
    if gpus > 0:
        bundle["GPU"] = float(gpus)
    return bundle


def host_bundle(config: ExperimentConfig) -> dict[str, float]:
    """The Ray resources one host of ``run.members_per_host`` members asks for (its members' sum)."""
    from pbt_rl.runtime.resources import hosts_layout

    per_host, _ = hosts_layout(config)
    bundle = {key: value * per_host for key, value in member_bundle(config).items()}
    if bundle.get("GPU", 0) > 1 and not float(bundle["GPU"]).is_integer():
        raise ConfigError(f"run.members_per_host x run.ray_gpus_per_member: a host of {per_host} members asks Ray "
                          f"for {bundle['GPU']:g} GPUs; Ray takes a fraction below 1 or a whole number")
    return bundle


def _describe(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _members_fitting(resources: dict, bundle: dict[str, float]) -> float:
    counts = [math.floor(resources.get(key, 0.0) / need + 1e-9) for key, need in bundle.items() if need > 0]
    return min(counts) if counts else math.inf


def check_capacity(hosts: int, bundle: dict[str, float], nodes: list[dict], per_host: int = 1) -> None:
    """Every host (of ``per_host`` members) fits on some node, and all fit the cluster (total resources)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    need = _describe(bundle)
    one = "one member" if per_host == 1 else f"one host of {per_host} members"
    unit = "members" if per_host == 1 else f"hosts of {per_host} members"
    per_node = [_members_fitting(resources, bundle) for resources in alive]
    if not any(count >= 1 for count in per_node):
        offers = "; ".join(_describe(r) for r in alive) or "no live nodes"
        raise ConfigError(f"run.backend=ray: no node of the cluster has {need} for {one} (nodes offer: {offers}); "
                          "lower run.ray_cpus_per_member / run.ray_gpus_per_member / run.members_per_host "
                          "or add bigger nodes")
    room = sum(per_node)
    if room < hosts:
        total = {key: sum(r.get(key, 0.0) for r in alive) for key in ("CPU", "GPU")}
        raise ConfigError(f"run.backend=ray: the cluster has room for {room} of the {hosts} {unit} "
                          f"({need} each; {len(alive)} node(s), {_describe(total)} in all); lower "
                          "pbt.population_size or the per-member resources, or add nodes")


def reserve(config: ExperimentConfig):
    """Check the cluster's capacity, then reserve one bundle per host (``run.members_per_host``
    members; bundle ``h`` for host ``h``); returns the placement group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pbt_rl.runtime.resources import hosts_layout

    per_host, hosts = hosts_layout(config)
    bundle = host_bundle(config)
    check_capacity(hosts, bundle, ray.nodes(), per_host)
    group = placement_group([dict(bundle) for _ in range(hosts)],
                            strategy=PLACEMENT_STRATEGIES[config.run.ray_placement])
    ready, _ = ray.wait([group.ready()], timeout=RESERVE_SECONDS)
    if not ready:
        remove_placement_group(group)
        raise ConfigError(f"run.backend=ray: could not reserve {hosts} x ({_describe(bundle)}) within "
                          f"{RESERVE_SECONDS:.0f} s; other jobs hold the cluster's resources (see `ray status`)")
    return group


def disconnect(started_here: bool) -> None:
    import ray

    if started_here and ray.is_initialized():
        ray.shutdown()
