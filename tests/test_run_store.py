"""The run directory: atomic files, checksummed checkpoints, durable logs, typed rows, one checkpoint rule."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pbt_rl.config import ConfigError
from pbt_rl.runtime.file_io import append_jsonl, atomic_write_json, read_jsonl, repair_jsonl
from pbt_rl.runtime.run_format import EventRow, LineageRow, MetricsRow
from pbt_rl.runtime.store import CheckpointError, RunDirError, RunStore


def test_checkpoint_round_trip_and_checksum(tmp_path):
    store = RunStore(tmp_path)
    payload = {"learner": {"w": torch.arange(6.0)}, "member": {"env_steps": 1234}}
    checkpoint = store.save_checkpoint(2, 1234, payload)
    assert checkpoint == "members/2/checkpoints/000000001234.pt"
    assert RunStore.checkpoint_env_steps(checkpoint) == 1234
    assert torch.equal(store.load_checkpoint(checkpoint)["learner"]["w"], torch.arange(6.0))
    assert not list((tmp_path / "members/2/checkpoints").glob(".*tmp*"))  # no temporary left behind

    path = store.path(checkpoint)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: SHA-256"):
        store.load_checkpoint(checkpoint)
    assert not store.verify_checkpoint(checkpoint)

    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(CheckpointError, match="no .sha256"):
        store.load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        store.load_checkpoint("members/2/checkpoints/000000000001.pt")


def test_prune_keeps_the_newest_and_every_pinned_checkpoint(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.save_checkpoint(0, steps, {"x": steps}) for steps in (100, 200, 300, 400, 500)]
    removed = store.prune_checkpoints(0, keep=2, pinned={ids[1]})
    assert removed == [ids[0], ids[2]]
    assert store.list_checkpoints(0) == [ids[1], ids[3], ids[4]]
    assert not store.path(ids[0]).with_name(store.path(ids[0]).name + ".sha256").exists()


def test_atomic_json_failure_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"generation": 1})

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(RunDirError, match=r"cannot write .*state.json: No space left on device"):
        atomic_write_json(path, {"generation": 2})
    assert json.loads(path.read_text()) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temporary file is gone
    assert issubclass(RunDirError, ConfigError)  # the CLI prints it as one line


def test_jsonl_rows_survive_a_torn_last_line(tmp_path):
    path = tmp_path / "lineage.jsonl"
    append_jsonl(path, {"member": 0, "score": float("nan")})
    append_jsonl(path, {"member": 1})
    with open(path, "a") as handle:
        handle.write('{"member": 2, "sco')  # kill -9 in the middle of a write
    assert read_jsonl(path) == [{"member": 0, "score": None}, {"member": 1}]
    assert repair_jsonl(path)
    append_jsonl(path, {"member": 3})
    assert [r["member"] for r in read_jsonl(path)] == [0, 1, 3]
    assert not repair_jsonl(path)

    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(RunDirError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    # Only an unterminated last line can be torn: a bad line before it, or a bad complete last
    # line, is damage, never a silently shorter log.
    path.write_text('{"a": 1}\nnot json\n{"b": 2}')
    with pytest.raises(RunDirError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"b": 2\n')
    with pytest.raises(RunDirError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def _lineage_row(**changes) -> dict:
    row = {"time": 5.0, "wall_seconds": 2.5, "member": 1, "env_steps": 200, "generation": 1, "donor": 2,
           "donor_checkpoint": "members/0/checkpoints/000000000100.pt", "donor_env_steps": 100,
           "old_hyperparameters": {"lr": 0.1}, "new_hyperparameters": {"lr": 0.12}, "operations": {"lr": "*1.2"},
           "member_score": None, "donor_score": 3.0, "exploit": "truncation"}
    return {**row, **changes}


def test_typed_rows_read_back_what_the_runtime_writes_and_name_a_bad_row(tmp_path):
    store = RunStore(tmp_path)
    store.append(store.lineage_path, _lineage_row())
    store.append(store.events_path, {"time": 1.0, "wall_seconds": 0.5, "event": "member_restarted", "member": 0,
                                     "checkpoint": None, "env_steps": 150})
    store.checkpoint_dir(3).mkdir(parents=True)
    store.append(store.metrics_path(3), {"member": 3, "env_steps": 50, "fitness": float("nan"),
                                         "episode_returns": [1.0, 2.0], "hyperparameters": {"lr": 0.1}})
    (row,) = store.read_lineage()
    assert (row.member, row.env_steps, row.donor, row.donor_env_steps, row.generation) == (1, 200, 2, 100, 1)
    assert row.saver == 0  # the donor handed over a checkpoint it had copied from member 0
    assert (row.member_score, row.donor_score, row.new_hyperparameters) == (None, 3.0, {"lr": 0.12})
    (event,) = store.read_events()
    assert (event.event, event.member, event.env_steps) == ("member_restarted", 0, 150)
    assert event.to_dict() == {"time": 1.0, "wall_seconds": 0.5, "event": "member_restarted", "member": 0,
                               "checkpoint": None, "env_steps": 150}
    assert store.member_ids() == [3]
    assert store.read_metrics(3) == [MetricsRow(env_steps=50, member=3, fitness=None, episode_returns=(1.0, 2.0),
                                                hyperparameters={"lr": 0.1})]
    # A row without a field readers rely on is one line naming the file and row.
    store.append(store.lineage_path, {k: v for k, v in _lineage_row().items() if k != "donor"})
    with pytest.raises(RunDirError, match=r"lineage.jsonl: row 2 has no valid 'donor'"):
        store.read_lineage()
    for bad in (_lineage_row(env_steps="200"), _lineage_row(env_steps=True), _lineage_row(donor_checkpoint="x.pt")):
        with pytest.raises(RunDirError, match="has no valid"):
            LineageRow.from_dict(bad)
    with pytest.raises(RunDirError, match="is not a JSON object"):
        MetricsRow.from_dict([1, 2])
    with pytest.raises(RunDirError, match="has no valid 'event'"):
        EventRow.from_dict({"member": 0})


def test_newest_verified_checkpoint_is_the_one_rule_for_eval_and_resume(tmp_path):
    store = RunStore(tmp_path)
    ids = [store.save_checkpoint(0, steps, {"x": steps}) for steps in (100, 200, 300)]
    assert store.newest_verified_checkpoint(0) == ids[2]
    # A checkpoint without its .sha256 is an interrupted write: passed over.
    store.path(store.checkpoint_id(0, 400)).write_bytes(b"half a checkpoint")
    assert store.newest_verified_checkpoint(0) == ids[2]
    # A checksum mismatch is an error (eval) unless the caller falls back past it (resume).
    store.checksum_path(ids[2]).write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        store.newest_verified_checkpoint(0)
    assert store.newest_verified_checkpoint(0, skip_corrupt=True) == ids[1]
    assert store.newest_verified_checkpoint(0, skip_corrupt=True, exclude={ids[1]}) == ids[0]
    assert store.newest_verified_checkpoint(0, at_most_env_steps=199) == ids[0]
    assert store.newest_verified_checkpoint(0, at_most_env_steps=99) is None
    assert store.newest_verified_checkpoint(5) is None
    # The checksum file may also be `sha256sum` output ("<hash>  <name>").
    digest = store.checksum_path(ids[1]).read_text().strip()
    store.checksum_path(ids[1]).write_text(f"{digest}  000000000200.pt\n")
    assert store.verify_checkpoint(ids[1])


def test_paths_are_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = RunStore("runs/a")
    assert store.root == tmp_path / "runs" / "a"
    assert store.metrics_path(2) == tmp_path / "runs/a/members/2/metrics.jsonl"
    assert store.path(store.checkpoint_id(2, 7)) == tmp_path / "runs/a/members/2/checkpoints/000000000007.pt"
    assert store.replay_dir(2) == tmp_path / "runs/a/replay-2" and store.report_dir == tmp_path / "runs/a/report"
    assert (RunStore.checkpoint_member("members/2/checkpoints/000000000007.pt"),
            RunStore.checkpoint_env_steps("members/2/checkpoints/000000000007.pt")) == (2, 7)
    with pytest.raises(CheckpointError, match="not a checkpoint id"):
        RunStore.checkpoint_member("members/2/checkpoints/7.pt")


def test_create_refuses_non_empty_and_unusable_dirs(tmp_path):
    fresh = RunStore(tmp_path / "fresh")
    fresh.create(2, fresh.initial_files("run: {}\n", {"members": {}}, {"generation": 0}))
    fresh.release()
    assert (tmp_path / "fresh/members/1/checkpoints").is_dir()
    assert fresh.read_json(fresh.state_path) == {"generation": 0} and fresh.config_path.read_text() == "run: {}\n"
    with pytest.raises(RunDirError, match="is not empty; use `pbt-rl resume"):
        RunStore(tmp_path / "fresh").create(2, {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        RunStore(tmp_path / "file").create(1, {})
    with pytest.raises(RunDirError, match="cannot create run directory"):
        RunStore(tmp_path / "file" / "run").create(1, {})
