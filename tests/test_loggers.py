"""The loggers' fan-out: off the control loop, in order, failure-isolated, never losing an exploit."""

from __future__ import annotations

import threading

from pbt_rl.runtime import train
from pbt_rl.runtime.loggers import Loggers
from pbt_rl.runtime.store import RunStore
from runtime_support import fake_config, threaded_backend

WAIT = 60.0  # generous bound on any event wait; a correct run never comes near it


class Recorder:
    """A logger that records every call; ``block_first`` holds its first progress call until released."""

    def __init__(self, block_first: bool = False):
        self.calls: list[tuple] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not block_first:
            self.release.set()
        self.exploit_bytes: list[bytes] = []

    def start(self, population):
        self.calls.append(("start", population))

    def log_progress(self, row):
        self.entered.set()
        assert self.release.wait(WAIT)
        self.calls.append(("progress", row["env_steps"]))

    def log_exploit(self, row, checkpoint_path):
        self.exploit_bytes.append(checkpoint_path.read_bytes())
        self.calls.append(("exploit", row["env_steps"]))

    def log_event(self, row):
        self.calls.append(("event", row["event"]))

    def log_population(self, row):
        self.calls.append(("population", row))

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.calls.append(("loaded", state))

    def close(self):
        self.calls.append(("close",))


def test_calls_return_at_once_while_a_logger_is_blocked_and_arrive_in_order(tmp_path):
    recorder = Recorder(block_first=True)
    loggers = Loggers([recorder], tmp_path / "staging")
    loggers.start({"members": {}})
    loggers.progress({"env_steps": 1})
    assert recorder.entered.wait(WAIT)
    # The worker is stuck in the first call; the loop's calls still return immediately.
    for steps in range(2, 6):
        loggers.progress({"env_steps": steps})
    loggers.event({"event": "member_failed"})
    assert [c[0] for c in recorder.calls] == ["start"]
    recorder.release.set()
    loggers.close()
    assert recorder.calls[1:] == [("progress", s) for s in range(1, 6)] + [("event", "member_failed"), ("close",)]


def test_progress_rows_beyond_the_queue_limit_are_dropped_exploits_and_events_never(tmp_path, capsys):
    recorder = Recorder(block_first=True)
    loggers = Loggers([recorder], tmp_path / "staging", queue_limit=3)
    loggers.start({"members": {}})
    loggers.progress({"env_steps": 0})
    assert recorder.entered.wait(WAIT)
    checkpoint = tmp_path / "000000000100.pt"
    checkpoint.write_bytes(b"donor weights")
    for steps in range(1, 11):
        loggers.progress({"env_steps": steps})
    loggers.exploit({"env_steps": 11}, checkpoint)
    loggers.event({"event": "member_hung"})
    recorder.release.set()
    loggers.close()
    kinds = [c for c in recorder.calls if c[0] in ("progress", "exploit", "event")]
    assert kinds == [("progress", 0), ("progress", 1), ("progress", 2), ("progress", 3),
                     ("exploit", 11), ("event", "member_hung")]
    assert loggers.dropped == 7
    assert "7 progress rows were not logged" in capsys.readouterr().out


def test_an_exploits_checkpoint_survives_pruning_until_every_logger_has_read_it(tmp_path):
    recorder = Recorder(block_first=True)
    staging = tmp_path / "staging"
    loggers = Loggers([recorder], staging)
    loggers.start({"members": {}})
    loggers.progress({"env_steps": 0})
    assert recorder.entered.wait(WAIT)
    checkpoint = tmp_path / "000000000100.pt"
    checkpoint.write_bytes(b"donor weights at 100")
    loggers.exploit({"env_steps": 100}, checkpoint)
    checkpoint.unlink()  # the controller prunes it while the logger is still behind
    recorder.release.set()
    loggers.close()
    assert recorder.exploit_bytes == [b"donor weights at 100"]
    assert not list(staging.iterdir())  # the staged link is gone once read


def test_a_failing_logger_is_reported_once_and_the_others_get_every_call(tmp_path, capsys):
    class Broken(Recorder):
        def log_progress(self, row):
            raise RuntimeError("quota exceeded")

    broken, good = Broken(), Recorder()
    loggers = Loggers([broken, good], tmp_path / "staging")
    loggers.start({"members": {}})
    for steps in range(3):
        loggers.progress({"env_steps": steps})
    loggers.close()
    assert [c for c in good.calls if c[0] == "progress"] == [("progress", 0), ("progress", 1), ("progress", 2)]
    out = capsys.readouterr().out
    assert out.count("Broken.log_progress failed: RuntimeError: quota exceeded") == 1


def test_close_gives_up_on_a_logger_that_never_returns(tmp_path, capsys):
    stuck = Recorder(block_first=True)
    loggers = Loggers([stuck], tmp_path / "staging", close_seconds=0.2)
    loggers.start({"members": {}})
    loggers.progress({"env_steps": 1})
    loggers.progress({"env_steps": 2})
    loggers.close()  # returns although the logger is still inside its first call
    assert "did not finish within" in capsys.readouterr().out
    stuck.release.set()


def test_state_dicts_are_the_saved_ones_until_the_loggers_answer(tmp_path):
    class SlowStart(Recorder):
        def start(self, population):
            self.entered.set()
            assert self.release.wait(WAIT)
            super().start(population)

    recorder = SlowStart(block_first=True)
    loggers = Loggers([recorder], tmp_path / "staging")
    loggers.start({"members": {}}, [{"run_ids": {"0": "abc"}}])
    assert recorder.entered.wait(WAIT)
    # While the loggers are still starting, state.json must keep what the previous session saved.
    assert loggers.state_dicts() == [{"run_ids": {"0": "abc"}}]
    recorder.release.set()
    loggers.progress({"env_steps": 1})
    loggers.close()
    assert recorder.calls[:2] == [("loaded", {"run_ids": {"0": "abc"}}), ("start", {"members": {}})]
    assert loggers.state_dicts() == [{"calls": 2}]  # answered after start (progress rows change no state)


def test_loggers_see_the_population_at_every_ready_point(tmp_path):
    recorder = Recorder()
    config = fake_config(tmp_path / "run")
    summary = train(config, console=False, backend=threaded_backend(), loggers=[recorder])
    rows = [c[1] for c in recorder.calls if c[0] == "population"]
    store = RunStore(tmp_path / "run")
    # Each member is ready every 400 of its 4,000 env steps: 9 ready points before the last.
    assert len(rows) == 4 * 9
    for row in rows:
        scored = [m["fitness"] for m in row["members"] if m["fitness"] is not None]
        assert row["env_steps"] == sum(m["env_steps"] for m in row["members"])
        assert row["best_fitness"] == (max(scored) if scored else None)
        if row["best_member"] is not None:
            assert next(m for m in row["members"] if m["member"] == row["best_member"])["fitness"] == max(scored)
    assert [r["exploits"] for r in rows] == sorted(r["exploits"] for r in rows)
    assert rows[-1]["exploits"] <= summary["exploits"] == len(store.read_lineage())
    assert not store.logging_staging_dir.exists() or not list(store.logging_staging_dir.iterdir())
