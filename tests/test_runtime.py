"""Population runtime: controller, member processes, exploit consistency, crashes, resume.

Most tests run members with ``runtime_support.FakeLearner`` (no envs, milliseconds per call)
through the real process backend, so what is tested is the runtime: pipes, checkpoints, lineage,
restarts. Fault classes (kills at every write, hangs, two controllers, bad run files) are in
test_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from pbt_rl.config import ConfigError
from pbt_rl.runtime import RunDirError, RunStore, resume, train, weights_sha256
from pbt_rl.runtime.resources import member_device, threads_per_member
from pbt_rl.runtime.store import read_jsonl
from runtime_support import (fake_backend, threaded_backend, FakeReport, alive, check_lineage_consistent, check_metrics_grow, children,
                             fake_config, fake_seed_is_member_id, run_files, start_controller, wait_until)

# ------------------------------------------------------------------------------------------


def test_resources_split_threads_and_place_members():
    assert threads_per_member(4, total_threads=2) == 1
    assert threads_per_member(2, total_threads=16) == 8
    assert threads_per_member(3, total_threads=16, env_threads=5) == 5
    assert threads_per_member(64, total_threads=0) >= 1
    one_each = {"per_host": 1, "population_size": 6}
    assert member_device("auto", 3, 0, 0, **one_each) == "cpu"
    assert member_device("auto", 3, 0, 1, **one_each) == "cuda:0"
    assert [member_device("auto", i, 2, 2, **one_each) for i in range(6)] == [
        "cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:0", "cuda:0"]
    assert [member_device("auto", i, 0, 2, **one_each) for i in range(6)] == ["cuda:0"] * 3 + ["cuda:1"] * 3
    assert member_device("cuda:1", 0, 0, 2, **one_each) == "cuda:1"
    with pytest.raises(ConfigError):
        member_device("cuda", 0, 0, 0, **one_each)


def test_exploit_copies_donor_weights_then_sets_explored_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.002")
    # Synchronous generations: every ready point compares all members, so exploits happen however
    # unevenly the member processes start on a loaded machine (async could finish one member
    # before another has been scored).
    config = fake_config(tmp_path / "run", run={"checkpoint_keep": 1000}, pbt={"mode": "sync"})
    summary = train(config, console=False, backend=threaded_backend())
    run_dir = tmp_path / "run"
    rows = check_lineage_consistent(run_dir, 4)
    assert rows, "truncation with a 400-step ready interval must exploit at least once"
    store = RunStore(run_dir)
    for row in rows:
        donor_state = store.load_checkpoint(row["donor_checkpoint"])["learner"]
        assert row["weights_sha256"] == weights_sha256(donor_state)
        assert row["applied_hyperparameters"] == row["new_hyperparameters"]
        assert row["donor"] != row["member"] and row["donor_score"] > row["member_score"]
        assert set(row["operations"]) == {"lr"} and row["wall_seconds"] > 0
        # The member's next report uses the explored hyperparameters and its own step counter.
        later = [m for m in read_jsonl(run_dir / f"members/{row['member']}/metrics.jsonl")
                 if m["env_steps"] > row["env_steps"]]
        if later:
            assert later[0]["hyperparameters"]["lr"] == row["new_hyperparameters"]["lr"]
            assert later[0]["env_steps"] <= row["env_steps"] + config.pbt.ready_after_steps + 40
    check_metrics_grow(run_dir, 4)
    assert summary["finished"] and summary["exploits"] == len(rows)
    assert all(m["env_steps"] >= 4000 and m["status"] == "done" for m in summary["members"].values())
    assert summary["best_score"] == max(m["score"] for m in summary["members"].values())
    population = json.loads((run_dir / "population.json").read_text())
    assert set(population["members"]) == {"0", "1", "2", "3"} and population["search_space"] == ["lr"]
    assert json.loads((run_dir / "summary.json").read_text())["best_member"] == summary["best_member"]


def test_sync_mode_decides_by_generation(tmp_path, monkeypatch):
    """Every exploit of a generation is decided after every member reached that generation's
    ready point, even with one member four times slower than the others (async mode would let
    the fast members decide long before it gets there)."""
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.005")
    monkeypatch.setenv("PBT_RL_TEST_SLOW", "3:0.02")
    run_dir = tmp_path / "run"
    summary = train(fake_config(run_dir, pbt={"mode": "sync"}, run={"total_env_steps": 2000}),
                    console=False, backend=threaded_backend())
    rows = check_lineage_consistent(run_dir, 4)
    assert summary["finished"] and rows
    metrics = {m: read_jsonl(run_dir / f"members/{m}/metrics.jsonl") for m in range(4)}
    for row in rows:
        assert row["env_steps"] % 400 == 0  # exactly at a generation boundary (40-step calls)
        for member, member_rows in metrics.items():
            reached = [r["time"] for r in member_rows if r["env_steps"] >= row["env_steps"]]
            assert reached and min(reached) <= row["time"], (row["member"], row["env_steps"], member)


def test_checkpoints_pruned_keep_last(tmp_path):
    config = fake_config(tmp_path / "run", pbt={"population_size": 2, "truncation_fraction": 0.5},
                         run={"total_env_steps": 4000, "checkpoint_keep": 2})
    train(config, console=False, backend=threaded_backend())
    store = RunStore(tmp_path / "run")
    donors = {row["donor_checkpoint"] for row in read_jsonl(tmp_path / "run/lineage.jsonl")}
    for member in range(2):
        ids = store.list_checkpoints(member)
        # Ready points every 400 of the member's own env steps (the fake steps 40 at a time).
        assert ids[-2:] == [store.checkpoint_id(member, 3600), store.checkpoint_id(member, 4000)]
        # Anything older survived only because an exploit's restore point pinned it.
        assert set(ids[:-2]) <= donors, (member, ids)
        assert all(store.verify_checkpoint(c) for c in ids)


def test_crashed_member_is_restarted_from_its_checkpoint(tmp_path, monkeypatch):
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_CRASH", f"1:1500:{tmp_path / 'crashed'}")
    summary = train(fake_config(tmp_path / "run"), console=False, backend=threaded_backend())
    assert (tmp_path / "crashed").exists()
    events = read_jsonl(tmp_path / "run/events.jsonl")
    failed = [e for e in events if e["event"] == "member_failed"]
    assert len(failed) == 1 and failed[0]["member"] == 1 and "injected env error" in failed[0]["error"]
    restarted = [e for e in events if e["event"] == "member_restarted"]
    assert restarted and restarted[0]["member"] == 1 and restarted[0]["env_steps"] % 400 == 0
    assert summary["finished"]
    check_lineage_consistent(tmp_path / "run", 4)


def test_diverged_member_is_reseeded_from_a_donor(tmp_path, monkeypatch):
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_CRASH", f"2:1300:{tmp_path / 'crashed'}:diverge")
    # Every checkpoint kept: the donor's is read back below, after the run (pruning would be right).
    summary = train(fake_config(tmp_path / "run", pbt={"truncation_fraction": 0.25}, run={"checkpoint_keep": 1000}),
                    console=False, backend=threaded_backend())
    events = read_jsonl(tmp_path / "run/events.jsonl")
    assert any(e["event"] == "member_failed" and e["diverged"] for e in events)
    rows = check_lineage_consistent(tmp_path / "run", 4)
    reseeds = [r for r in rows if r["exploit"] == "reseed"]
    assert len(reseeds) == 1 and reseeds[0]["member"] == 2
    store = RunStore(tmp_path / "run")
    assert reseeds[0]["weights_sha256"] == weights_sha256(store.load_checkpoint(reseeds[0]["donor_checkpoint"])["learner"])
    assert summary["finished"]


def test_member_process_death_is_detected(tmp_path, monkeypatch):
    # A member killed from outside (OOM killer, kill -9) is restarted; the run does not hang.
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.02")
    monkeypatch.setenv("PBT_RL_TEST_KILL", f"1:800:{tmp_path / 'killed'}")
    summary = train(fake_config(tmp_path / "run", run={"total_env_steps": 2400}), console=False,
                    backend=fake_backend())
    events = read_jsonl(tmp_path / "run/events.jsonl")
    # Detected either by the closed pipe when the controller next writes to it, or by the exit when
    # it next reads: which comes first depends on timing.
    assert (tmp_path / "killed").exists()
    assert any(e["event"] == "member_failed" and e["member"] == 1
               and ("exited" in e["error"] or "pipe is closed" in e["error"]) for e in events)
    assert any(e["event"] == "member_restarted" and e["member"] == 1 for e in events)
    assert summary["finished"]


def test_kill9_controller_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    process = start_controller(tmp_path, fake_config(run_dir, run={"total_env_steps": 6000}),
                               env={"PBT_RL_TEST_SLEEP": "0.03"})
    try:
        assert wait_until(lambda: len(read_jsonl(run_dir / "lineage.jsonl")) >= 2)
        members = children(process.pid)
        assert members
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert wait_until(lambda: not any(alive(p) for p in members)), "member processes outlived the controller"

    before = json.loads((run_dir / "state.json").read_text())
    lineage_before = read_jsonl(run_dir / "lineage.jsonl")
    summary = resume(run_dir, console=False, backend=fake_backend())
    assert summary["finished"]
    rows = check_lineage_consistent(run_dir, 4)
    assert rows[: len(lineage_before)] == lineage_before
    check_metrics_grow(run_dir, 4)
    events = read_jsonl(run_dir / "events.jsonl")
    assert any(e["event"] == "resumed" for e in events)
    after = json.loads((run_dir / "state.json").read_text())
    for member, record in before["members"].items():
        assert after["members"][member]["env_steps"] >= record["restore"]["env_steps"]
        assert after["members"][member]["env_steps"] >= 6000


def test_a_stop_set_from_another_thread_ends_the_run_as_a_wall_time_limit_would(tmp_path, monkeypatch):
    """train(stop=...): the bench stops a run once it has measured it. The run ends unfinished,
    says why in its events, and a resume trains it to its budget."""
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.002")
    run_dir = tmp_path / "run"
    stop = threading.Event()
    stop.set()  # asked for before the first look: the controller stops at its first check
    summary = train(fake_config(run_dir), console=False, backend=threaded_backend(), stop=stop)
    assert not summary["finished"]
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")].count("stop_requested") == 1
    assert not resume(run_dir, console=False, backend=threaded_backend(), stop=stop)["finished"]  # resume takes one too
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")].count("stop_requested") == 2
    summary = resume(run_dir, console=False, backend=threaded_backend())
    assert summary["finished"]
    check_metrics_grow(run_dir, 4)


def test_resume_falls_back_to_previous_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(fake_config(run_dir, pbt={"population_size": 2, "truncation_fraction": 0.5},
                      run={"total_env_steps": 2000, "checkpoint_keep": 5}), console=False, backend=threaded_backend())
    store = RunStore(run_dir)
    state = json.loads(store.state_path.read_text())
    # Pretend member 0 was stopped at 1600 (its 2000 checkpoint never reported) and that the
    # 1600 checkpoint got damaged on disk.
    record = state["members"]["0"]
    good = store.list_checkpoints(0)
    damaged = good[-2]
    record.update(done=False, env_steps=1600, restore={"checkpoint": damaged, "env_steps": 1600,
                                                         "updates": 40, "hyperparameters": None},
                  checkpoint_id=damaged)
    store.write_json(store.state_path, state)
    path = store.path(damaged)
    path.write_bytes(path.read_bytes()[:-5] + b"XXXXX")
    with pytest.raises(Exception, match="corrupt"):
        store.load_checkpoint(damaged)
    summary = resume(run_dir, console=False, backend=threaded_backend())
    events = read_jsonl(run_dir / "events.jsonl")
    fallback = [e for e in events if e["event"] == "checkpoint_fallback"]
    assert any(e["event"] == "checkpoint_corrupt" and e["checkpoint"] == damaged for e in events)
    assert fallback and fallback[0]["checkpoint"] is not None and fallback[0]["checkpoint"] != damaged
    assert summary["finished"] and summary["members"]["0"]["env_steps"] >= 2000
    check_metrics_grow(run_dir, 2)


def test_train_refuses_a_non_empty_run_dir(tmp_path):
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not empty; use `pbt-rl resume .*x` to continue it"):
        train(fake_config(run_dir), console=False, backend=threaded_backend())
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_unusable_run_dir_is_a_one_line_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="cannot create run directory"):
        train(fake_config(blocker / "run"), console=False, backend=threaded_backend())
    with pytest.raises(RunDirError, match="not a pbt-rl run directory"):
        resume(tmp_path, console=False)

    # A full disk at resume: the error is one line and the earlier files are untouched.
    run_dir = tmp_path / "run"
    train(fake_config(run_dir, pbt={"population_size": 2, "truncation_fraction": 0.5},
                      run={"total_env_steps": 800}), console=False, backend=threaded_backend())
    snapshot = run_files(run_dir)
    real_write = os.write

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    monkeypatch.setattr("pbt_rl.runtime.store.os.write", disk_full)
    import builtins

    real_open = builtins.open

    def open_full(file, mode="r", *args, **kwargs):
        if "w" in mode or "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_full)
    with pytest.raises(RunDirError, match="No space left on device"):
        resume(run_dir, console=False, backend=threaded_backend())
    monkeypatch.undo()
    assert os.write is real_write
    assert run_files(run_dir) == snapshot


def test_real_a2c_population_exploits_on_cartpole(tmp_path):
    """The same checks with the real learners and envs (tiny budget)."""
    config = fake_config(tmp_path / "run", pbt={"population_size": 3, "ready_after_steps": 2000, "truncation_fraction": 0.34},
                         run={"total_env_steps": 8000, "checkpoint_keep": 100})
    summary = train(config, console=False)
    rows = check_lineage_consistent(tmp_path / "run", 3)
    assert summary["finished"] and rows
    store = RunStore(tmp_path / "run")
    for row in rows:
        assert row["weights_sha256"] == weights_sha256(store.load_checkpoint(row["donor_checkpoint"])["learner"])
        assert {k: row["applied_hyperparameters"][k] for k in row["new_hyperparameters"]} == row["new_hyperparameters"]
    check_metrics_grow(tmp_path / "run", 3)


def test_progress_rows_carry_update_diagnostics_and_timing():
    """The member's accumulator: loss parts plus finite update diagnostics, and summed timings."""
    from pbt_rl.runtime.member import ProgressAccumulator

    pending = ProgressAccumulator()
    extra = {"grad_norm": 0.4, "clip_fraction": 0.1, "approx_kl": float("nan"), "act_seconds": 1.0,
             "env_seconds": 0.7, "inference_seconds": 0.2, "update_seconds": 0.5}
    pending.add(FakeReport(100, [1.0], [10], {"total_loss": 0.5}, 2, 0.0, extra), steps=100, seconds=2.0)
    pending.add(FakeReport(200, [], [], {}, 0, 0.0, {"grad_norm": float("nan")}), steps=100, seconds=2.0)
    out = pending.take()
    assert out["losses"] == {"total_loss": 0.5, "grad_norm": 0.4, "clip_fraction": 0.1}  # NaN kl left out
    assert out["timing_seconds"] == {"wall": 4.0, "act": 1.0, "env": 0.7, "inference": 0.2, "update": 0.5}
    assert out["env_steps_per_second"] == 50.0 and out["episode_returns"] == [1.0]

