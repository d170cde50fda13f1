"""``run.backend: ray`` against a real multi-node Ray cluster on this machine (docs/cluster.md).

One cluster (a head and two worker nodes, 2 logical CPUs each) serves the whole module. Members
are ``FakeLearner`` actors (real actors, checkpoints, run files; no envs); faults happen at a gate
every member reaches (ray_support.GatedLearner), so no test depends on the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

ray = pytest.importorskip("ray")

from pbt_rl.cli import main  # noqa: E402
from pbt_rl.config import dump_yaml  # noqa: E402
from pbt_rl.runtime import train  # noqa: E402
from pbt_rl.runtime.ray_backend import RayBackend  # noqa: E402
from pbt_rl.runtime.store import read_jsonl  # noqa: E402
from ray_support import (GATED, NODE_CPUS, free_port, live_member_actors, reached, start_cluster,  # noqa: E402
                         start_driver, wait_for_nodes)
from runtime_support import (FAKE, TESTS_DIR, alive, check_lineage_consistent, check_metrics_grow,  # noqa: E402
                             fake_config, fake_seed_is_member_id, run_files, threaded_backend, wait_until)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(workers=2)
    yield cluster
    cluster.shutdown()


def ray_config(run_dir, cluster, pbt=None, **run):
    return fake_config(run_dir, pbt=pbt or {}, run={"backend": "ray", "ray_address": cluster.address,
                                                    "hang_timeout_min_seconds": 120.0, **run})


def backend_for(config, **env_vars) -> RayBackend:
    return RayBackend(config, learner_factory=GATED if env_vars else FAKE, python_path=(str(TESTS_DIR),),
                      env_vars=env_vars)


def events_of(run_dir, name):
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == name]


def relative_files(run_dir):
    """The run's files but checkpoints (whose names depend on which ones exploits pinned), the lock,
    and lineage.jsonl (written with the first exploit, which depends on how members interleave)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.is_file() and "checkpoints" not in p.parts and p.name not in (".lock", "lineage.jsonl"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pbt-rl: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------ training


def test_a_population_spread_over_the_nodes_trains_and_writes_a_local_runs_files(tmp_path, cluster):
    run_dir = tmp_path / "ray"
    config = ray_config(run_dir, cluster)
    backend = backend_for(config)
    summary = train(config, console=False, backend=backend)

    assert summary["status"] == "finished"
    assert all(m["env_steps"] >= 4000 for m in summary["members"].values())
    nodes = {node["node_id"] for _, node in backend.placements}
    assert len(nodes) >= 2, backend.placements  # spread: 4 members over 3 nodes of 2 CPUs
    assert sorted(m for m, _ in backend.placements) == [0, 1, 2, 3]
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)
    assert not live_member_actors(cluster.address, run_dir), "the actors end with the run"

    local_dir = tmp_path / "local"
    train(fake_config(local_dir), console=False, backend=threaded_backend())
    assert relative_files(run_dir) == relative_files(local_dir)
    assert json.loads((run_dir / "summary.json").read_text()).keys() == \
        json.loads((local_dir / "summary.json").read_text()).keys()
    assert main(["resume", str(run_dir), "--quiet"]) == 0  # the CLI joins the cluster again (nothing left to train)


def test_pack_puts_the_members_on_one_node(tmp_path, cluster):
    run_dir = tmp_path / "run"
    config = ray_config(run_dir, cluster, pbt={"population_size": NODE_CPUS, "truncation_fraction": 0.5},
                        ray_placement="pack", total_env_steps=800)
    closed_twice = backend_for(config)
    closed_twice.close()
    closed_twice.close()  # as train/resume do after the controller: must leave Ray usable in this process
    assert not ray.is_initialized()
    backend = backend_for(config)
    assert train(config, console=False, backend=backend)["status"] == "finished"
    assert len({node["node_id"] for _, node in backend.placements}) == 1, backend.placements


def test_member_hosts_on_the_cluster_share_an_actor_and_restart_a_failed_member_on_it(tmp_path, cluster,
                                                                                      monkeypatch):
    """run.members_per_host=2: two host actors of two members (one bundle each); a member that
    raises restarts on its live host, whose other member goes on."""
    fake_seed_is_member_id(monkeypatch)
    run_dir = tmp_path / "run"
    config = ray_config(run_dir, cluster, members_per_host=2, total_env_steps=2400)
    backend = RayBackend(config, learner_factory=FAKE, python_path=(str(TESTS_DIR),),
                         env_vars={"PBT_RL_TEST_CRASH": f"1:800:{tmp_path / 'crashed'}"})
    assert backend.bundle == {"CPU": 2.0} and backend.host_count == 2
    summary = train(config, console=False, backend=backend)
    assert (tmp_path / "crashed").exists() and summary["status"] == "finished"
    assert [e["member"] for e in events_of(run_dir, "member_failed")] == [1]
    pids = {}
    for member, node in backend.placements:
        pids.setdefault(member, []).append(node["pid"])
    assert sorted(pids) == [0, 1, 2, 3] and len(pids[1]) == 2  # member 1 started twice
    assert set(pids[0]) == set(pids[1]) and len(set(pids[0])) == 1  # ... on the one actor it shares with 0
    assert set(pids[2]) == set(pids[3]) and pids[2][0] != pids[0][0]
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)
    assert not live_member_actors(cluster.address, run_dir), "the actors end with the run"


# ------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_lost_nodes_members_restart_on_the_remaining_nodes(tmp_path, cluster, mode):
    """A worker node dies (its raylet and workers killed) while every member waits at the gate;
    in sync mode the generation must not wait for the members that are gone."""
    gate, run_dir = tmp_path / "gate", tmp_path / "run"
    gate.mkdir()
    config = ray_config(run_dir, cluster, pbt={"mode": mode})
    backend = backend_for(config, PBT_RL_TEST_GATE=f"1200:{gate}")
    lost, victims, errors = [], [], []

    def failures():
        try:
            return {e["member"] for e in events_of(run_dir, "member_failed")}
        except (OSError, ValueError):  # a row being written
            return set()

    def remove_a_node():
        try:
            assert wait_until(lambda: len(reached(gate)) == 4 and len(backend.placements) >= 4)
            placed = {member: node["node_id"] for member, node in backend.placements}
            victim = next(n for n in cluster.worker_nodes if n.node_id in placed.values())
            lost.extend(m for m, node_id in placed.items() if node_id == victim.node_id)
            cluster.remove_node(victim)
            victims.append(victim)
            assert wait_until(lambda: failures() >= set(lost))  # the controller saw them die
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            (gate / "open").write_text("")

    thread = threading.Thread(target=remove_a_node, daemon=True)
    thread.start()
    try:
        summary = train(config, console=False, backend=backend)
    finally:
        (gate / "open").write_text("")
        thread.join()
        if victims:  # give the module's cluster its node back
            cluster.add_node(num_cpus=NODE_CPUS)
            wait_for_nodes(cluster, 3)
    assert not errors, errors
    assert lost and failures() == set(lost)
    restarts = backend.placements[4:]
    assert sorted(m for m, _ in restarts) == sorted(lost)
    assert all(node["node_id"] != victims[0].node_id for _, node in restarts), (restarts, victims[0].node_id)
    assert summary["status"] == "finished"
    assert all(m["env_steps"] >= 4000 for m in summary["members"].values())
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)


def test_a_killed_driver_takes_its_members_along_and_resume_finishes_the_run(tmp_path, cluster):
    gate, run_dir = tmp_path / "gate", tmp_path / "run"
    gate.mkdir()
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(dump_yaml(ray_config(run_dir, cluster)))
    env_vars = {"PBT_RL_TEST_GATE": f"1200:{gate}"}
    driver = start_driver(tmp_path, config_path=config_path, env_vars=env_vars)
    try:
        assert wait_until(lambda: len(reached(gate)) == 4 or driver.poll() is not None)
        assert driver.poll() is None
        members = list(reached(gate).values())
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    # Ray ends the dead driver's actors: their processes go (they were blocked at the gate, so
    # nothing else would have ended them), and no actor of the run is left.
    assert wait_until(lambda: not any(alive(pid) for pid in members))
    assert wait_until(lambda: not live_member_actors(cluster.address, run_dir), attempts=60, pause=0.5)

    (gate / "open").write_text("")
    resumed = start_driver(tmp_path, resume_dir=run_dir, env_vars=env_vars)
    try:
        assert resumed.wait(timeout=300) == 0
    finally:
        if resumed.poll() is None:
            resumed.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert all(m["env_steps"] >= 4000 for m in summary["members"].values())
    assert events_of(run_dir, "resumed")
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)


def test_a_hung_member_actor_is_killed_and_restarted(tmp_path, cluster, monkeypatch):
    """kill -STOP of the actor's worker process: alive, silent. The watchdog restarts it."""
    fake_seed_is_member_id(monkeypatch)
    run_dir = tmp_path / "run"
    config = ray_config(run_dir, cluster, total_env_steps=2400, hang_timeout_min_seconds=5.0,
                        hang_timeout_factor=10.0)
    backend = RayBackend(config, learner_factory=FAKE, python_path=(str(TESTS_DIR),),
                         env_vars={"PBT_RL_TEST_SLEEP": "0.02", "PBT_RL_TEST_STOP": f"1:1200:{tmp_path / 'stopped'}"})
    summary = train(config, console=False, backend=backend)
    assert (tmp_path / "stopped").exists()
    assert any("hung: no message" in e["error"] for e in events_of(run_dir, "member_failed") if e["member"] == 1)
    assert summary["status"] == "finished" and summary["members"]["1"]["env_steps"] >= 2400
    check_lineage_consistent(run_dir, 4)
    stopped = next(node["pid"] for member, node in backend.placements if member == 1)
    assert wait_until(lambda: not alive(stopped)), "the stopped worker process was killed, not left behind"


def test_a_member_whose_controller_stops_asking_for_messages_exits(tmp_path):
    """The guard behind Ray's fate-sharing: no ``take`` call for orphan_seconds ends the process."""
    script = tmp_path / "orphan.py"
    script.write_text("import time\n"
                      "from pbt_rl.runtime.member_host import HostSettings\n"
                      "from pbt_rl.runtime.ray_backend import HostActor\n"
                      "actor = HostActor('pbt_rl.agents:make_learner', HostSettings('cpu', 1), orphan_seconds=0.5)\n"
                      "actor.take(timeout=0.0)\n"
                      "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, str(script)])
    try:
        assert process.wait(timeout=100) == 1
    finally:
        if process.poll() is None:
            process.kill()


# ------------------------------------------------------------------------------ refused before anything is written


def test_an_unreachable_cluster_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(dump_yaml(fake_config(run_dir)))
    address = f"127.0.0.1:{free_port()}"
    assert main(["train", str(config_path), "run.backend=ray", f"run.ray_address={address}"]) == 2
    assert f"no Ray cluster answers at {address}" in one_error_line(capsys)
    monkeypatch.setenv("RAY_ADDRESS", address)  # Ray's own convention, when run.ray_address is empty
    assert main(["train", str(config_path), "run.backend=ray"]) == 2
    assert address in one_error_line(capsys)
    assert sorted(tmp_path.iterdir()) == [config_path]
    assert not ray.is_initialized()

    # resume of a run whose cluster is gone: one line, exit 2, the run untouched
    train(fake_config(run_dir, run={"backend": "ray", "ray_address": address, "total_env_steps": 800}),
          console=False, backend=threaded_backend())
    before = run_files(run_dir)
    assert main(["resume", str(run_dir)]) == 2
    assert f"no Ray cluster answers at {address}" in one_error_line(capsys)
    assert run_files(run_dir) == before


@pytest.mark.parametrize("override, says", [
    ("run.ray_cpus_per_member=3", "no node of the cluster has 3 CPU"),
    ("pbt.population_size=7", "room for 6 of the 7 members"),
])
def test_a_cluster_without_the_resources_is_one_line_exit_2(tmp_path, capsys, cluster, override, says):
    run_dir = tmp_path / "run"
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(dump_yaml(ray_config(run_dir, cluster)))
    assert main(["train", str(config_path), override]) == 2
    assert says in one_error_line(capsys)
    assert sorted(tmp_path.iterdir()) == [config_path]
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------ a real learner


def test_pbt_rl_train_on_the_cluster_learns_cartpole(tmp_path, cluster):
    """`pbt-rl train configs/quickstart.yaml run.backend=ray`: real A2C members (envpool, torch, the
    default learner factory) in actors on the cluster, cut to 2 members x 80k env steps with the
    config's own hyperparameters and no exploits (so each member's returns depend on its seed
    only; measured: mean of the first 20 episodes 25-27, of the last 20 about 110)."""
    run_dir = tmp_path / "run"
    code = main(["train", "--quiet", str(TESTS_DIR.parent / "configs/quickstart.yaml"),
                 "run.backend=ray", f"run.ray_address={cluster.address}", f"run.dir={run_dir}",
                 "pbt.population_size=2", "run.total_env_steps=80000", "pbt.ready_after_steps=20000",
                 "pbt.burn_in_steps=20000", "pbt.exploit=none", "pbt.search=none", "logging.report=false"])
    assert code == 0
    for member in (0, 1):
        rows = read_jsonl(run_dir / f"members/{member}/metrics.jsonl")
        returns = [r for row in rows for r in row["episode_returns"]]
        first, last = returns[:20], returns[-20:]
        assert sum(last) / len(last) > 2 * sum(first) / len(first), (member, first, last)
