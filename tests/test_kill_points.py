"""kill -9 of the controller at many instants, from run creation to shutdown, then resume.

The controller runs in its own process with every file-system write call it makes counted
(os.write, os.replace, os.rename, os.mkdir, os.ftruncate, os.truncate, os.unlink; pipe sends to
members do not go through these). At the chosen call it kills itself with SIGKILL: just before
the call, or for os.write after writing half of the bytes (a torn line). Whatever the instant,
the run directory must be absent (the kill came before it was complete) or resume to the end
with lineage exactly once per exploit, step counters that only grow and verified checkpoints.
"""

from __future__ import annotations

import json

import pytest

from pbt_rl.runtime import RunStore, resume, train
from pbt_rl.runtime.store import read_jsonl
from runtime_support import (fake_backend, alive, check_lineage_consistent, check_metrics_grow, children, fake_config,
                             start_controller, wait_until)

pytestmark = pytest.mark.slow

KILL_PRELUDE = '''
import atexit, os, signal
_kill_at = int(os.environ.get("PBT_RL_TEST_KILL_AT", "0"))
_kill_at_summary = int(os.environ.get("PBT_RL_TEST_KILL_AT_SUMMARY", "-1"))
_calls = {"all": 0, "since_summary": None}

def _counted(name):
    real = getattr(os, name)

    def call(*args, **kwargs):
        _calls["all"] += 1
        if name == "replace" and str(args[1]).endswith("summary.json") and _calls["since_summary"] is None:
            _calls["since_summary"] = 0
        if _calls["since_summary"] is not None:
            _calls["since_summary"] += 1
        if _calls["all"] == _kill_at or _calls["since_summary"] == _kill_at_summary + 1:
            if name == "write" and len(args[1]) > 1:
                real(args[0], bytes(args[1])[: len(args[1]) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, name, call)

for _name in ("write", "replace", "rename", "mkdir", "ftruncate", "truncate", "unlink"):
    _counted(_name)
atexit.register(lambda: open(os.environ["PBT_RL_TEST_CALLS_FILE"], "w").write(str(_calls["all"])))
'''


def config_for(run_dir):
    return fake_config(run_dir, pbt={"population_size": 3, "truncation_fraction": 0.34, "mode": "sync"},
                       run={"total_env_steps": 1600, "checkpoint_keep": 2})


def run_and_kill(tmp_path, run_dir, **kill):
    env = {"PBT_RL_TEST_CALLS_FILE": str(tmp_path / "calls"), "PBT_RL_TEST_SLEEP": "0.01",
           **{f"PBT_RL_TEST_{k.upper()}": str(v) for k, v in kill.items()}}
    process = start_controller(tmp_path, config_for(run_dir), env=env, prelude=KILL_PRELUDE)
    members: set[int] = set()
    while process.poll() is None:
        members.update(children(process.pid))
        try:
            process.wait(timeout=0.05)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: keep collecting member pids
            pass
    assert wait_until(lambda: not any(alive(p) for p in members)), "members outlived the killed controller"
    return process.returncode


def check_resumes_to_the_end(run_dir):
    lineage_before = read_jsonl(run_dir / "lineage.jsonl")
    summary = resume(run_dir, console=False, backend=fake_backend())
    assert summary["status"] == "finished", summary
    rows = check_lineage_consistent(run_dir, 3)
    assert rows[: len(lineage_before)] == lineage_before
    check_metrics_grow(run_dir, 3)
    store = RunStore(run_dir)
    state = json.loads(store.state_path.read_text())
    for record in state["members"].values():
        assert record["done"] and record["env_steps"] >= 1600
        assert store.verify_checkpoint(record["checkpoint_id"])
    for row in rows:  # the copied weights' steps, read from the checkpoints not yet pruned
        if store.path(row["donor_checkpoint"]).exists():
            assert row["donor_env_steps"] == store.load_checkpoint(row["donor_checkpoint"])["member"]["env_steps"]


@pytest.fixture(scope="module")
def calls_of_a_whole_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reference")
    assert run_and_kill(tmp_path, tmp_path / "run") == 0
    return int((tmp_path / "calls").read_text())


def check_absent_or_resumes(tmp_path, run_dir):
    if run_dir.exists():
        check_resumes_to_the_end(run_dir)
        return
    # Killed before the directory was complete: nothing is there, and train starts afresh.
    summary = train(config_for(run_dir), console=False, backend=fake_backend())
    assert summary["status"] == "finished"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial")], "a half-built directory was left"


@pytest.mark.parametrize("call", range(1, 15))
def test_kill_during_run_creation(tmp_path, call):
    run_dir = tmp_path / "run"
    assert run_and_kill(tmp_path, run_dir, kill_at=call) == -9
    check_absent_or_resumes(tmp_path, run_dir)


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_kill_during_the_run(tmp_path, calls_of_a_whole_run, fraction):
    """Write calls spread over a whole run: progress rows, state saves, exploits, pruning."""
    run_dir = tmp_path / "run"
    call = int(calls_of_a_whole_run * fraction)
    if run_and_kill(tmp_path, run_dir, kill_at=call) != -9:
        pytest.skip(f"this run made fewer than {call} write calls")  # progress rows come by wall time
    check_absent_or_resumes(tmp_path, run_dir)


@pytest.mark.parametrize("after_summary", [0, 1, 2])
def test_kill_at_shutdown(tmp_path, after_summary):
    """0: just before summary.json replaces its temporary file; 1, 2: the calls after it."""
    run_dir = tmp_path / "run"
    code = run_and_kill(tmp_path, run_dir, kill_at_summary=after_summary)
    assert code in (-9, 0)  # 0: the run made fewer calls after its summary than asked
    check_resumes_to_the_end(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
