"""The replay arm: does a discovered schedule transfer without the population?

Once every run of the replay's source arm (``replay.arm``, default the compared arm) is over,
the best member of its best run (the highest ``best_score`` in the runs' summaries; ties: the
first seed) is replayed from scratch by :func:`pbt_rl.replay.replay` on each replay seed, into
``<dir>/replay/seed_<m>/``. Each replay spends *one member's* budget (``run.total_env_steps``),
not a population's: the results table says so. A replay whose ``replay.json`` exists is over and
skipped; one that was interrupted starts again from scratch (a replay has no checkpoints).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

from pbt_rl.experiment.results import curve_grid
from pbt_rl.experiment.spec import ExperimentSpec, RunPlan
from pbt_rl.runtime.store import RunStore, read_jsonl

from pbt_rl.replay import CURVE_FILE as CURVE, SUMMARY_FILE as SUMMARY  # the replay owns its files


def source_run(spec: ExperimentSpec) -> RunPlan | None:
    """The run whose best member is replayed; None until every run of the source arm is over."""
    plans = spec.runs_of(spec.replay.arm)
    summaries = [RunStore(p.dir).read_summary() if RunStore(p.dir).config_path.is_file() else None for p in plans]
    if any(s is None or s.get("status") not in ("finished", "partial", "failed") for s in summaries):
        return None
    scores = [s.get("best_score") for s in summaries]
    scored = [(score, -i) for i, score in enumerate(scores) if isinstance(score, (int, float)) and math.isfinite(score)]
    return plans[-max(scored)[1]] if scored else None


def run_replays(spec: ExperimentSpec, console: bool, say: Callable[[str], None],
                learner_factory: Callable[..., Any] | None = None) -> dict[str, str]:
    """Replay what is left; return {label: 'finished' | 'waiting'}."""
    from pbt_rl.replay import replay

    plan = spec.replay
    source = source_run(spec)
    labels = [f"replay/seed_{seed}" for seed in plan.seeds]
    if source is None:
        say(f"replay arm: waiting until every {plan.arm} run is over with a scored member; run the command again then")
        return {label: "waiting" for label in labels}
    for number, (seed, label) in enumerate(zip(plan.seeds, labels), start=1):
        out = plan.dir(seed)
        if (out / SUMMARY).is_file():
            say(f"[replay {number}/{len(labels)}] {label}: finished before, skipped")
            continue
        say(f"[replay {number}/{len(labels)}] {label}: replaying the best member of {source.label} on seed {seed}")
        replay(source.dir, member="best", out_dir=out, console=console, seed=seed, learner_factory=learner_factory)
    return {label: "finished" for label in labels}


def replay_result(spec: ExperimentSpec, seed: int, thresholds: Sequence[float], source: RunPlan | None) -> dict:
    """One replay's row in results.json, shaped like a run's (one member: best = median)."""
    out = spec.replay.dir(seed)
    if not (out / SUMMARY).is_file():
        return {"status": "missing"}
    summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    rows = [r for r in read_jsonl(out / CURVE) if r.get("score") is not None]
    reached = {}
    for threshold in thresholds:
        first = next((r for r in rows if r["score"] >= threshold), None)
        reached[f"{threshold:g}"] = None if first is None else {"env_steps": first["env_steps"], "wall_seconds": None,
                                                                "member": summary["member"]}
    grid = curve_grid(spec.runs_of(spec.replay.arm)[0])
    curve = [next((r["score"] for r in reversed(rows) if r["env_steps"] <= g), None) for g in grid]
    return {
        "status": "finished",
        "source": {"member": summary["member"], "run": None if source is None else source.label},
        "best_member": summary["member"],
        "best_final_fitness": summary["replay_score"],
        "median_final_fitness": summary["replay_score"],
        "env_steps": summary["env_steps"],
        "wall_seconds": summary["wall_seconds"],
        "exploits": 0,
        "thresholds": reached,
        "curve": {"env_steps": grid, "best_fitness": curve},
    }
