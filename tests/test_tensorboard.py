"""TensorBoard logging, checked by reading the event files back with TensorBoard's own reader."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra has it

from pbt_rl.config import dump_yaml
from pbt_rl.runtime import resume, train
from pbt_rl.runtime.file_io import rewrite_jsonl
from pbt_rl.runtime.store import RunStore
from pbt_rl.tensorboard_logger import TensorBoardPopulationLogger
from runtime_support import fake_config, run_files, start_controller, threaded_backend

TB = {"report": False, "console_interval_seconds": 0.5, "tensorboard": True}


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every curve of one writer directory: tag -> [(step, value)], as TensorBoard shows it."""
    reader = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # keep every point
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def approx(points):
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in points]


def expected_member_curves(rows, search_space) -> dict[str, list[tuple[int, float]]]:
    """What a member's metrics.jsonl rows say its curves are (names of docs/ecosystem.md)."""
    curves: dict[str, list] = {}

    def add(tag, step, value):
        curves.setdefault(tag, []).append((step, float(value)))

    for row in rows:
        if row.episode_returns:
            add("charts/episodic_return", row.env_steps, statistics.fmean(row.episode_returns))
            add("charts/episodic_length", row.env_steps, statistics.fmean(row.episode_lengths))
        if row.env_steps_per_second is not None and math.isfinite(row.env_steps_per_second):
            add("charts/SPS", row.env_steps, row.env_steps_per_second)
        if row.fitness is not None:
            add("charts/fitness", row.env_steps, row.fitness)
        for name, value in row.losses.items():
            add(f"losses/{name}", row.env_steps, value)
        for name in search_space:
            add(f"hp/{name}", row.env_steps, row.hyperparameters[name])
        add("pbt/generation", row.env_steps, row.generation)
    return curves


def test_a_run_writes_one_event_stream_per_member_and_one_for_the_population(tmp_path):
    config = fake_config(tmp_path / "run", logging=TB)
    summary = train(config, console=False, backend=threaded_backend())
    store = RunStore(config.run_dir)
    lineage = store.read_lineage()
    assert summary["status"] == "finished" and lineage, "the run needs exploits to show a schedule"
    root = store.tensorboard_dir
    assert sorted(p.name for p in root.iterdir()) == ["member_0", "member_1", "member_2", "member_3", "population"]

    final = {}
    for member in range(4):
        rows = store.read_metrics(member)
        curves = scalars(root / f"member_{member}")
        expected = expected_member_curves(rows, ("lr",))
        assert sorted(curves) == sorted(expected)
        assert {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/total_loss",
                "hp/lr"} <= set(curves)
        for tag, points in expected.items():
            assert curves[tag] == approx(points), tag
        final[member] = rows[-1]
        # The schedule: after each exploit the member's next point shows its new lr.
        for row in (r for r in lineage if r.member == member):
            after = next(value for step, value in curves["hp/lr"] if step > row.env_steps)
            assert after == pytest.approx(row.new_hyperparameters["lr"], rel=1e-6)

    population = scalars(root / "population")
    assert set(population) == {"pbt/best_fitness", "pbt/median_fitness", "pbt/exploits"}
    steps = [step for step, _ in population["pbt/exploits"]]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert steps[-1] == sum(row.env_steps for row in final.values())  # the population's env steps
    exploits = [value for _, value in population["pbt/exploits"]]
    assert exploits == sorted(exploits) and exploits[-1] == len(lineage)
    scores = [row.fitness for row in final.values() if row.fitness is not None]
    assert population["pbt/best_fitness"][-1][1] == pytest.approx(max(scores), rel=1e-6)
    assert population["pbt/median_fitness"][-1][1] == pytest.approx(statistics.median(scores), rel=1e-6)


def _row(member: int, steps: int, lr: float, value: float) -> dict:
    return {"member": member, "env_steps": steps, "updates": steps // 10, "fitness": value,
            "episode_returns": [value, value + 2.0], "episode_lengths": [10, 12], "losses": {"total_loss": value / 100},
            "env_steps_per_second": 1000.0 + steps, "hyperparameters": {"lr": lr}, "generation": 0}


@pytest.fixture
def run_dir(tmp_path):
    """A two-member run directory with tensorboard on (what train creates before any member runs)."""
    config = fake_config(tmp_path / "run", logging=TB, pbt={"population_size": 2})
    store = RunStore(config.run_dir)
    for member in (0, 1):
        store.member_dir(member).mkdir(parents=True)
    store.config_path.write_text(dump_yaml(config))
    population = {"members": {str(m): {"seed": m, "hyperparameters": {"lr": 0.01}} for m in (0, 1)},
                  "search_space": ["lr"]}
    return config, store, population


def _log(logger, store, rows) -> None:
    for row in rows:  # as the controller does: the metrics row first, then the loggers
        store.append(store.metrics_path(row["member"]), row)
        logger.log_progress(row)


def _raw_rows(store, member):
    return [json.loads(line) for line in store.metrics_path(member).read_text().splitlines()]


@pytest.mark.parametrize("saved_after_steps", [300, 100, None],
                         ids=["state-saved-at-restore-point", "state-saved-earlier", "no-saved-state"])
def test_resume_continues_each_curve_without_duplicate_or_stale_steps(run_dir, saved_after_steps):
    config, store, population = run_dir
    first = TensorBoardPopulationLogger(config, store.root)
    first.start(population)
    state = None
    for steps in (100, 200, 300, 400, 500):
        _log(first, store, [_row(0, steps, 0.01, steps / 10), _row(1, steps, 0.02, steps / 20)])
        if steps == saved_after_steps:
            state = json.loads(json.dumps(first.state_dict()))  # state.json at that moment
    first.close()  # the worst case: the stale points past the restore point are all on disk

    # The stop: both members restore from their checkpoint at 300; resume drops the rows after it.
    for member in (0, 1):
        rewrite_jsonl(store.metrics_path(member), [r for r in _raw_rows(store, member) if r["env_steps"] <= 300])
    second = TensorBoardPopulationLogger(config, store.root)
    if state is not None:
        second.load_state_dict(state)
    second.start(population)
    for steps in (350, 450):  # new values: the restored members are not the ones that were lost
        _log(second, store, [_row(0, steps, 0.012, -steps), _row(1, steps, 0.024, -steps / 2)])
    second.close()

    root = store.tensorboard_dir
    for member in (0, 1):
        curves = scalars(root / f"member_{member}")
        expected = expected_member_curves(store.read_metrics(member), ("lr",))
        assert [step for step, _ in curves["charts/episodic_return"]] == [100, 200, 300, 350, 450]
        for tag, points in expected.items():
            assert curves[tag] == approx(points), (member, tag)
    population_steps = [step for step, _ in scalars(root / "population")["pbt/exploits"]]
    # The population's env steps (the sum over members) at each report; past 600 the first session's were stale.
    assert population_steps == [100, 200, 300, 400, 500, 600, 650, 700, 800, 900]


def test_a_member_restarted_during_a_run_starts_its_curve_again_from_its_checkpoint(run_dir):
    config, store, population = run_dir
    logger = TensorBoardPopulationLogger(config, store.root)
    logger.start(population)
    for steps in (100, 200, 300):
        _log(logger, store, [_row(0, steps, 0.01, 1.0)])
    _log(logger, store, [_row(0, 250, 0.01, 2.0), _row(0, 350, 0.01, 3.0)])  # restarted from 200
    logger.close()
    returns = scalars(store.tensorboard_dir / "member_0")["charts/episodic_return"]
    assert returns == approx([(100, 2.0), (200, 2.0), (250, 3.0), (350, 4.0)])


BLOCKED_TENSORBOARD = """
import sys
sys.modules["tensorboard"] = None  # as if it were not installed
from pbt_rl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_tensorboard_on_but_not_installed_is_one_line_and_nothing_is_written(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-c", BLOCKED_TENSORBOARD, *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PBT_RL_DEBUG": ""})

    config = fake_config(tmp_path / "run", logging=TB)
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(dump_yaml(config))
    result = cli("train", str(config_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "logging.tensorboard" in lines[0] and "pip install" in lines[0]
    assert not config.run_dir.exists()

    train(config, console=False, backend=threaded_backend())  # a run made where TensorBoard was installed
    before = run_files(config.run_dir)
    result = cli("resume", str(config.run_dir))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "logging.tensorboard" in result.stderr
    assert run_files(config.run_dir) == before


KILL_AFTER_METRICS_ROWS = """
import os, signal
from pbt_rl.runtime.store import RunStore
_append, _rows = RunStore.append, [0]
def _append_then_maybe_die(self, path, row):
    _append(self, path, row)
    if path.name == "metrics.jsonl":
        _rows[0] += 1
        if _rows[0] == 12:  # the row is on disk; the loggers never see it
            os.kill(os.getpid(), signal.SIGKILL)
RunStore.append = _append_then_maybe_die
"""


def test_resume_after_a_kill_gives_the_curves_of_the_run_files(tmp_path):
    config = fake_config(tmp_path / "run", logging=TB, pbt={"population_size": 2, "truncation_fraction": 0.5})
    process = start_controller(tmp_path, config, prelude=KILL_AFTER_METRICS_ROWS)
    assert process.wait(timeout=300) == -9
    summary = resume(config.run_dir, console=False, backend=threaded_backend())
    assert summary["status"] == "finished"
    store = RunStore(config.run_dir)
    for member in (0, 1):
        rows = store.read_metrics(member)
        assert all(a.env_steps < b.env_steps for a, b in zip(rows, rows[1:]))
        curves = scalars(store.tensorboard_dir / f"member_{member}")
        for tag, points in expected_member_curves(rows, ("lr",)).items():
            assert curves[tag] == approx(points), (member, tag)
    population = scalars(store.tensorboard_dir / "population")["pbt/exploits"]
    steps = [step for step, _ in population]
    assert all(a < b for a, b in zip(steps, steps[1:])) and population[-1][1] == len(store.read_lineage())
