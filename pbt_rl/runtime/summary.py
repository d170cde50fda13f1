"""``summary.json``: what became of the run and of every member, and which member is best.

Run status (``summary["status"]``), decided only here:

=========== ================================================================ ==========
status      meaning                                                          CLI exit
=========== ================================================================ ==========
finished    every member reached ``run.total_env_steps``                     0
stopped     stopped before that (``run.max_wall_seconds``); resume continues 0
partial     the run is over, some members finished, others were abandoned    3
failed      the run is over and no member finished (all were abandoned)      1
=========== ================================================================ ==========

A member is *abandoned* after ``recovery.MAX_FAILURES`` failures in a row; ``pbt-rl resume`` gives
abandoned members a new series of attempts. Member status: ``done``, ``abandoned`` or
``stopped`` (still to train).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping

from pbt_rl.runtime.records import MemberRecord

EXIT_CODES = {"finished": 0, "stopped": 0, "partial": 3, "failed": 1}


def run_status(records: Mapping[int, MemberRecord]) -> str:
    if any(not (r.done or r.abandoned) for r in records.values()):
        return "stopped"
    if all(r.done for r in records.values()):
        return "finished"
    return "partial" if any(r.done for r in records.values()) else "failed"


def member_status(record: MemberRecord) -> str:
    return "done" if record.done else ("abandoned" if record.abandoned else "stopped")


def best_member(scores: Mapping[int, float | None]) -> int | None:
    """The best-member rule: the highest finite score, the lowest id among equals; None if unscored."""
    scored = [(score, member) for member, score in scores.items() if score is not None and math.isfinite(score)]
    return max(scored, key=lambda s: (s[0], -s[1]))[1] if scored else None


def build_summary(records: Mapping[int, MemberRecord], fitness: Callable[[MemberRecord], float], exploits: int,
                  wall_seconds: float) -> dict:
    members = {}
    for r in records.values():
        score = fitness(r)
        members[str(r.member_id)] = {
            "status": member_status(r),
            "score": score if math.isfinite(score) else None,
            "env_steps": r.env_steps,
            "generation": r.generation,
            "hyperparameters": r.hyperparameters,
            "checkpoint": r.checkpoint_id,
            "checkpoint_env_steps": r.checkpoint_env_steps,
            "failures": r.failures,
            "error": r.last_error if r.abandoned else None,
        }
    best = best_member({int(k): v["score"] for k, v in members.items()})
    chosen = members[str(best)] if best is not None else {}
    status = run_status(records)
    return {
        "status": status,
        "finished": status == "finished",
        "best_member": best,
        "best_score": chosen.get("score"),
        "best_env_steps": chosen.get("env_steps"),
        "best_hyperparameters": chosen.get("hyperparameters"),
        "best_checkpoint": chosen.get("checkpoint"),
        "members_done": sum(r.done for r in records.values()),
        "members_abandoned": sum(r.abandoned for r in records.values()),
        "exploits": exploits,
        "wall_seconds": wall_seconds,
        "members": members,
    }


def population_row(records: Mapping[int, MemberRecord], fitness: Callable[[MemberRecord], float],
                   wall_seconds: float) -> dict:
    """The population at one moment (what loggers get at each ready point): per member env steps,
    fitness (None until scored), generation, status and hyperparameters; the population's env
    steps (summed over members), its best member (:func:`best_member`) and best and median
    fitness over the scored members (None while none is), and the exploits so far (the
    members' generations summed: one per lineage row)."""
    members = []
    for r in records.values():
        score = fitness(r)
        members.append({"member": r.member_id, "env_steps": r.env_steps,
                        "fitness": score if math.isfinite(score) else None, "generation": r.generation,
                        "status": r.status, "hyperparameters": dict(r.hyperparameters)})
    scores = sorted(m["fitness"] for m in members if m["fitness"] is not None)
    best = best_member({m["member"]: m["fitness"] for m in members})
    return {
        "time": time.time(), "wall_seconds": wall_seconds,
        "env_steps": sum(m["env_steps"] for m in members),
        "best_member": best, "best_fitness": scores[-1] if scores else None,
        "median_fitness": statistics.median(scores) if scores else None,
        "exploits": sum(m["generation"] for m in members),
        "members": members,
    }


def outcome_lines(summary: Mapping, names: tuple[str, ...], run_dir: str) -> list[str]:
    """What ``train``/``resume`` print at the end: the best member, and the abandoned ones if any."""
    from pbt_rl.runtime.console import format_hyperparameters, format_score

    if summary["best_member"] is None:
        lines = ["No member has a score yet (too few finished episodes)."]
    else:
        lines = [f"Best member: {summary['best_member']} score {format_score(summary['best_score']).strip()} "
                 f"at {summary['best_env_steps']:,} env steps "
                 f"({format_hyperparameters(summary['best_hyperparameters'], names)}); "
                 f"{summary['exploits']} exploits; run directory {run_dir}"]
    abandoned = {k: m for k, m in summary["members"].items() if m["status"] == "abandoned"}
    if abandoned:
        member, info = next(iter(abandoned.items()))
        lines.append(f"Run {summary['status']}: {len(abandoned)} of {len(summary['members'])} members abandoned after "
                     f"repeated failures (member {member}: {info['error']}); see events.jsonl, and "
                     f"`pbt-rl resume {run_dir}` to retry them")
    return lines
