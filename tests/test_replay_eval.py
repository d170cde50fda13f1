"""Replay follows the lineage's schedule; eval of a saved checkpoint is deterministic for a seed."""

from __future__ import annotations

import json

import imageio.v2 as imageio
import pytest

from pbt_rl.agents import make_learner
from pbt_rl.config import ConfigError
from pbt_rl.evaluate import evaluate
from pbt_rl.lineage import schedule_of
from pbt_rl.replay import replay
from pbt_rl.runtime.store import RunStore, load_run
from runtime_support import wait_until
from test_report import write_synthetic_run


class RecordingLearner:
    """A real learner that records every set_hyperparameters call with the env step it came at."""

    def __init__(self, learner, calls: list):
        self._learner, self._calls = learner, calls

    def set_hyperparameters(self, values):
        self._calls.append((self._learner.env_steps, dict(values)))
        self._learner.set_hyperparameters(values)

    def __getattr__(self, name):
        return getattr(self._learner, name)


def test_replay_follows_the_ancestry_schedule(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    calls: list = []
    seeds: list = []

    def factory(config, seed, device=None, num_threads=0):
        seeds.append(seed)
        return RecordingLearner(make_learner(config, seed, device="cpu", num_threads=1), calls)

    summary = replay(run_dir, member="best", console=False, learner_factory=factory)

    expected = schedule_of(load_run(run_dir), 1)  # (0, ...), (100, ...), (180, ...) across two exploits
    assert len(expected) == 3
    # 2 envs x unroll 5 = 10 env steps per update, so the switches land exactly on schedule.
    assert calls == expected
    assert [(s["scheduled_env_steps"], s["applied_env_steps"]) for s in summary["schedule"]] == [(0, 0), (100, 100), (180, 180)]
    assert summary["member"] == 1 and summary["env_steps"] >= 300 and summary["pbt_score"] == 40.0
    assert seeds == [summary["seed"]] and summary["seed"] not in load_run(run_dir).seeds.values()
    out = run_dir / "replay-1"
    assert json.loads((out / "replay.json").read_text())["schedule"] == summary["schedule"]
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert curve[-1]["env_steps"] == summary["env_steps"] and summary["episodes"] > 0
    assert (out / "returns.png").stat().st_size > 5_000


def _save_checkpoint(run_dir, member: int, env_steps: int) -> str:
    """Train a tiny learner from the run's config and save it the way member processes do."""
    config = RunStore(run_dir).read_config()
    learner = make_learner(config, seed=5, device="cpu", num_threads=1)
    learner.train(env_steps)
    checkpoint = RunStore(run_dir).save_checkpoint(member, env_steps, {"learner": learner.state_dict(), "member": {}})
    learner.close()
    return checkpoint


def test_eval_is_deterministic_for_a_seed_and_checks_checkpoints(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    _save_checkpoint(run_dir, 1, 200)
    first = evaluate(run_dir, member="best", episodes=3, seed=7, console=False)
    second = evaluate(run_dir, member=1, episodes=3, seed=7, console=False)
    assert first["checkpoint"] == "members/1/checkpoints/000000000200.pt"
    assert len(first["returns"]) == 3 and all(r > 0 for r in first["returns"])
    assert first["returns"] == second["returns"] and first["mean"] == second["mean"]

    # A newer checkpoint without its .sha256 (interrupted write) is skipped ...
    newer = run_dir / "members" / "1" / "checkpoints" / "000000000300.pt"
    newer.write_bytes(b"half a checkpoint")
    assert evaluate(run_dir, member=1, episodes=1, seed=7, console=False)["checkpoint_env_steps"] == 200
    # ... but a checksum mismatch is an error, as is a member without checkpoints.
    newer.with_name(newer.name + ".sha256").write_text("0" * 64 + "\n")
    with pytest.raises(ConfigError, match="corrupt"):
        evaluate(run_dir, member=1, episodes=1, console=False)
    with pytest.raises(ConfigError, match="member 0 has no checkpoint"):
        evaluate(run_dir, member=0, episodes=1, console=False)


def test_eval_writes_a_gif_of_one_episode(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    _save_checkpoint(run_dir, 2, 100)
    video = tmp_path / "episode.gif"
    result = evaluate(run_dir, member=2, episodes=1, seed=0, video=video, console=False)
    frames = imageio.mimread(video)
    assert result["lengths"][0] >= 8
    assert len(frames) >= 8 and frames[0].shape[0] >= 300 and frames[0].shape[1] >= 300


def test_report_replay_eval_and_wandb_on_a_real_population(tmp_path, monkeypatch):
    """A tiny real population (runtime + A2C on CartPole, W&B offline), then report, replay and eval."""
    from pbt_rl.config import from_dict
    from pbt_rl.runtime import train
    from wandb_records import find_log_files, read_records

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    run_dir = tmp_path / "run"
    config = from_dict({
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "agent": {"device": "cpu", "hidden_sizes": [32]},
        "pbt": {"population_size": 3, "ready_after_steps": 2000, "truncation_fraction": 0.34, "fitness_window": 5,
                "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2},
                                 "entropy_cost": {"kind": "log_uniform", "low": 1e-4, "high": 1e-1}}},
        "run": {"name": "tiny", "dir": str(run_dir), "total_env_steps": 8000, "checkpoint_keep": 100, "seed": 2},
        "logging": {"wandb": "offline", "report": True, "console_interval_seconds": 60},
    })
    summary = train(config, console=False)
    lineage = [json.loads(line) for line in (run_dir / "lineage.jsonl").read_text().splitlines()]
    assert summary["finished"] and lineage, "the population should have exploited at least once"

    # train wrote the report itself (logging.report); the schedule starts at the root's values.
    assert (run_dir / "report" / "lineage.png").stat().st_size > 5_000
    assert (run_dir / "report" / "hp_lr.png").is_file() and (run_dir / "report" / "summary.md").is_file()
    best = summary["best_member"]
    schedule = schedule_of(load_run(run_dir), "best")
    exploited = [row for row in lineage if row["member"] == best]
    if exploited:
        assert schedule[-1][1] == exploited[-1]["new_hyperparameters"]

    # W&B: one offline run per member; each exploit is in the child's run as history and an artifact.
    state = json.loads((run_dir / "state.json").read_text())
    run_ids = next(s for s in state["loggers"] if s)["run_ids"]
    for row in lineage:
        records = [r for f in find_log_files(run_dir / "wandb", run_ids[str(row["member"])]) for r in read_records(f)]
        models = [json.loads(r.artifact.metadata) for r in records
                  if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
        assert {"member": row["member"], "parent": row["donor"], "generation": row["generation"]}.items() <= next(
            m for m in models if m["generation"] == row["generation"]).items()

    calls: list = []

    def factory(config, seed, device=None, num_threads=0):
        return RecordingLearner(make_learner(config, seed, device="cpu", num_threads=1), calls)

    result = replay(run_dir, member="best", console=False, learner_factory=factory)
    assert [values for _, values in calls] == [values for _, values in schedule if _ < 8000]
    assert result["env_steps"] >= 8000 and result["pbt_score"] == summary["best_score"]

    first = evaluate(run_dir, member="best", episodes=2, seed=1, console=False)
    second = evaluate(run_dir, member="best", episodes=2, seed=1, console=False)
    assert first["returns"] == second["returns"] and first["checkpoint_env_steps"] == 8000

    # eval --video with W&B on: the video and the scores land in the member's own W&B run.
    logs_before = find_log_files(run_dir / "wandb", run_ids[str(best)])
    shown = evaluate(run_dir, member="best", episodes=1, seed=1, video=tmp_path / "best.gif", console=False)
    logs = find_log_files(run_dir / "wandb", run_ids[str(best)])
    assert len(logs) == len(logs_before) + 1
    new_log = next(f for f in logs if f not in logs_before)
    assert wait_until(lambda: any(r.WhichOneof("record_type") == "exit" for r in read_records(new_log)))
    items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for r in read_records(new_log)
             if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert items["eval/video/_type"] == "video-file" and items["eval/video/path"].endswith(".gif")
    assert (new_log.parent / "files" / items["eval/video/path"]).stat().st_size == items["eval/video/size"]
    assert items["eval/return_mean"] == shown["mean"] and items["env_steps"] == 8000
