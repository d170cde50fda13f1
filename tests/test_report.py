"""Report plots and the ancestry schedule, on synthetic run directories in the documented formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pbt_rl.config import ConfigError, dump_yaml, from_dict
from pbt_rl.report import ancestry, best_member, load_run, resolve_member, schedule_of, write_report

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
        for member, step, donor, donor_step, new in exploits:
            if step > end_steps:
                continue
            generation[member] += 1
            lineage.write(json.dumps({
                "time": 1.0e9 + step, "wall_seconds": float(step), "member": member, "env_steps": step,
                "generation": generation[member], "donor": donor,
                "donor_checkpoint": f"members/{donor}/checkpoints/{donor_step:012d}.pt",
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
                for m, s, _d, _ds, new in exploits:
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
    run_dir = write_synthetic_run(tmp_path / "run")
    # Member 1's final weights: member 0 from 0 to 100 (initial values), then member 2 from its
    # step 100 to 180 (exploit A's values), then member 1 from its step 200 to 300 (exploit B's).
    assert schedule_of(run_dir, 1) == [
        (0, {"lr": 0.01, "entropy_cost": 0.1}),
        (100, {"lr": 0.012, "entropy_cost": 0.1}),
        (180, {"lr": 0.0144, "entropy_cost": 0.08}),
    ]
    segments = ancestry(load_run(run_dir), 1)
    assert [(s.member, s.start, s.end, s.timeline_start) for s in segments] == [
        (0, 0, 100, 0), (2, 100, 180, 100), (1, 200, 300, 180),
    ]
    # Member 0 copied member 1 at 240 of member 1's steps: three exploits deep, 280 + 50 steps long.
    assert schedule_of(run_dir, 0) == [
        (0, {"lr": 0.01, "entropy_cost": 0.1}),
        (100, {"lr": 0.012, "entropy_cost": 0.1}),
        (180, {"lr": 0.0144, "entropy_cost": 0.08}),
        (220, {"lr": 0.0173, "entropy_cost": 0.064}),
    ]
    assert schedule_of(run_dir, "best") == schedule_of(run_dir, 1)


def test_donor_checkpoint_predates_the_donors_own_exploit_at_that_step(tmp_path):
    # Member 2 is exploited at 100 and, at the same step, is the donor (checkpoint 100) for member 1:
    # that checkpoint holds member 2's weights from before its exploit.
    exploits = [(2, 100, 0, 100, {"lr": 0.05, "entropy_cost": 0.5}), (1, 150, 2, 100, {"lr": 0.06, "entropy_cost": 0.6})]
    run_dir = write_synthetic_run(tmp_path / "run", exploits=exploits)
    assert schedule_of(run_dir, 1) == [(0, INITIAL[2]), (100, {"lr": 0.06, "entropy_cost": 0.6})]


def test_schedule_without_exploits_is_the_initial_values(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", exploits=[])
    for member, hp in INITIAL.items():
        assert schedule_of(run_dir, member) == [(0, hp)]


def test_best_member_and_member_errors(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", finished=False)
    assert best_member(run_dir) == 1  # from metrics when summary.json is not written yet
    with pytest.raises(ConfigError, match="member 7 is not in this run"):
        resolve_member(run_dir, 7)
    with pytest.raises(ConfigError, match="run directory not found"):
        load_run(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_run(tmp_path)


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
    run_dir = write_synthetic_run(tmp_path / "run", exploits=[], end_steps=100, finished=False)
    out = write_report(run_dir)
    for name in ("lineage.png", "hp_lr.png", "returns.png"):
        _assert_png(out / name)
    assert "in progress" in (out / "summary.md").read_text()
