"""Member hosts (runtime/member_host.py): several members in one process, each still itself.

Specifications: members share host processes as ``run.members_per_host`` says; a member on a host
trains exactly as it does alone (same seed: same actions, same weights); an exception in one
member restarts only that member, on the same host; a host that dies or hangs is replaced and
its members restart from their restore points while the other hosts go on. Faults use the fake
learners of runtime_support (real processes, pipes and checkpoints; no envs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pbt_rl.config import ConfigError, from_dict
from pbt_rl.runtime import protocol, train
from pbt_rl.runtime.backend import LocalProcessBackend
from pbt_rl.runtime.member import MemberSpec, Restore
from pbt_rl.runtime.resources import members_per_host
from pbt_rl.runtime.store import RunStore, read_jsonl
from runtime_support import (check_lineage_consistent, check_metrics_grow, fake_backend, fake_config,
                             fake_seed_is_member_id, wait_until)


def hosts_of(pids_dir: Path) -> dict[int, list[int]]:
    """member -> the pids of the processes that built its learner, in no particular order."""
    built: dict[int, list[int]] = {}
    for marker in pids_dir.iterdir():
        member, pid = (int(part) for part in marker.name.split("-")[:2])
        built.setdefault(member, []).append(pid)
    return built


def events(run_dir: Path, name: str) -> list[dict]:
    return [row for row in read_jsonl(run_dir / "events.jsonl") if row["event"] == name]


@pytest.fixture
def pids(tmp_path, monkeypatch):
    folder = tmp_path / "pids"
    folder.mkdir()
    monkeypatch.setenv("PBT_RL_TEST_PIDS", str(folder))
    return folder


# ------------------------------------------------------------------------------ how many per host


def test_members_per_host_resolves_auto_and_explicit_values():
    assert members_per_host(8, 0, 0, total_threads=16) == 1  # no more members than cores: a process each
    assert members_per_host(64, 0, 0, total_threads=16) == 4  # one host per core
    assert members_per_host(4, 0, 0, total_threads=2) == 1  # at least 4 hosts, even on 2 cores
    assert members_per_host(32, 0, 0, total_threads=2) == 8
    assert members_per_host(6, 0, 0, total_threads=2) == 2  # ceil: hosts of 2, 2 and 2
    assert members_per_host(5, 0, 0, total_threads=2) == 2  # hosts of 2, 2 and 1
    assert members_per_host(64, 0, 6, total_threads=16) == 3  # lowered until it divides members_per_gpu
    assert members_per_host(4, 8, 0, total_threads=16) == 4  # at most the population
    assert members_per_host(8, 1, 0, total_threads=2) == 1
    assert members_per_host(64, 0, 0, total_threads=16, backend="ray") == 1  # Ray places hosts by resources
    assert members_per_host(64, 4, 0, total_threads=16, backend="ray") == 4


def test_host_settings_that_cannot_work_are_one_line_errors():
    base = {"pbt": {"population_size": 8, "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-3}}}}
    with pytest.raises(ConfigError, match=r"run.members_per_host: 4 must divide run.members_per_gpu \(6\)"):
        from_dict({**base, "run": {"members_per_host": 4, "members_per_gpu": 6}})
    assert from_dict({**base, "run": {"members_per_host": 4, "members_per_gpu": 8}}).run.members_per_host == 4


# ------------------------------------------------------------------------------ sharing, faults


def test_members_share_host_processes_as_configured(tmp_path, pids, monkeypatch):
    fake_seed_is_member_id(monkeypatch)
    run_dir = tmp_path / "run"
    summary = train(fake_config(run_dir, run={"members_per_host": 2, "total_env_steps": 1200}), console=False,
                    backend=fake_backend())
    assert summary["status"] == "finished"
    built = hosts_of(pids)
    assert sorted(built) == [0, 1, 2, 3] and all(len(p) == 1 for p in built.values())
    assert built[0] == built[1] and built[2] == built[3] and built[0] != built[2]
    assert os.getpid() not in built[0] + built[2]


def test_a_member_that_raises_restarts_alone_on_its_host(tmp_path, pids, monkeypatch):
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_CRASH", f"1:800:{tmp_path / 'crashed'}")
    run_dir = tmp_path / "run"
    summary = train(fake_config(run_dir, run={"members_per_host": 2, "total_env_steps": 2400}), console=False,
                    backend=fake_backend())
    assert (tmp_path / "crashed").exists() and summary["status"] == "finished"
    assert [e["member"] for e in events(run_dir, "member_failed")] == [1]
    assert "injected env error" in events(run_dir, "member_failed")[0]["error"]
    built = hosts_of(pids)
    # Member 1 was built again in the host it shares with member 0, which never restarted.
    assert built[1] == [built[0][0]] * 2 and len(built[0]) == 1
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)


def test_a_killed_host_restarts_its_members_and_only_them(tmp_path, pids, monkeypatch):
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.01")
    monkeypatch.setenv("PBT_RL_TEST_KILL", f"1:1200:{tmp_path / 'killed'}")
    run_dir = tmp_path / "run"
    summary = train(fake_config(run_dir, run={"members_per_host": 2, "total_env_steps": 2400}), console=False,
                    backend=fake_backend())
    assert (tmp_path / "killed").exists() and summary["status"] == "finished"
    failed = events(run_dir, "member_failed")
    assert sorted({e["member"] for e in failed}) == [0, 1]  # the host's members; not 2 and 3
    # Each learns of the host's death by its exit, or by a command the dead host could not take.
    assert all("exited" in e["error"] or "pipe is closed" in e["error"] for e in failed), failed
    built = hosts_of(pids)
    assert len(set(built[0])) == len(set(built[1])) == 2 and set(built[0]) == set(built[1])  # a new host
    assert len(built[2]) == len(built[3]) == 1
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)


def test_a_stopped_host_is_killed_and_its_members_restart(tmp_path, pids, monkeypatch):
    """kill -STOP of a host: its members are alive but silent; the watchdog ends the host."""
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.02")
    monkeypatch.setenv("PBT_RL_TEST_STOP", f"1:1200:{tmp_path / 'stopped'}")
    run_dir = tmp_path / "run"
    config = fake_config(run_dir, run={"members_per_host": 2, "total_env_steps": 2400,
                                       "hang_timeout_min_seconds": 5.0, "hang_timeout_factor": 10.0})
    summary = train(config, console=False, backend=fake_backend())
    assert (tmp_path / "stopped").exists() and summary["status"] == "finished"
    assert {e["member"] for e in events(run_dir, "member_hung")} <= {0, 1}
    assert events(run_dir, "member_hung")
    assert {e["member"] for e in events(run_dir, "member_failed")} == {0, 1}
    assert summary["members"]["1"]["env_steps"] >= 2400
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)


def test_a_host_that_cannot_start_fails_its_members_in_one_message(tmp_path):
    config = fake_config(tmp_path / "run", run={"members_per_host": 2})
    backend = LocalProcessBackend(learner_factory="no_such_module_here:make")
    try:
        spec = MemberSpec(member_id=0, seed=0, config=config, run_dir=str(tmp_path / "run"), restore=Restore(),
                          device="cpu", num_threads=1)
        handle = backend.start(spec)
        received: list = []
        assert wait_until(lambda: received.extend(handle.poll()) or any(isinstance(m, protocol.Exited) for m in received))
        failed = [m for m in received if isinstance(m, protocol.Failed)]
        assert len(failed) == 1 and "No module named 'no_such_module_here'" in failed[0].error
        assert isinstance(received[-1], protocol.Exited) and not handle.alive()
    finally:
        backend.close()


# ------------------------------------------------------------------------------ same member, any host


def real_config(run_dir: Path, per_host: int, sharing: str = "turns"):
    return from_dict({
        "env": {"id": "CartPole-v1", "num_envs": 4, "num_threads": 1},
        "agent": {"algo": "a2c", "device": "cpu", "hidden_sizes": [16], "unroll_length": 5},
        "pbt": {"population_size": 2, "ready_after_steps": 1000, "burn_in_steps": 0, "min_episodes": 1,
                "exploit": "none", "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2}}},
        "run": {"dir": str(run_dir), "total_env_steps": 3000, "seed": 5, "torch_threads": 1,
                "members_per_host": per_host, "host_sharing": sharing},
        "logging": {"report": False},
    })


def final_state(run_dir: Path, member: int) -> dict:
    store = RunStore(run_dir)
    return store.load_checkpoint(store.read_summary()["members"][str(member)]["checkpoint"])["learner"]


@pytest.mark.parametrize("sharing", ["turns", "batched", "free"])
def test_a_member_on_a_host_trains_exactly_as_a_member_alone(tmp_path, sharing):
    """Real A2C learners: one process each, then both in one host (taking turns, acting in batched
    forward passes, or free). Same seeds, same everything."""
    alone, together = tmp_path / "alone", tmp_path / "together"
    assert train(real_config(alone, 1), console=False)["status"] == "finished"
    assert train(real_config(together, 2, sharing), console=False)["status"] == "finished"
    for member in (0, 1):
        a, b = final_state(alone, member), final_state(together, member)
        assert a["env_steps"] == b["env_steps"] >= 3000
        flat_a, flat_b = flatten(a), flatten(b)
        assert flat_a.keys() == flat_b.keys()
        for key, value in flat_a.items():  # weights, optimiser, generators' states: bit for bit
            assert torch.equal(value, flat_b[key]) if isinstance(value, torch.Tensor) else value == flat_b[key], key
    # The two members differ from each other: the comparison above is not of two copies of one thing.
    first, second = flatten(final_state(alone, 0)), flatten(final_state(alone, 1))
    assert any(isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.equal(v, second[k])
               for k, v in first.items())
    returns = [[r["episode_returns"] for r in read_jsonl(run / "members/0/metrics.jsonl")] for run in (alone, together)]
    assert sum(returns[0], []) == sum(returns[1], [])  # the same episodes, so the same actions


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key in value for k, v in flatten(value[key], f"{prefix}/{key}" if prefix else str(key)).items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def test_waiting_on_hosts_returns_when_any_member_has_news(tmp_path, monkeypatch):
    """Backend.wait blocks on each host's pipe once, however many members it holds."""
    fake_seed_is_member_id(monkeypatch)
    config = fake_config(tmp_path / "run", run={"members_per_host": 2})
    backend = fake_backend()
    try:
        specs = [MemberSpec(member_id=i, seed=i, config=config, run_dir=str(tmp_path / "run"), restore=Restore(),
                            device="cpu", num_threads=1) for i in range(2)]
        RunStore(tmp_path / "run").root.mkdir(parents=True)
        handles = [backend.start(spec) for spec in specs]
        assert handles[0].wait_object() is handles[1].wait_object()
        seen: dict[int, list] = {0: [], 1: []}

        def both_started() -> bool:
            backend.wait(handles, timeout=0.5)
            for i, handle in enumerate(handles):
                seen[i].extend(handle.poll())
            return all(any(isinstance(m, protocol.Started) for m in seen[i]) for i in (0, 1))

        assert wait_until(both_started, attempts=600, pause=0)
    finally:
        backend.close()


# ------------------------------------------------------------------------------ turns


def test_members_of_a_host_train_one_at_a_time_in_the_order_they_asked():
    """Turns: while one member trains the others wait, and turns go first come, first served."""
    import threading

    from pbt_rl.runtime.member_host import TakingTurns, Turns

    turns = Turns()
    inside: list[str] = []
    order: list[str] = []
    release = {name: threading.Event() for name in "abc"}

    class Learner:
        env_steps = 7

        def __init__(self, name):
            self.name = name

        def train(self, until_env_steps):
            inside.append(self.name)
            assert len(inside) == 1, inside  # nobody else is training now
            order.append(self.name)
            release[self.name].wait()
            inside.remove(self.name)
            return until_env_steps

    learners = {name: TakingTurns(Learner(name), turns) for name in "abc"}
    assert learners["a"].env_steps == 7 and learners["a"].name == "a"  # the rest passes through
    threads = {}
    for name in "abc":  # a gets the turn; b asks before c
        threads[name] = threading.Thread(target=learners[name].train, args=(1,))
        threads[name].start()
        if name == "a":
            assert wait_until(lambda: order == ["a"])
        else:
            assert wait_until(lambda: turns.waiting == "abc".index(name))
    for name in "abc":
        release[name].set()
        threads[name].join(timeout=60)
        assert not threads[name].is_alive()
    assert order == ["a", "b", "c"] and not inside
    assert not turns.busy and turns.waiting == 0  # the last one handed the turn back
