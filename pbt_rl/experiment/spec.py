"""An experiment spec: a base config, arms (sets of overrides) and seeds; checked whole before anything is written.

Every arm x seed becomes one ordinary run at ``<dir>/<arm>/seed_<n>/``. The config of a run is
built in this order, later steps winning: the base config file, the spec's ``overrides``, the
command line's overrides, the arm's built-in overrides (:data:`BUILTIN_ARMS`), the arm's own
overrides, and last ``run.seed = n``, ``run.dir``, ``run.name``, ``logging.wandb_group`` (the experiment's
name) and ``logging.wandb_job_type`` (the arm), which the experiment owns (setting them
anywhere else is an error). The optional ``replay`` key adds the replay arm
(:class:`ReplayPlan`, :mod:`pbt_rl.experiment.replay_arm`). Format: docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbt_rl.config import ConfigError, ExperimentConfig, abbreviate, apply_overrides, from_dict, read_yaml
from pbt_rl.config.convert import close_matches

BUILTIN_ARMS: dict[str, dict[str, Any]] = {
    "pbt": {},  # the base config's own PBT settings
    "random_search": {"pbt.exploit": "none"},
    "pb2": {"pbt.explore": "pb2"},
    "hand_tuned": {"pbt.exploit": "none", "pbt.search": "none"},
}
"""Overrides of the built-in arms (an arm of that name may add its own)."""

KEYS = ("base", "name", "dir", "seeds", "overrides", "arms", "thresholds", "compare", "replay")
REPLAY_ARM = "replay"
OWNED = ("run.seed", "run.dir", "run.name", "logging.wandb_group", "logging.wandb_job_type")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RunPlan:
    """One arm x seed: where it lives and the config it trains with."""

    arm: str
    seed: int
    dir: Path
    config: ExperimentConfig

    @property
    def label(self) -> str:
        return f"{self.arm}/seed_{self.seed}"


@dataclass(frozen=True)
class ReplayPlan:
    """The replay arm: the best member of the best run of ``arm`` replayed on each of ``seeds``,
    into ``<dir>/replay/seed_<m>/`` (one member's budget per seed, not a population's)."""

    arm: str
    seeds: tuple[int, ...]
    root: Path

    def dir(self, seed: int) -> Path:
        return self.root / f"seed_{seed}"


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    path: Path
    dir: Path
    base: Path
    seeds: tuple[int, ...]
    arms: dict[str, dict[str, Any]]  # name -> its overrides (built-in ones first)
    thresholds: tuple[float, ...]
    compare: str
    runs: tuple[RunPlan, ...]
    replay: ReplayPlan | None = None

    def runs_of(self, arm: str) -> list[RunPlan]:
        return [r for r in self.runs if r.arm == arm]


def _overrides(raw: Any, where: str) -> dict[str, Any]:
    """A mapping ``section.key: value`` (or null); the keys the experiment owns are refused."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of section.key: value, got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str) or key.count(".") < 1:
            raise ConfigError(f"{where}: {key!r} is not a section.key (e.g. pbt.population_size)")
        if key in OWNED:
            raise ConfigError(f"{where}.{key}: set by the experiment for each run (seeds come from 'seeds')")
    return dict(raw)


def _as_strings(overrides: dict[str, Any]) -> list[str]:
    """``section.key=value`` texts with JSON values (JSON is YAML, so load.py reads them back)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def _seeds(raw: Any) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return tuple(range(raw))
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"seeds: expected a count >= 1 or a non-empty list of seeds, got {abbreviate(repr(raw))}")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in raw):
        raise ConfigError(f"seeds: every seed must be an integer >= 0, got {abbreviate(repr(raw))}")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"seeds: a seed is listed twice in {raw}")
    return tuple(raw)


def _thresholds(raw: Any) -> tuple[float, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in raw):
        raise ConfigError(f"thresholds: expected a list of scores, got {abbreviate(repr(raw))}")
    return tuple(float(t) for t in raw)


def load_spec(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Read and check a spec and build every run's config; ConfigError (one line) on the first problem."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(KEYS)}")
    for key in raw:
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}{close_matches(str(key), list(KEYS))}; keys: {', '.join(KEYS)}")
    for key in ("base", "seeds", "arms"):
        if key not in raw:
            raise ConfigError(f"{path}: '{key}' is missing (a spec needs base, seeds and arms)")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"name: {name!r} must be letters, digits, '_', '-' or '.'")
    if not isinstance(raw["base"], str):
        raise ConfigError(f"base: expected the path of a config file, got {abbreviate(repr(raw['base']))}")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"base: config file {base} not found (a relative path is relative to the spec)")
    folder = raw.get("dir", str(Path("runs") / "experiments" / name))
    if not isinstance(folder, str) or not folder:
        raise ConfigError(f"dir: expected a folder path, got {abbreviate(repr(folder))}")
    seeds = _seeds(raw["seeds"])
    common = _overrides(raw.get("overrides"), "overrides")
    if not isinstance(raw["arms"], dict) or not raw["arms"]:
        raise ConfigError(f"arms: expected a mapping arm name -> overrides (built-ins: {', '.join(BUILTIN_ARMS)})")
    arms: dict[str, dict[str, Any]] = {}
    for arm, own in raw["arms"].items():
        if not isinstance(arm, str) or not _NAME.fullmatch(arm):
            raise ConfigError(f"arms: {arm!r} is not a usable folder name (letters, digits, '_', '-', '.')")
        arms[arm] = {**BUILTIN_ARMS.get(arm, {}), **_overrides(own, f"arms.{arm}")}
    compare = raw.get("compare", "pbt" if "pbt" in arms else next(iter(arms)))
    if compare not in arms:
        raise ConfigError(f"compare: {compare!r} is not one of the arms ({', '.join(arms)})")

    base_raw = read_yaml(base)
    root = Path(folder)
    runs = []
    for arm, own in arms.items():
        for seed in seeds:
            run_dir = root / arm / f"seed_{seed}"
            texts = _as_strings(common) + list(cli_overrides) + _as_strings(own)
            owned = [f"run.seed={seed}", f"run.dir={json.dumps(str(run_dir))}", f"run.name={name}-{arm}-seed_{seed}",
                     f"logging.wandb_group={json.dumps(name)}", f"logging.wandb_job_type={json.dumps(arm)}"]
            try:
                config = from_dict(apply_overrides(base_raw, texts + owned))
            except ConfigError as exc:
                raise ConfigError(f"arm {arm}: {exc}") from None
            runs.append(RunPlan(arm, seed, run_dir, config))
    _check_equal_budgets(runs)
    replay = _replay(raw.get("replay"), arms, compare, root)
    return ExperimentSpec(name, path, root, base, seeds, arms, _thresholds(raw.get("thresholds")), compare, tuple(runs),
                          replay)


def _replay(raw: Any, arms: dict, compare: str, root: Path) -> ReplayPlan | None:
    """``replay: {arm: pbt, seeds: [100, 101, 102]}`` (or ``seeds: 3``: 1000, 1001, 1002)."""
    if raw is None:
        return None
    if REPLAY_ARM in arms:
        raise ConfigError(f"arms.{REPLAY_ARM}: the name belongs to the replay arm (the spec's 'replay' key)")
    if not isinstance(raw, dict) or set(raw) - {"arm", "seeds"} or "seeds" not in raw:
        raise ConfigError(f"replay: expected {{arm: <an arm, default {compare}>, seeds: <count or list>}}, got {abbreviate(repr(raw))}")
    arm = raw.get("arm", compare)
    if arm not in arms:
        raise ConfigError(f"replay.arm: {arm!r} is not one of the arms ({', '.join(arms)})")
    seeds = raw["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        seeds = [1000 + k for k in range(seeds)]
    try:
        return ReplayPlan(arm, _seeds(seeds), root / REPLAY_ARM)
    except ConfigError as exc:
        raise ConfigError(f"replay.{exc}") from None


def budget(config: ExperimentConfig) -> int:
    """Env steps one run spends: population size x budget per member."""
    return config.pbt.population_size * config.run.total_env_steps


def _check_equal_budgets(runs: list[RunPlan]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if budget(run.config) != budget(first.config):
            raise ConfigError(
                f"arm {run.arm}: spends {budget(run.config):,} env steps per run "
                f"({run.config.pbt.population_size} x {run.config.run.total_env_steps:,}), arm {first.arm} "
                f"{budget(first.config):,}; arms are compared at equal budgets"
            )


def comparable(config: ExperimentConfig) -> ExperimentConfig:
    """The config without its run directory (a resumed run's is absolute), for comparisons."""
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=""))
