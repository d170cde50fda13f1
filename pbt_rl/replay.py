"""Replay a member's discovered hyperparameter schedule with a fresh agent (``pbt-rl replay``).

PBT discovers a *schedule*, not a constant. Replay asks whether that schedule alone (without the
population's weight copying) trains a good agent: a fresh learner trains for the run's budget
(``run.total_env_steps``) and switches hyperparameters wherever the member's schedule does.

The schedule is :func:`pbt_rl.lineage.schedule_of`: the hyperparameters behind the member's final
weights, along its ancestry. Its env steps are *ancestry env steps*: training of a donor before an
exploit counts for the replayed agent's timeline (the member's weights carried it), and the
member's own steps before its last exploit do not (its weights were replaced). Example: member 1
copied member 2's checkpoint at 180 of member 2's steps at its own step 200 and trained to 300;
the replay follows member 2's schedule for steps [0, 180) and member 1's new values from 180 on.
When the ancestry timeline is shorter than the budget the last values continue to the budget;
when it is longer, the replay stops at the budget.

The learner switches at the first update boundary at or after each scheduled step (``train``
stops at ``>= until_env_steps``); the step actually used is recorded next to the scheduled one.

Output: ``<run.dir>/replay-<member>/`` (or ``out_dir``) with ``replay.json`` (the summary this
function returns), ``curve.jsonl`` (one row per training chunk) and ``returns.png``.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from pbt_rl.lineage import final_fitness, member_env_steps, resolve_member, schedule_of
from pbt_rl.runtime.file_io import atomic_write_json, rewrite_jsonl
from pbt_rl.runtime.run_format import RunSnapshot
from pbt_rl.runtime.host import configure_process
from pbt_rl.runtime.store import RunStore, load_run

CHUNKS_PER_RUN = 50  # training chunks per replay: the resolution of the returns curve
SUMMARY_FILE = "replay.json"  # what replay() returns
CURVE_FILE = "curve.jsonl"  # one row per training chunk


def default_replay_seed(run_seed: int, member: int, member_seeds: set[int]) -> int:
    """A seed no member of the run used, so replay tests the schedule, not a lucky seed."""
    seed = run_seed + 1_000_003 + member
    while seed in member_seeds:
        seed += 1
    return seed


def _default_factory() -> Callable[..., Any]:
    from pbt_rl.agents import make_learner

    return make_learner


def replay(
    run_dir: str | Path,
    member: str | int = "best",
    out_dir: Path | None = None,
    console: bool = True,
    *,
    seed: int | None = None,
    device: str | None = None,
    learner_factory: Callable[..., Any] | None = None,
) -> dict:
    """Train a fresh agent on ``member``'s schedule for the run's budget; return a summary dict.

    Args:
        run_dir: a run directory (finished or in progress).
        member: ``"best"`` or a member id.
        out_dir: where to write the results; default ``<run_dir>/replay-<member>/``.
        console: print a progress line per chunk and the comparison at the end.
        seed: the fresh agent's seed; default :func:`default_replay_seed`.
        device: learner device (default: the config's ``agent.device``).
        learner_factory: ``(config, seed, device=..., num_threads=...) -> Learner``; default
            ``pbt_rl.agents.make_learner``.

    Returns:
        ``{"member", "seed", "env_steps", "replay_score", "pbt_score", "score_difference",
        "episodes", "schedule", "wall_seconds", "out_dir"}``; ``schedule`` lists
        ``{"scheduled_env_steps", "applied_env_steps", "hyperparameters"}`` per switch, and the
        scores are means of the last ``pbt.fitness_window`` episodic returns (None if no episode
        finished).
    """
    run = load_run(run_dir)
    store = RunStore(run.root)
    member_id = resolve_member(run, member)
    schedule = schedule_of(run, member_id)
    config = run.config
    seed = default_replay_seed(config.run.seed, member_id, set(run.seeds.values())) if seed is None else int(seed)
    out = Path(out_dir).absolute() if out_dir is not None else store.replay_dir(member_id)
    # Writing into the run directory: hold its lock, so a live controller's directory is refused.
    if out.is_relative_to(store.root):
        store.acquire("replay")
    try:
        return _replay(run, member_id, schedule, seed, out, console, device, learner_factory or _default_factory())
    finally:
        store.release()


def _replay(run: RunSnapshot, member_id: int, schedule: list, seed: int, out: Path, console: bool, device: str | None,
            factory: Callable[..., Any]) -> dict:
    config = run.config
    budget = int(config.run.total_env_steps)
    out.mkdir(parents=True, exist_ok=True)

    window: deque[float] = deque(maxlen=config.pbt.fitness_window)
    all_returns: list[float] = []
    curve: list[dict] = []
    followed: list[dict] = []
    chunk = max(1, budget // CHUNKS_PER_RUN)
    started = time.perf_counter()
    configure_process(device if device is not None else config.agent.device, num_threads=0,
                      torch_threads=config.run.torch_threads, gpu_wait=config.run.gpu_wait)
    learner = factory(config, seed, device=device, num_threads=0)
    try:
        points = [(step, values) for step, values in schedule if step < budget] or schedule[:1]
        for index, (scheduled, values) in enumerate(points):
            segment_end = points[index + 1][0] if index + 1 < len(points) else budget
            learner.set_hyperparameters(dict(values))
            followed.append({"scheduled_env_steps": int(scheduled), "applied_env_steps": int(learner.env_steps),
                             "hyperparameters": dict(values)})
            while learner.env_steps < segment_end:
                report = learner.train(min(segment_end, learner.env_steps + chunk))
                window.extend(report.episode_returns)
                all_returns.extend(report.episode_returns)
                row = {
                    "env_steps": int(report.env_steps),
                    "episode_returns": [float(r) for r in report.episode_returns],
                    "score": sum(window) / len(window) if window else None,
                    "hyperparameters": dict(values),
                    "env_steps_per_second": float(report.env_steps_per_second),
                }
                curve.append(row)
                if console:
                    score = "-" if row["score"] is None else f"{row['score']:.2f}"
                    print(f"replay member {member_id}: {row['env_steps']:>10,}/{budget:,} env steps  "
                          f"score {score}  {_describe(values)}", flush=True)
    finally:
        learner.close()

    replay_score = sum(window) / len(window) if window else None
    pbt_score = final_fitness(run, member_id)
    summary = {
        "member": member_id,
        "seed": seed,
        "env_steps": curve[-1]["env_steps"] if curve else 0,
        "budget_env_steps": budget,
        "replay_score": replay_score,
        "pbt_score": pbt_score,
        "pbt_env_steps": member_env_steps(run, member_id),
        "score_difference": None if replay_score is None or pbt_score is None else replay_score - pbt_score,
        "episodes": len(all_returns),
        "schedule": followed,
        "wall_seconds": time.perf_counter() - started,
        "out_dir": str(out),
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    rewrite_jsonl(out / CURVE_FILE, curve)
    _plot(run, member_id, curve, followed, out / "returns.png")
    if console:
        pbt = "-" if pbt_score is None else f"{pbt_score:.2f}"
        rep = "-" if replay_score is None else f"{replay_score:.2f}"
        print(f"replay of member {member_id}'s schedule: score {rep} after {summary['env_steps']:,} env steps "
              f"(PBT member: {pbt}); results in {out}")
    return summary


def _describe(values: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))


def _plot(run: RunSnapshot, member: int, curve: list[dict], followed: list[dict], path: Path) -> None:
    from pbt_rl.report import pyplot_agg

    plt = pyplot_agg()
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    xs = [row["env_steps"] for row in curve if row["score"] is not None]
    ys = [row["score"] for row in curve if row["score"] is not None]
    ax.plot(xs, ys, color="crimson", linewidth=2, label="replay (fresh agent, same schedule)")
    pbt_rows = [r for r in run.metrics.get(member, ()) if r.fitness is not None]
    if pbt_rows:
        ax.plot([r.env_steps for r in pbt_rows], [r.fitness for r in pbt_rows], color="0.3",
                linestyle="--", label=f"PBT member {member} (its own env steps)")
    for switch in followed[1:]:
        ax.axvline(switch["applied_env_steps"], color="0.6", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"score (mean of last {run.config.pbt.fitness_window} episodic returns)")
    ax.set_title(f"{run.config.run.name}: replay of member {member}'s schedule (vertical lines: switches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

