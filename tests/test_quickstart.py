"""The shipped configs load, and the quickstart does what the README promises."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from pbt_rl.config import load_config
from pbt_rl.runtime import train
from pbt_rl.runtime.store import read_jsonl

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS = CONFIGS / "experiments"  # experiment specs (pbt-rl experiment), not configs
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if EXPERIMENTS not in p.parents)
ALL_SPECS = sorted(EXPERIMENTS.glob("*.yaml"))


def test_every_shipped_config_loads():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_CONFIGS}
    for game in ("pong", "breakout", "space_invaders", "seaquest", "beam_rider"):
        assert {f"atari/{game}_a2c.yaml", f"atari/{game}_impala.yaml"} <= names
    for env in ("half_cheetah", "hopper", "walker2d", "ant"):
        assert f"mujoco/{env}.yaml" in names
    for path in ALL_CONFIGS:
        config = load_config(path)
        assert config.pbt.population_size >= 2 and config.pbt.search_space, path
        assert config.pbt.ready_after_steps < config.run.total_env_steps, path
        expected_algo = "impala" if path.stem.endswith("_impala") else "a2c"
        assert config.agent.algo == expected_algo, path


def test_every_shipped_experiment_spec_loads_with_three_seeds_and_the_baselines():
    from pbt_rl.experiment.spec import load_spec

    names = {p.stem for p in ALL_SPECS}
    assert {"cartpole_arms", "pong_arms", "breakout_arms", "half_cheetah_arms", "hopper_arms"} <= names
    for path in ALL_SPECS:
        spec = load_spec(path)
        assert len(spec.seeds) >= 3 and {"pbt", "random_search", "pb2"} <= set(spec.arms), path


@pytest.mark.slow
def test_quickstart_solves_cartpole_with_exploits_within_five_minutes(tmp_path):
    config = load_config(CONFIGS / "quickstart.yaml")
    # Generations make the run bit-reproducible, so this test does not depend on which member
    # the machine's scheduling makes ready first (async PBT once scored 456 under a full suite).
    assert config.pbt.mode == "sync"
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(tmp_path / "run")),
                                 logging=dataclasses.replace(config.logging, report=False))
    start = time.monotonic()
    summary = train(config, console=False)
    seconds = time.monotonic() - start
    # The three promises, for the config as shipped (seed 0): within 5 minutes of wall
    # time, a best member whose fitness (mean of its last pbt.fitness_window returns) is >= 475,
    # and at least one exploit recorded in lineage.jsonl.
    assert summary["finished"], summary
    assert seconds <= 300, f"took {seconds:.0f} s"
    assert summary["best_score"] is not None and summary["best_score"] >= 475, summary
    lineage = read_jsonl(tmp_path / "run" / "lineage.jsonl")
    assert len(lineage) >= 1 and summary["exploits"] == len(lineage), summary
