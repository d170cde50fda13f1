"""The bench's measurements of a process tree: resident memory, CPU time per OS thread name, and
the names pbt-rl gives its threads so that the bench can tell them apart (pbt_rl/machine_use.py)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from pbt_rl.machine_use import (ENVPOOL, cores_by_thread_name, resident_mib, thread_cpu_seconds, thread_name,
                                thread_named)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")


def names_of_this_process() -> list[str]:
    return [name for (_pid, _tid), (name, _seconds) in thread_cpu_seconds([os.getpid()]).items()]


def test_a_thread_started_inside_thread_named_keeps_the_name_and_the_caller_gets_its_own_back():
    seen: dict[str, str | None] = {}
    release = threading.Event()

    def child() -> None:
        seen["child"] = thread_name()
        release.wait(30)

    before = thread_name()
    with thread_named("pbt-test-name"):
        seen["inside"] = thread_name()
        worker = threading.Thread(target=child)
        worker.start()
    try:
        assert seen["inside"] == "pbt-test-name"
        assert thread_name() == before
        deadline = time.monotonic() + 30
        while "child" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen["child"] == "pbt-test-name"
        assert names_of_this_process().count("pbt-test-name") == 1  # /proc shows the name as set
    finally:
        release.set()
        worker.join()


def test_names_are_cut_to_the_fifteen_bytes_linux_keeps():
    with thread_named("pbt-a-very-long-thread-name"):
        assert thread_name() == "pbt-a-very-long"


def test_a_busy_thread_s_cpu_time_is_counted_under_its_name():
    burned, release = threading.Event(), threading.Event()

    def burn() -> None:
        with thread_named("pbt-test-burn"):
            start = time.thread_time()
            while time.thread_time() - start < 0.3:  # CPU time, not wall time: independent of load
                pass
            burned.set()
            release.wait(30)

    before = thread_cpu_seconds([os.getpid()])
    worker = threading.Thread(target=burn)
    worker.start()
    try:
        assert burned.wait(60)
        after = thread_cpu_seconds([os.getpid()])  # while the thread is alive: ended threads are not seen
    finally:
        release.set()
        worker.join()
    cores = cores_by_thread_name(before, after, seconds=1.0)
    assert cores["pbt-test-burn"] >= 0.25  # 0.3 s of CPU over a 1 s window, less a clock tick or two


def test_cores_by_thread_name_sums_threads_of_one_name_and_counts_new_threads_from_zero():
    before = {(1, 1): ("pbt-envpool", 10.0), (1, 2): ("pbt-envpool", 4.0), (1, 3): ("pbt-actor", 1.0),
              (2, 9): ("gone", 5.0)}
    after = {(1, 1): ("pbt-envpool", 14.0), (1, 2): ("pbt-envpool", 6.0), (1, 3): ("pbt-actor", 2.0),
             (2, 10): ("pbt-member", 1.0)}
    cores = cores_by_thread_name(before, after, seconds=2.0)
    assert cores == {"pbt-envpool": 3.0, "pbt-actor": 0.5, "pbt-member": 0.5}
    assert list(cores) == ["pbt-envpool", "pbt-actor", "pbt-member"]  # most first
    assert cores_by_thread_name(before, after, seconds=0.0) == {}


def test_envpool_worker_threads_carry_the_envpool_name():
    pytest.importorskip("envpool")
    from pbt_rl.config import EnvConfig
    from pbt_rl.envs.envpool_envs import EnvpoolPool
    from pbt_rl.envs.registry import env_family

    before = names_of_this_process().count(ENVPOOL)
    pool = EnvpoolPool(EnvConfig(id="CartPole-v1"), env_family("CartPole-v1"), num_envs=4, batch_size=4,
                       num_threads=3, env_seeds=[0, 1, 2, 3])
    try:
        assert names_of_this_process().count(ENVPOOL) - before >= 3  # its workers (and none of ours)
        assert thread_name() != ENVPOOL
    finally:
        pool.close()


def test_resident_memory_counts_a_process_and_its_children():
    import subprocess

    alone = resident_mib(os.getpid())
    # A child holding 200 MiB it has touched.
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(200 << 20); "
                              "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert resident_mib(os.getpid()) >= alone + 200
    finally:
        child.kill()
        child.wait()


def test_the_sampler_summarises_the_samples_of_a_window_of_wall_time():
    from pbt_rl.machine_use import MachineSampler

    sampler = MachineSampler()
    # Sampling slower than once a second: the window is in seconds, not in samples.
    sampler.samples = [
        {"seconds": 1.5, "cpu_busy": 0.1, "resident": 100.0, "threads": {(1, 1): ("pbt-envpool", 0.0)}},
        {"seconds": 3.0, "cpu_busy": 0.9, "resident": 900.0, "gpu_util": 40.0,
         "threads": {(1, 1): ("pbt-envpool", 1.0), (1, 2): ("pbt-actor", 0.0)}},
        {"seconds": 4.5, "cpu_busy": 0.7, "resident": 800.0, "gpu_util": 60.0, "threads": None},
        {"seconds": 7.0, "cpu_busy": 0.8, "resident": 700.0, "gpu_util": 50.0,
         "threads": {(1, 1): ("pbt-envpool", 9.0), (1, 2): ("pbt-actor", 2.0)}},
        {"seconds": 9.0, "cpu_busy": 0.2, "resident": 200.0, "threads": {(1, 1): ("pbt-envpool", 9.5)}},
    ]
    summary = sampler.summary(2.0, 8.0)
    assert summary["cpu_busy_fraction"] == pytest.approx(0.8)
    assert summary["gpu_utilization_percent"] == pytest.approx(50.0)
    assert summary["resident_mib_max"] == 900.0
    assert summary["cores_by_thread"] == {"pbt-envpool": pytest.approx(2.0), "pbt-actor": pytest.approx(0.5)}
    # A window with no samples: all of them; fewer than two thread readings: no cores.
    assert sampler.summary(20.0, 30.0)["cpu_busy_fraction"] == pytest.approx(0.54)
    assert sampler.summary(4.0, 5.0)["cores_by_thread"] is None


def test_the_sampler_reads_this_process_while_it_runs():
    from pbt_rl.machine_use import MachineSampler

    with MachineSampler() as sampler:
        deadline = time.monotonic() + 60
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(sampler.samples) >= 3
    summary = sampler.summary()
    assert summary["resident_mib_max"] > 10
    assert summary["cores_by_thread"] is not None and summary["cpu_busy_fraction"] is not None
