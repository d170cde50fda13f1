"""``pbt-rl bench envs``: the population's envs stepped as its members step them, with no learning,
against raw envpool (pbt_rl/bench_envs.py)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

from pbt_rl.config import from_dict, load_config, to_dict
from runtime_support import alive, children, wait_until

SPACE = {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-3}}


def cartpole(algo: str, population: int = 2, envs: int = 4, batch: int = 2, threads: int = 0):
    return from_dict({
        "env": {"id": "CartPole-v1", "num_envs": envs, "async_batch_size": batch, "num_threads": threads},
        "agent": {"algo": algo},
        "pbt": {"population_size": population, "search_space": SPACE},
        "run": {"total_threads": 2},
    })


def test_each_member_builds_its_envs_as_its_learner_does():
    from pbt_rl.bench_envs import member_envs_layout

    a2c = member_envs_layout(load_config("configs/atari/pong_a2c.yaml"))  # 64 envs, groups of 32, 4 threads
    assert a2c == {"num_envs": 64, "batch_size": 32, "groups": 2, "is_async": True, "fixed_groups": True, "threads": 4}
    impala = member_envs_layout(load_config("configs/atari/pong_impala.yaml", ["env.num_threads=0"]))
    # IMPALA takes whichever envs are ready; without env.num_threads a member gets its share of the cores
    assert impala["fixed_groups"] is False and impala["groups"] == 2 and impala["batch_size"] == 64
    assert impala["threads"] == max(1, (os.cpu_count() or 1) // 8)
    sync = member_envs_layout(cartpole("a2c", batch=0, threads=3))
    assert sync["is_async"] is False and sync["fixed_groups"] is False and sync["groups"] == 1
    assert sync["batch_size"] == 4 and sync["threads"] == 3


@pytest.mark.parametrize("algo,batch", [("a2c", 2), ("impala", 2), ("a2c", 0)])
def test_the_members_envs_step_together_and_count_whole_batches(algo, batch):
    from pbt_rl.bench_envs import measure_member_envs

    result = measure_member_envs(cartpole(algo, batch=batch), seconds=0.5, warmup_seconds=0.1)
    assert result["population_size"] == 2 and result["fixed_groups"] == (algo == "a2c" and batch > 0)
    # each of the 2 members counted whole batches (of 2 async, of all 4 envs sync) over its own
    # window, at least the one it starts its window with (more depends on how busy the machine is)
    per_batch = batch or 4
    assert result["env_steps"] >= 2 * per_batch and result["env_steps"] % per_batch == 0
    assert result["seconds"] >= 0.5 and result["env_steps_per_second"] > 0
    if result["envpool_cores"] is not None:  # Linux: the envpool workers' CPU is told apart by their name
        assert result["envpool_cores"] > 0 and result["stepping_cores"] > 0


class FakeBarrier:
    def __init__(self):
        self.aborted = False

    def wait(self, timeout=None):
        raise AssertionError("a member whose envs cannot be built must not wait for the others")

    def abort(self):
        self.aborted = True


def test_a_member_that_cannot_build_its_envs_reports_one_line_and_releases_the_others():
    from pbt_rl.bench_envs import member_envs_layout, step_member_envs

    config = cartpole("a2c")
    layout = {**member_envs_layout(config), "num_envs": 0}  # make_env refuses zero envs
    barrier, results = FakeBarrier(), queue.Queue()
    step_member_envs(to_dict(config), 1, layout, barrier, 0.1, 0.1, results)
    report = results.get_nowait()
    assert barrier.aborted and report["member"] == 1
    assert report["error"] == "ConfigError: env.num_envs: 0 must be >= 1"


def test_the_parent_raises_the_first_members_error(monkeypatch):
    import pbt_rl.bench_envs as bench_envs

    class Context:  # processes that run at once, in threads, each reporting an error
        def Barrier(self, parties):
            return threading.Barrier(parties)

        def Queue(self):
            return queue.Queue()

        def Process(self, target, args, daemon):
            results = args[-1]
            thread = threading.Thread(target=lambda: results.put({"member": args[2], "error": "OSError: no envs"}))
            thread.exitcode = 0
            thread.kill = lambda: None
            return thread

    monkeypatch.setattr(bench_envs.multiprocessing, "get_context", lambda method: Context())
    with pytest.raises(RuntimeError, match=r"^member [01]'s envs: OSError: no envs$"):
        bench_envs.measure_member_envs(cartpole("impala"), seconds=0.1, warmup_seconds=0.1)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as cmdline:
            return cmdline.read()
    except OSError:  # ended meanwhile
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from Linux's /proc")
def test_the_members_envs_processes_end_when_the_bench_is_killed():
    """A bench killed with SIGKILL leaves no member stepping on for its window (here 300 s)."""
    config = json.dumps(to_dict(cartpole("a2c")))
    script = ("import json, sys; from pbt_rl.config import from_dict; from pbt_rl.bench_envs import measure_member_envs; "
              "measure_member_envs(from_dict(json.loads(sys.argv[1])), seconds=300.0, warmup_seconds=0.1)")
    bench = subprocess.Popen([sys.executable, "-c", script, config])

    def members() -> list[int]:
        return [pid for pid in children(bench.pid) if "spawn_main" in _command_line(pid)]

    try:  # up to two minutes for the two members' processes to start
        assert wait_until(lambda: len(members()) == 2, attempts=1200, pause=0.1), \
            "the bench did not start its members' processes"
        started = members()
    finally:
        bench.send_signal(signal.SIGKILL)
        bench.wait()
    # they end within a poll interval; a minute allows a loaded machine
    ended = wait_until(lambda: not any(alive(pid) for pid in started), attempts=600, pause=0.1)
    for pid in started:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert ended, "members' envs processes outlived the killed bench"


def test_the_envs_bench_prints_the_arrangement_both_rates_and_cpu_per_env_step():
    from pbt_rl.bench_envs import format_envs_bench

    raw = {"env_steps_per_second": 1000.0, "mode": "async", "total_envs": 512, "batch_size": 256, "threads": 16,
           "envpool_cores": 15.0}
    envs = {"population_size": 8, "num_envs": 64, "batch_size": 32, "groups": 2, "is_async": True,
            "fixed_groups": True, "threads": 4, "env_steps_per_second": 800.0, "envpool_cores": 14.0,
            "stepping_cores": 0.5}
    text = format_envs_bench({"env": "Pong-v5", "algo": "a2c", "raw": raw, "envs": envs, "ratio": 0.8,
                              "raw_around": {"before": 1100.0, "after": 900.0, "env_steps_per_second": 1000.0,
                                             "drift": 900.0 / 1100.0 - 1}})
    assert "8 a2c members" in text and "64 envs each in 2 fixed groups of 32, 4 env threads per group" in text
    assert "ratio 0.800" in text and "raw moved -18% around it" in text
    # 14 cores over 800 env steps/s against 15 over 1,000
    assert "envpool CPU per env step: 17,500 us (raw 15,000 us)" in text
    assert "cores: envpool 14.0, the members' stepping threads 0.5" in text


def test_bench_envs_refuses_other_tables_and_non_envpool_envs_in_one_line(capsys, tmp_path):
    from pbt_rl.cli import main

    for extra in (["--variant", "env.num_threads=2"], ["--populations", "2,4"], ["--repeats", "2"]):
        assert main(["bench", "envs", "configs/quickstart.yaml", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and any(option in err[0] for option in ("--variant", "--populations", "--repeats")), err
    assert main(["bench", "envs", "configs/quickstart.yaml", "env.id=FrozenLake-v1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an envpool env" in err[0], err
