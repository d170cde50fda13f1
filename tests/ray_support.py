"""A real multi-node Ray cluster on this machine for the Ray backend tests, and a gated fake learner.

``ray.cluster_utils.Cluster`` starts a head and worker raylets as processes of this machine (each
a Ray node with its own logical CPUs); the tests add and remove nodes as a cluster would gain and
lose machines. Actor workers import ``ray_support`` (the learner factory ``GATED``) through the
backend's ``python_path``.

``GatedLearner`` is :class:`runtime_support.FakeLearner` that stops at a gate: with
``PBT_RL_TEST_GATE=env_steps:folder`` a member reaching ``env_steps`` writes
``folder/reached-<seed>`` (holding its pid) and waits, still training nothing, until
``folder/open`` exists. Tests use it to act (remove a node, kill the driver) at a known point of
every member, whatever the machine's speed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from runtime_support import TESTS_DIR, FakeLearner, wait_until

GATED = "ray_support:make_gated_learner"
NODE_CPUS = 2


class GatedLearner(FakeLearner):
    def train(self, until_env_steps):
        report = super().train(until_env_steps)
        gate = os.environ.get("PBT_RL_TEST_GATE")
        if gate:
            steps, folder = gate.split(":", 1)
            if self.env_steps >= int(steps) and not Path(folder, "open").exists():
                Path(folder, f"reached-{self.seed}").write_text(str(os.getpid()))
                while not Path(folder, "open").exists():
                    time.sleep(0.05)
        return report


def make_gated_learner(config, seed, device=None, num_threads=0):
    return GatedLearner(config, seed, device, num_threads)


def reached(folder: Path) -> dict[str, int]:
    """seed -> pid of every member waiting at (or past) the gate."""
    return {p.name.split("-", 1)[1]: int(p.read_text() or 0) for p in folder.glob("reached-*")}


def start_cluster(workers: int = 2):
    """A head and ``workers`` worker nodes, NODE_CPUS logical CPUs each; waits until all are up."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
    for _ in range(workers):
        cluster.add_node(num_cpus=NODE_CPUS)
    wait_for_nodes(cluster, workers + 1)
    return cluster


def wait_for_nodes(cluster, count: int) -> None:
    import ray

    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        assert wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == count, attempts=1200)
    finally:
        ray.shutdown()


def live_member_actors(address: str, run_dir: Path) -> list[str]:
    """Names of the live Ray actors hosting members of ``run_dir`` (any driver's host actors)."""
    import ray

    ray.init(address=address, logging_level="WARNING")
    try:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"{run_dir} host ")]
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pbt_rl.config import load_config
from pbt_rl.runtime import {entry}
from pbt_rl.runtime.ray_backend import RayBackend
from pbt_rl.runtime.store import RunStore
config = {config}
{entry}({argument}, console=False,
        backend=RayBackend(config, learner_factory={factory!r}, python_path=({tests!r},), env_vars={env!r}))
"""


def start_driver(tmp_path: Path, *, config_path: Path | None = None, resume_dir: Path | None = None,
                 env_vars: dict | None = None, factory: str = GATED) -> subprocess.Popen:
    """A controller (Ray driver) in its own process: ``train`` of ``config_path`` or ``resume``
    of ``resume_dir``, members built by ``factory`` with ``env_vars`` set in their actors."""
    script = tmp_path / f"driver-{len(list(tmp_path.glob('driver-*.py')))}.py"
    if resume_dir is None:
        entry, config, argument = "train", f"load_config({str(config_path)!r})", "config"
    else:
        entry, argument = "resume", repr(str(resume_dir))
        config = f"RunStore({str(resume_dir)!r}).read_config()"
    script.write_text(DRIVER_SCRIPT.format(tests=str(TESTS_DIR), entry=entry, config=config, argument=argument,
                                           factory=factory, env=dict(env_vars or {})))
    return subprocess.Popen([sys.executable, str(script)])
