"""The run directory's write disciplines: atomic files, checksummed checkpoints, durable logs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pbt_rl.config import ConfigError
from pbt_rl.runtime.store import (
    CheckpointError,
    RunDirError,
    RunStore,
    append_jsonl,
    atomic_write_json,
    read_jsonl,
    repair_jsonl,
)


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


def test_create_refuses_non_empty_and_unusable_dirs(tmp_path):
    RunStore(tmp_path / "fresh").create(2)
    assert (tmp_path / "fresh/members/1/checkpoints").is_dir()
    with pytest.raises(RunDirError, match="is not empty; use `pbt-rl resume"):
        RunStore(tmp_path / "fresh").create(2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        RunStore(tmp_path / "file").create(1)
    with pytest.raises(RunDirError, match="cannot create run directory"):
        RunStore(tmp_path / "file" / "run").create(1)
