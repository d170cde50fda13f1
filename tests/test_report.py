"""Report plots and the ancestry schedule, on synthetic run directories in the documented formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pbt_rl.config import ConfigError, dump_yaml, from_dict
from pbt_rl.lineage import (
    ancestry,
    best_fitness_over_time,
    best_member,
    first_time_reaching,
    member_env_steps,
    resolve_member,
    schedule_of,
)
from pbt_rl.report import time_table_interval, write_report
from pbt_rl.runtime.store import load_run

SEARCH_SPACE = {
    "lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-1},
    "entropy_cost": {"kind": "log_uniform", "low": 1e-3, "high": 1.0},
}
INITIAL = {
    0: {"lr": 0.01, "entropy_cost": 0.1},
    1: {"lr": 0.02, "entropy_cost": 0.2},
    2: {"lr": 0.03, "entropy_cost": 0.3},
}
# Exploits (member, env_steps, donor, donor_env_steps, new hyperparameters). Member 1 copies member 2
# at 180 of member 2's steps (async PBT: the donor's clock differs), member 2 having copied member 0 at 100.
EXPLOITS = [
    (2, 100, 0, 100, {"lr": 0.012, "entropy_cost": 0.1}),
    (1, 200, 2, 180, {"lr": 0.0144, "entropy_cost": 0.08}),
    (0, 250, 1, 240, {"lr": 0.0173, "entropy_cost": 0.064}),
]
FINAL_FITNESS = {0: 15.0, 1: 40.0, 2: 22.0}


def experiment_dict(run_dir: Path, **sections) -> dict:
    raw = {
        "env": {"id": "CartPole-v1", "num_envs": 2},
        "agent": {"algo": "a2c", "hidden_sizes": [16], "unroll_length": 5, "device": "cpu"},
        "pbt": {"population_size": 3, "ready_after_steps": 50, "search_space": SEARCH_SPACE},
        "run": {"name": "synthetic", "dir": str(run_dir), "total_env_steps": 300, "seed": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def write_synthetic_run(
    run_dir: Path,
    exploits=EXPLOITS,
    end_steps: int = 300,
    finished: bool = True,
    config_sections: dict | None = None,
    initial=INITIAL,
) -> Path:
    """A run directory as the runtime writes it: config, population, lineage, metrics, summary."""
    config = from_dict(experiment_dict(run_dir, **(config_sections or {})))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    population = {
        "members": {str(m): {"seed": 100 + m, "hyperparameters": hp} for m, hp in initial.items()},
        "search_space": sorted(SEARCH_SPACE),
        "created": 1.0e9,
    }
    (run_dir / "population.json").write_text(json.dumps(population))
    generation = {m: 0 for m in initial}
    current = {m: dict(hp) for m, hp in initial.items()}
    with open(run_dir / "lineage.jsonl", "w") as lineage:
        for member, step, donor, donor_step, new, *owner in exploits:
            if step > end_steps:
                continue
            generation[member] += 1
            owner = owner[0] if owner else donor  # who saved the donor checkpoint
            lineage.write(json.dumps({
                "time": 1.0e9 + step, "wall_seconds": float(step), "member": member, "env_steps": step,
                "generation": generation[member], "donor": donor,
                "donor_checkpoint": f"members/{owner}/checkpoints/{donor_step:012d}.pt",
                "donor_env_steps": donor_step, "old_hyperparameters": current[member],
                "new_hyperparameters": new, "operations": {k: "*1.2" for k in new},
                "member_score": 1.0, "donor_score": 2.0, "exploit": "truncation",
            }) + "\n")
            current[member] = dict(new)
    for member in initial:
        folder = run_dir / "members" / str(member)
        folder.mkdir(parents=True, exist_ok=True)
        hp = dict(initial[member])
        with open(folder / "metrics.jsonl", "w") as metrics:
            for step in range(50, end_steps + 1, 50):
                for m, s, _d, _ds, new, *_owner in exploits:
                    if m == member and s < step:
                        hp = dict(new)
                fitness = FINAL_FITNESS[member] * step / 300
                metrics.write(json.dumps({
                    "time": 1.0e9 + step, "wall_seconds": float(step), "member": member, "env_steps": step,
                    "updates": step // 10, "fitness": None if step == 50 else fitness,
                    "episode_returns": [fitness - 1, fitness + 1], "episode_lengths": [20, 22],
                    "losses": {"policy_loss": 0.1, "value_loss": 0.3, "entropy": 0.6, "total_loss": 0.2},
                    "env_steps_per_second": 1000.0, "hyperparameters": hp,
                }) + "\n")
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({
            "best_member": max(FINAL_FITNESS, key=FINAL_FITNESS.get),
            "best_score": max(FINAL_FITNESS.values()),
            "scores": {str(m): f for m, f in FINAL_FITNESS.items()},
        }))
    return run_dir


def test_schedule_follows_ancestry_across_two_exploits(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run"))
    # Member 1's final weights: member 0 from 0 to 100 (initial values), then member 2 from its
    # step 100 to 180 (exploit A's values), then member 1 from its step 200 to 300 (exploit B's).
    assert schedule_of(run, 1) == [
        (0, {"lr": 0.01, "entropy_cost": 0.1}),
        (100, {"lr": 0.012, "entropy_cost": 0.1}),
        (180, {"lr": 0.0144, "entropy_cost": 0.08}),
    ]
    segments = ancestry(run, 1)
    assert [(s.member, s.start, s.end, s.timeline_start) for s in segments] == [
        (0, 0, 100, 0), (2, 100, 180, 100), (1, 200, 300, 180),
    ]
    # Member 0 copied member 1 at 240 of member 1's steps: three exploits deep, 280 + 50 steps long.
    assert schedule_of(run, 0) == [
        (0, {"lr": 0.01, "entropy_cost": 0.1}),
        (100, {"lr": 0.012, "entropy_cost": 0.1}),
        (180, {"lr": 0.0144, "entropy_cost": 0.08}),
        (220, {"lr": 0.0173, "entropy_cost": 0.064}),
    ]
    assert schedule_of(run, "best") == schedule_of(run, 1)


def test_donor_checkpoint_predates_the_donors_own_exploit_at_that_step(tmp_path):
    # Member 2 is exploited at 100 and, at the same step, is the donor (checkpoint 100) for member 1:
    # that checkpoint holds member 2's weights from before its exploit.
    exploits = [(2, 100, 0, 100, {"lr": 0.05, "entropy_cost": 0.5}), (1, 150, 2, 100, {"lr": 0.06, "entropy_cost": 0.6})]
    run = load_run(write_synthetic_run(tmp_path / "run", exploits=exploits))
    assert schedule_of(run, 1) == [(0, INITIAL[2]), (100, {"lr": 0.06, "entropy_cost": 0.6})]


def test_ancestry_follows_the_saver_of_the_copied_checkpoint(tmp_path):
    # Member 2 copied member 0's checkpoint at 100 (its own step 120) and saved none of its own
    # before member 1 copied it at 200: member 1 got member 0's weights at member 0's step 100.
    exploits = [(2, 120, 0, 100, {"lr": 0.05, "entropy_cost": 0.5}),
                (1, 200, 2, 100, {"lr": 0.06, "entropy_cost": 0.6}, 0)]
    run = load_run(write_synthetic_run(tmp_path / "run", exploits=exploits))
    segments = ancestry(run, 1)
    assert [(s.member, s.start, s.end) for s in segments] == [(0, 0, 100), (1, 200, 300)]
    assert schedule_of(run, 1) == [(0, INITIAL[0]), (100, {"lr": 0.06, "entropy_cost": 0.6})]


def test_schedule_without_exploits_is_the_initial_values(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", exploits=[]))
    for member, hp in INITIAL.items():
        assert schedule_of(run, member) == [(0, hp)]


def test_best_member_and_member_errors(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", finished=False)
    assert best_member(load_run(run_dir)) == 1  # from metrics when summary.json is not written yet
    with pytest.raises(ConfigError, match="member 7 is not in this run"):
        resolve_member(load_run(run_dir), 7)
    with pytest.raises(ConfigError, match="run directory not found"):
        load_run(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_run(tmp_path)


def test_best_member_is_summary_jsons_choice_else_the_same_rule_over_last_fitness(tmp_path):
    # Before summary.json: the rule summary.json uses (highest finite score, lowest id on ties)
    # over each member's last fitness, whatever fitness it had earlier.
    run_dir = write_timed_metrics(write_synthetic_run(tmp_path / "run", finished=False), {
        0: [(10.0, 100, 50.0), (20.0, 200, 7.0)], 1: [(10.0, 100, 8.0)], 2: [(10.0, 100, 8.0)],
    })
    assert best_member(load_run(run_dir)) == 1
    # Once written, summary.json's best member is the answer (it may know scores the logs do not).
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "best_member": 2}))
    assert best_member(load_run(run_dir)) == 2 and resolve_member(load_run(run_dir), "best") == 2
    # A failed run's summary has no best member: the rule over the logs again; none without fitness.
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "best_member": None}))
    assert best_member(load_run(run_dir)) == 1
    write_timed_metrics(run_dir, {0: [(10.0, 100, None)], 1: [], 2: []})
    assert best_member(load_run(run_dir)) is None
    with pytest.raises(ConfigError, match="no member has a fitness yet"):
        resolve_member(load_run(run_dir), "best")


def _assert_png(path: Path) -> None:
    from matplotlib import image

    assert path.is_file(), path
    assert path.stat().st_size > 5_000, path
    height, width = image.imread(path).shape[:2]
    assert width > 300 and height > 300, (path, width, height)


def test_report_writes_plots_and_summary(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    out = write_report(run_dir)
    assert out == run_dir / "report"
    for name in ("lineage.png", "hp_lr.png", "hp_entropy_cost.png", "returns.png"):
        _assert_png(out / name)
    summary = (out / "summary.md").read_text()
    assert "member: 1" in summary and "fitness: 40" in summary
    assert "member 1 [200, 300) <- member 2 [100, 180) <- member 0 [0, 100)" in summary
    # The schedule table: one row per ancestry segment, in ancestry env steps.
    assert "| from env step | to env step | member | lr | entropy_cost |" in summary
    assert "| 100 | 180 | 2 | 0.012 | 0.1 |" in summary


def test_report_on_a_run_in_progress_without_exploits(tmp_path):
    # Two progress rows per member (50 and 100 env steps, at 50 s and 100 s), no summary.json, and
    # the controller in the middle of appending member 2's next row.
    run_dir = write_synthetic_run(tmp_path / "run", exploits=[], end_steps=100, finished=False)
    with open(run_dir / "members" / "2" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"time": 1000000150.0, "wall_seconds": 150.0, "member": 2, "env_steps": 15')
    out = write_report(run_dir)
    for name in ("lineage.png", "hp_lr.png", "hp_entropy_cost.png", "returns.png"):
        _assert_png(out / name)
    summary = (out / "summary.md").read_text()
    assert "- status: in progress (no summary.json yet)" in summary
    assert "- members: 3, exploits: 0" in summary
    # The best member is the one with the best last fitness (member 1: 40 * 100 / 300), on its own
    # initial values since step 0.
    assert "## Best member\n\n- member: 1\n- fitness: 13.33 " in summary
    assert "- env steps: 100\n" in summary and "(ancestry): 100\n" in summary
    assert "\nmember 1 [0, 100)\n" in summary
    assert "| 0 | 100 | 1 | 0.02 | 0.2 |" in summary
    # Everything covers the steps so far and no further: the torn row (150 s) is left out.
    run = load_run(run_dir)
    assert [member_env_steps(run, m) for m in run.members] == [100, 100, 100]
    assert "| 0 | 100 | 5 | 0 |\n| 1 | 100 | 13.33 | 0 |\n| 2 | 100 | 7.333 | 0 |" in summary
    table = summary.split("## Best fitness over wall time")[1].split("## Members")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| wall")]
    assert rows == ["| 1:00 | - | - | - |", "| 1:40 | 13.33 | 1 | 100 |"]


# Progress rows (wall_seconds, env_steps, fitness) per member, for the wall-time table. Member 0 peaks
# at 130 s and falls back; member 1 has no fitness until 100 s; member 2's fitness goes null after an
# exploit at 110 s (its fitness restarts), so from then on it does not count.
TIMED_ROWS = {
    0: [(10.0, 100, None), (50.0, 500, 5.0), (130.0, 1300, 30.0), (200.0, 2000, 8.0)],
    1: [(30.0, 300, None), (100.0, 1000, 12.0), (190.0, 1900, 20.0)],
    2: [(40.0, 400, 50.0), (110.0, 1100, None)],
}


def write_timed_metrics(run_dir: Path, timed_rows: dict = TIMED_ROWS) -> Path:
    """Replace the synthetic run's metrics.jsonl files with rows at the given wall times."""
    for member, rows in timed_rows.items():
        with open(run_dir / "members" / str(member) / "metrics.jsonl", "w") as metrics:
            for wall, steps, fitness in rows:
                metrics.write(json.dumps({
                    "time": 1.0e9 + wall, "wall_seconds": wall, "member": member, "env_steps": steps,
                    "updates": steps // 10, "fitness": fitness, "episode_returns": [1.0], "episode_lengths": [20],
                    "losses": {}, "env_steps_per_second": 1000.0, "hyperparameters": INITIAL[member],
                }) + "\n")
    return run_dir


def test_best_fitness_over_time_takes_each_members_latest_row(tmp_path):
    run = load_run(write_timed_metrics(write_synthetic_run(tmp_path / "run")))
    table = best_fitness_over_time(run, every_seconds=60.0)
    assert table == [
        # 60 s: member 2's 50 (40 s) beats member 0's 5 (50 s); member 1 has no fitness yet.
        {"wall_seconds": 60.0, "best_fitness": 50.0, "member": 2, "env_steps": 400},
        # 120 s: member 2's latest row is null, member 0's 30 (130 s) is still in the future.
        {"wall_seconds": 120.0, "best_fitness": 12.0, "member": 1, "env_steps": 1000},
        {"wall_seconds": 180.0, "best_fitness": 30.0, "member": 0, "env_steps": 1300},
        # The final partial entry at the last row's time: member 0 fell back to 8, not its best ever 30.
        {"wall_seconds": 200.0, "best_fitness": 20.0, "member": 1, "env_steps": 1900},
    ]
    # Before any member has a fitness the entry is empty; an exact multiple gets no extra entry.
    table = best_fitness_over_time(run, every_seconds=20.0)
    assert table[0] == {"wall_seconds": 20.0, "best_fitness": None, "member": None, "env_steps": None}
    assert [entry["wall_seconds"] for entry in table] == [20.0 * k for k in range(1, 11)]
    assert table[2] == {"wall_seconds": 60.0, "best_fitness": 50.0, "member": 2, "env_steps": 400}
    with pytest.raises(ValueError, match="every_seconds"):
        best_fitness_over_time(run, every_seconds=0.0)


def test_best_fitness_over_time_ties_and_empty_runs(tmp_path):
    run = load_run(write_timed_metrics(write_synthetic_run(tmp_path / "run"), {
        0: [(30.0, 300, 7.0)], 1: [(20.0, 200, 7.0)], 2: [],
    }))
    assert best_fitness_over_time(run, every_seconds=60.0) == [
        {"wall_seconds": 30.0, "best_fitness": 7.0, "member": 0, "env_steps": 300},  # tie: lowest member id
    ]
    empty = load_run(write_timed_metrics(write_synthetic_run(tmp_path / "empty"), {0: [], 1: [], 2: []}))
    assert best_fitness_over_time(empty) == []
    assert first_time_reaching(empty, 0.0) is None


def test_first_time_reaching_is_the_earliest_crossing_over_members(tmp_path):
    run = load_run(write_timed_metrics(write_synthetic_run(tmp_path / "run")))
    # Member 2's 50 at 40 s comes before member 0's 5 at 50 s and member 1's 12 at 100 s.
    assert first_time_reaching(run, 10.0) == {"wall_seconds": 40.0, "member": 2, "env_steps": 400, "fitness": 50.0}
    assert first_time_reaching(run, 5.0) == {"wall_seconds": 40.0, "member": 2, "env_steps": 400, "fitness": 50.0}
    assert first_time_reaching(run, 20.0) == {"wall_seconds": 40.0, "member": 2, "env_steps": 400, "fitness": 50.0}
    assert first_time_reaching(run, 51.0) is None
    # Without member 2: member 1's 12 at 100 s is earlier than member 0's 30 at 130 s.
    rows = {m: r for m, r in TIMED_ROWS.items() if m != 2} | {2: []}
    run = load_run(write_timed_metrics(write_synthetic_run(tmp_path / "run2"), rows))
    assert first_time_reaching(run, 10.0) == {"wall_seconds": 100.0, "member": 1, "env_steps": 1000, "fitness": 12.0}
    assert first_time_reaching(run, 25.0) == {"wall_seconds": 130.0, "member": 0, "env_steps": 1300, "fitness": 30.0}
    assert first_time_reaching(run, 5.0) == {"wall_seconds": 50.0, "member": 0, "env_steps": 500, "fitness": 5.0}


def test_time_table_interval_keeps_the_table_short():
    assert time_table_interval(200.0) == 60.0
    assert time_table_interval(1800.0) == 60.0  # exactly 30 rows
    assert time_table_interval(1801.0) == 300.0
    assert time_table_interval(4 * 3600.0) == 600.0
    assert time_table_interval(10 * 3600.0) == 1800.0
    assert time_table_interval(40 * 3600.0) == 7200.0
    assert time_table_interval(100 * 86400.0) == 4 * 86400.0


def test_report_summary_has_best_fitness_over_wall_time(tmp_path):
    run_dir = write_timed_metrics(write_synthetic_run(tmp_path / "run"))
    summary = (write_report(run_dir) / "summary.md").read_text()
    section = "## Best fitness over wall time"
    assert section in summary
    assert summary.index("## Ancestry") < summary.index(section) < summary.index("## Members")
    assert "| wall time (min:s) | best fitness | member | env steps of that member |" in summary
    assert "| 1:00 | 50 | 2 | 400 |" in summary
    assert "| 2:00 | 12 | 1 | 1000 |" in summary
    assert "| 3:00 | 30 | 0 | 1300 |" in summary
    assert "| 3:20 | 20 | 1 | 1900 |" in summary
    # The standard synthetic run: rows every 50 s, nobody has a fitness at 50 s, last row at 300 s.
    summary = (write_report(write_synthetic_run(tmp_path / "plain")) / "summary.md").read_text()
    assert "| 1:00 | - | - | - |" in summary  # every member's latest row (50 s) has a null fitness
    assert "| 2:00 | 13.33 | 1 | 100 |" in summary
    assert "| 5:00 | 40 | 1 | 300 |" in summary
    assert "| 5:50" not in summary and summary.count("| 5:00 |") == 1  # 300 s is a multiple: no extra entry


def test_report_summary_wall_time_table_stays_short_and_is_skipped_without_rows(tmp_path):
    long_rows = {m: [(600.0 * k, 1000 * k, float(k + m)) for k in range(1, 61)] for m in INITIAL}  # 10 hours
    run_dir = write_timed_metrics(write_synthetic_run(tmp_path / "long"), long_rows)
    summary = (write_report(run_dir) / "summary.md").read_text()
    table = summary.split("## Best fitness over wall time")[1].split("## Members")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| wall")]
    assert len(rows) == 20  # every 30 minutes over 10 hours
    assert rows[0] == "| 30:00 | 5 | 2 | 3000 |"
    assert rows[-1] == "| 600:00 | 62 | 2 | 60000 |"
    empty = write_timed_metrics(write_synthetic_run(tmp_path / "empty", finished=False), {0: [], 1: [], 2: []})
    summary = (write_report(empty) / "summary.md").read_text()
    assert "## Best fitness over wall time" not in summary and "## Members" in summary
