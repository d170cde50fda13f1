"""Fault classes the runtime survives (docs/runtime.md, "Fault model"): a controller killed at any
write, a member that hangs, two controllers on one run directory, members that always fail,
damaged run files, a damaged final checkpoint, devices that do not exist.

Members are ``runtime_support.FakeLearner`` processes (real pipes, checkpoints and files, no envs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from pbt_rl.cli import main
from pbt_rl.config import ConfigError
from pbt_rl.replay import replay
from pbt_rl.runtime import RunDirError, RunStore, resume, train
from pbt_rl.runtime.records import MemberRecord
from pbt_rl.runtime.run_lock import RunLock
from pbt_rl.runtime.store import read_jsonl
from pbt_rl.runtime.summary import run_status
from pbt_rl.runtime.watchdog import SilenceWatch
from runtime_support import (fake_backend, threaded_backend, alive, check_lineage_consistent, check_metrics_grow, children, fake_config,
                             fake_seed_is_member_id, make_fake_learner, run_files, start_controller, wait_until)


def events_of(run_dir, name, member=None):
    return [e for e in read_jsonl(run_dir / "events.jsonl")
            if e["event"] == name and (member is None or e["member"] == member)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pbt-rl: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------ hangs


def test_silence_allowance_follows_the_members_own_cadence():
    watch = SilenceWatch(factor=10, min_seconds=3)
    watch.launched(0, now=0.0)
    assert watch.hung(29.9) == []  # start-up: factor x min_seconds
    (found,) = watch.hung(30.1)
    assert found.member_id == 0 and not found.started and found.allowed_seconds == 30.0

    watch.heard(0, 5.0)  # the first message ends start-up; no gap is measured across it
    watch.heard(0, 6.0)  # a 1 s gap: allowed max(3, 10 x 1) = 10 s
    assert watch.hung(15.9) == [] and [s.member_id for s in watch.hung(16.1)] == [0]
    watch.heard(0, 10.0)  # a 4 s gap: allowed 40 s
    assert watch.hung(49.9) == [] and watch.hung(50.1)[0].allowed_seconds == 40.0

    watch.heard(0, 12.0, waits=True)  # ready: waiting for the controller never counts
    assert watch.hung(10_000.0) == []
    watch.commanded(0, 10_000.0)  # the clock restarts with the command
    assert watch.hung(10_039.9) == [] and watch.hung(10_040.1)

    watch.launched(0, 20_000.0)  # a restart: start-up again, the cadence is remembered
    assert watch.hung(20_029.9) == []
    watch.heard(0, 20_001.0)
    assert watch.hung(20_040.9) == [] and watch.hung(20_041.1)
    watch.forget(0)
    assert watch.hung(1e9) == []

    fast = SilenceWatch(factor=10, min_seconds=3)
    fast.launched(1, 0.0)
    fast.heard(1, 1.0)
    fast.heard(1, 1.1)  # a 0.1 s cadence: the minimum applies
    assert fast.hung(4.0) == [] and fast.hung(4.2)
    assert SilenceWatch(factor=0, min_seconds=3).hung(1e9) == [] and not SilenceWatch(0, 3).enabled


def test_a_stopped_member_is_killed_and_restarted(tmp_path, monkeypatch):
    """kill -STOP: alive, pipe open, silent. The run must not stall."""
    fake_seed_is_member_id(monkeypatch)
    monkeypatch.setenv("PBT_RL_TEST_SLEEP", "0.02")
    monkeypatch.setenv("PBT_RL_TEST_STOP", f"1:1200:{tmp_path / 'stopped'}")
    run_dir = tmp_path / "run"
    # Start-up is allowed 10 x 5 s (generous for 4 member processes importing torch on 2 loaded
    # cores); a working member 10 x its longest gap, at least 5 s.
    config = fake_config(run_dir, run={"total_env_steps": 2400, "hang_timeout_min_seconds": 5.0,
                                       "hang_timeout_factor": 10.0})
    summary = train(config, console=False, backend=fake_backend())
    assert (tmp_path / "stopped").exists()
    hung = [e for e in events_of(run_dir, "member_hung", 1) if e["started"]]
    # Both are rounded to 0.1 s in the event row.
    assert hung and hung[0]["silent_seconds"] >= hung[0]["allowed_seconds"] >= 5.0
    assert any("hung: no message" in e["error"] for e in events_of(run_dir, "member_failed", 1))
    assert events_of(run_dir, "member_restarted", 1)
    assert summary["status"] == "finished" and summary["members"]["1"]["env_steps"] >= 2400
    check_lineage_consistent(run_dir, 4)
    check_metrics_grow(run_dir, 4)


# ------------------------------------------------------------------------------ two controllers


def test_a_run_directory_has_one_controller_at_a_time(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = fake_config(run_dir, run={"total_env_steps": 10**7})
    holder = start_controller(tmp_path, config, env={"PBT_RL_TEST_SLEEP": "0.05"})
    try:
        assert wait_until(lambda: (run_dir / "state.json").exists() and children(holder.pid))
        named = rf"in use by `pbt-rl train` \(pid {holder.pid} on "
        with pytest.raises(RunDirError, match=named):
            resume(run_dir, console=False, backend=fake_backend())
        with pytest.raises(RunDirError, match=named):
            train(config, console=False, backend=fake_backend())
        with pytest.raises(RunDirError, match=named):
            replay(run_dir, member=0, console=False, learner_factory=make_fake_learner)
        assert main(["resume", str(run_dir)]) == 2
        assert f"pid {holder.pid}" in one_error_line(capsys)
        assert holder.poll() is None, "the refused commands must not disturb the holder"
        members = children(holder.pid)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    assert wait_until(lambda: not any(alive(p) for p in members))
    with RunLock(run_dir, "test"):  # the kernel dropped the dead controller's lock
        pass
    assert not (run_dir / "replay-0").exists()


# ------------------------------------------------------------------------------ members that always fail


def test_abandoned_members_make_the_summary_and_exit_status_tell_the_truth(tmp_path, monkeypatch):
    fake_seed_is_member_id(monkeypatch)
    run_dir = tmp_path / "run"
    config = fake_config(run_dir, pbt={"population_size": 2, "truncation_fraction": 0.5}, run={"total_env_steps": 800})
    monkeypatch.setenv("PBT_RL_TEST_BROKEN", "0,1")
    summary = train(config, console=False, backend=threaded_backend())
    assert summary["status"] == "failed" and not summary["finished"] and summary["best_member"] is None
    for member in ("0", "1"):
        info = summary["members"][member]
        assert info["status"] == "abandoned" and info["failures"] == 10 and "injected broken member" in info["error"]
    assert len(events_of(run_dir, "member_failed", 0)) == 10 and len(events_of(run_dir, "member_abandoned")) == 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"

    monkeypatch.delenv("PBT_RL_TEST_BROKEN")  # the cause is gone: resume retries abandoned members
    summary = resume(run_dir, console=False, backend=threaded_backend())
    assert summary["status"] == "finished" and summary["finished"] and summary["best_member"] is not None
    assert all(m["status"] == "done" and m["error"] is None for m in summary["members"].values())
    assert len(events_of(run_dir, "member_retried")) == 2


def test_run_status_says_what_became_of_the_members():
    def records(*states):
        return {i: MemberRecord(i, i, {}, done=s == "done", abandoned=s == "abandoned") for i, s in enumerate(states)}

    assert run_status(records("done", "done")) == "finished"
    assert run_status(records("done", "abandoned")) == "partial"
    assert run_status(records("abandoned", "abandoned")) == "failed"
    assert run_status(records("done", "abandoned", "training")) == "stopped"


@pytest.mark.parametrize("status, code", [("finished", 0), ("stopped", 0), ("partial", 3), ("failed", 1)])
def test_train_and_resume_exit_with_the_documented_code_of_the_run_status(tmp_path, monkeypatch, status, code):
    monkeypatch.setattr("pbt_rl.runtime.train", lambda config, console: {"status": status})
    monkeypatch.setattr("pbt_rl.runtime.resume", lambda run_dir, console: {"status": status})
    assert main(["train", "configs/quickstart.yaml", f"run.dir={tmp_path / 'run'}", "-q"]) == code
    (tmp_path / "config.yaml").write_text("")  # enough for the CLI to take it as a run directory
    assert main(["resume", str(tmp_path), "-q"]) == code


# ------------------------------------------------------------------------------ damaged files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    summary = train(fake_config(run_dir, pbt={"population_size": 2, "truncation_fraction": 0.5},
                                run={"total_env_steps": 1600, "checkpoint_keep": 10}),
                    console=False, backend=threaded_backend())
    assert summary["status"] == "finished"
    return run_dir


def _rewrite(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _state_with(finished_run, change):
    state = json.loads((finished_run / "state.json").read_text())
    change(state)
    return json.dumps(state)


RANDOM_BYTES = bytes((i * 7919 + 13) % 256 for i in range(512))
DAMAGE = {
    "state is a list": ("state.json", lambda run: "[]"),
    "state is only a format": ("state.json", lambda run: '{"format": 1}'),
    "members is a string": ("state.json", lambda run: _state_with(run, lambda s: s.update(members="many"))),
    "members is null": ("state.json", lambda run: _state_with(run, lambda s: s.update(members=None))),
    "a member's steps are text": ("state.json",
                                  lambda run: _state_with(run, lambda s: s["members"]["0"].update(env_steps="x"))),
    "state is random bytes": ("state.json", lambda run: RANDOM_BYTES),
    "state nested 20000 deep": ("state.json", lambda run: "[" * 20000 + "]" * 20000),
    "bad scheduler RNG state": ("state.json", lambda run: _state_with(
        run, lambda s: s["scheduler"].update(rng={"bit_generator": "PCG64", "state": "garbage"}))),
    "state.json missing": ("state.json", None),
    "population is random bytes": ("population.json", lambda run: RANDOM_BYTES),
    "lineage middle line garbage": ("lineage.jsonl", lambda run: '{"member": 0}\n}{ not json\n{"member": 1}\n'),
    "lineage row without generation": ("lineage.jsonl", lambda run: json.dumps(
        {"member": 0, "env_steps": 400, "donor_checkpoint": "members/1/checkpoints/000000000400.pt",
         "new_hyperparameters": {}}) + "\n"),
    "metrics row without env steps": ("members/0/metrics.jsonl", lambda run: '{"member": 0}\n{"member": 0}\n'),
    "config is not YAML": ("config.yaml", lambda run: "env: [unclosed\n"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_resume_of_a_damaged_run_directory_is_one_line_and_changes_nothing(finished_run, tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    name, content = DAMAGE[case]
    if content is None:
        (run_dir / name).unlink()
    else:
        _rewrite(run_dir / name, content(finished_run))
    before = run_files(run_dir)
    assert main(["resume", str(run_dir), "-q"]) == 2
    one_error_line(capsys)
    assert run_files(run_dir) == before


def test_resume_of_a_finished_run_replaces_a_damaged_best_checkpoint(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    damaged = summary["best_checkpoint"]
    path = run_dir / damaged
    path.write_bytes(path.read_bytes()[:-8] + b"XXXXXXXX")
    after = resume(run_dir, console=False, backend=threaded_backend())
    assert after["status"] == "finished" and after["best_checkpoint"] not in (None, damaged)
    assert RunStore(run_dir).verify_checkpoint(after["best_checkpoint"])
    best = after["members"][str(after["best_member"])]
    assert best["checkpoint"] == after["best_checkpoint"]
    assert best["checkpoint_env_steps"] == RunStore.checkpoint_env_steps(after["best_checkpoint"]) < 1600
    assert [e["checkpoint"] for e in events_of(run_dir, "checkpoint_corrupt")] == [damaged]
    assert [e["checkpoint"] for e in events_of(run_dir, "checkpoint_fallback")] == [after["best_checkpoint"]]
    assert json.loads((run_dir / "summary.json").read_text())["best_checkpoint"] == after["best_checkpoint"]


# ------------------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_device_on_a_machine_without_one_is_refused_before_anything_is_written(tmp_path, finished_run,
                                                                                      device):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        train(fake_config(tmp_path / "run", agent={"device": device}), console=False, backend=threaded_backend())
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    original = (run_dir / "config.yaml").read_text()
    assert "device: cpu" in original
    (run_dir / "config.yaml").write_text(original.replace("device: cpu", f"device: {device}"))
    before = run_files(run_dir)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        resume(run_dir, console=False, backend=threaded_backend())
    assert run_files(run_dir) == before
