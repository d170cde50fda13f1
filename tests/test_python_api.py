"""The notebook API: docs/python_api.md runs as written; ``open_run`` gives a run's rows as flat dicts."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

import pbt_rl
from pbt_rl.lineage import schedule_of
from pbt_rl.runtime.store import RunDirError, RunStore, load_run
from test_report import write_synthetic_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


def test_the_python_api_doc_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every ```python block of docs/python_api.md, top to bottom, in one namespace."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the doc's mkdtemp() lands in tmp_path
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "python_api_doc"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)

    run_dir = namespace["workdir"] / "run"
    assert run_dir.parent.parent == tmp_path
    run = load_run(run_dir)
    summary = namespace["summary"]
    assert summary["status"] == "finished" and namespace["best"] == summary["best_member"]
    assert len(namespace["exploits"]) == len(run.lineage) == summary["exploits"]
    assert namespace["schedule"] == [{"env_steps": s, **values} for s, values in schedule_of(run, "best")]
    assert len(namespace["metrics"]) == sum(len(rows) for rows in run.metrics.values())
    assert (namespace["report_dir"] / "lineage.png").is_file()
    assert (namespace["workdir"] / "fitness.png").stat().st_size > 5_000
    policy, observations = namespace["policy"], namespace["observations"]
    assert namespace["actions"].shape == (5,) and set(namespace["actions"].tolist()) <= {0, 1}
    np.testing.assert_array_equal(namespace["plain_actions"], policy(observations))
    assert f"best member {summary['best_member']}" in capsys.readouterr().out


def test_import_pbt_rl_stays_light():
    code = ("import sys, pbt_rl; assert 'torch' not in sys.modules and 'numpy' not in sys.modules; "
            "pbt_rl.open_run; pbt_rl.as_frame; assert 'torch' not in sys.modules; "
            "import pbt_rl.policy; assert 'torch' not in sys.modules; print(callable(pbt_rl.load_policy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pbt_rl.nothing_here  # noqa: B018


def test_open_run_gives_the_runs_rows_as_flat_dicts(tmp_path):
    # The synthetic run (tests/test_report.py): member 2 copies member 0 at 100, member 1 copies
    # member 2 at its step 200 (weights of member 2 at 180), member 0 copies member 1 at 250.
    run = pbt_rl.open_run(write_synthetic_run(tmp_path / "run"))
    assert run.members == [0, 1, 2] and run.best_member == 1 and not run.in_progress
    assert run.member_id("best") == 1

    lineage = run.lineage()
    assert [(r["member"], r["env_steps"], r["donor"], r["saver"], r["donor_env_steps"]) for r in lineage] == [
        (2, 100, 0, 0, 100), (1, 200, 2, 2, 180), (0, 250, 1, 1, 240)]
    assert lineage[1]["hp/lr"] == 0.0144 and lineage[1]["old/lr"] == 0.02 and lineage[1]["op/lr"] == "*1.2"

    assert run.schedule("best") == [
        {"env_steps": 0, "lr": 0.01, "entropy_cost": 0.1},
        {"env_steps": 100, "lr": 0.012, "entropy_cost": 0.1},
        {"env_steps": 180, "lr": 0.0144, "entropy_cost": 0.08},
    ]
    assert [(s["member"], s["start"], s["end"], s["timeline_start"]) for s in run.ancestry("best")] == [
        (0, 0, 100, 0), (2, 100, 180, 100), (1, 200, 300, 180)]

    table = {row["member"]: row for row in run.members_table()}
    assert table[1] == {"member": 1, "env_steps": 300, "fitness": 40.0, "exploits": 1, "seed": 101,
                        "hp/lr": 0.02, "hp/entropy_cost": 0.2}

    metrics = run.metrics(1)
    assert [row["env_steps"] for row in metrics] == [50, 100, 150, 200, 250, 300]
    assert metrics[0]["fitness"] is None and metrics[-1]["fitness"] == 40.0
    assert metrics[3]["hp/lr"] == 0.02 and metrics[4]["hp/lr"] == 0.0144 and metrics[4]["losses/entropy"] == 0.6
    assert {row["member"] for row in run.metrics()} == {0, 1, 2} and len(run.metrics()) == 18
    assert run.checkpoint(1) is None  # the synthetic run has no checkpoints

    # A view is one moment of the run; refresh() reads it again.
    with (run.root / "members" / "1" / "metrics.jsonl").open("a") as metrics_file:
        metrics_file.write('{"member": 1, "env_steps": 350, "fitness": 41.0}\n')
    assert len(run.metrics(1)) == 6 and len(run.refresh().metrics(1)) == 7

    with pytest.raises(RunDirError, match="run directory not found"):
        pbt_rl.open_run(tmp_path / "missing")


def test_open_run_names_the_newest_verified_checkpoint(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    store = RunStore(run_dir)
    store.save_checkpoint(1, 200, {"learner": {}})
    store.save_checkpoint(1, 300, {"learner": {}})
    store.path("members/1/checkpoints/000000000300.pt.sha256").unlink()  # an interrupted write
    assert pbt_rl.open_run(run_dir).checkpoint("best") == store.path("members/1/checkpoints/000000000200.pt")


def test_as_frame_uses_pandas_when_it_is_there(monkeypatch):
    rows = [{"member": 0, "fitness": 1.0}, {"member": 1, "fitness": 2.0}]
    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(DataFrame=lambda data: ("frame", data)))
    assert pbt_rl.as_frame(iter(rows)) == ("frame", rows)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        pbt_rl.as_frame(rows)
