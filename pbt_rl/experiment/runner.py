"""``pbt-rl experiment``: train every arm x seed of a spec, one ordinary run after another, resumably.

Before anything is written every run directory that already exists is checked: it must be a run
directory whose config is the one the spec builds now (else one line, nothing changes). Then,
in spec order (arms, then seeds), a run that is over (summary status finished, partial or
failed) is skipped, one that stopped or was killed is continued with :func:`pbt_rl.runtime.resume`,
and a missing one is trained with :func:`pbt_rl.runtime.train`. Running the command again after an
interruption therefore continues where it stopped. At the end results.json / results.md and the
figures are written at the experiment directory's root (:mod:`pbt_rl.experiment.results`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pbt_rl.config import ConfigError, dump_yaml
from pbt_rl.experiment.spec import ExperimentSpec, RunPlan, comparable
from pbt_rl.runtime.store import RunStore

OVER = ("finished", "partial", "failed")  # summary statuses of a run that is over (summary.py)


def run_state(plan: RunPlan) -> str:
    """'new', 'resume', or the status of a run that is over; ConfigError for a foreign directory."""
    store = RunStore(plan.dir)
    if not store.root.exists() or (store.root.is_dir() and not any(store.root.iterdir())):
        return "new"
    store.require_run()
    stored = comparable(store.read_config())
    if dump_yaml(stored) != dump_yaml(comparable(plan.config)):
        raise ConfigError(f"{store.root} was trained with another config than the spec now gives {plan.label} "
                          f"(changed spec or overrides?); restore them, or delete that run directory")
    summary = store.read_summary()
    status = summary.get("status") if summary else None
    return status if status in OVER else "resume"


def run_experiment(spec: ExperimentSpec, console: bool = True, *, backend: Callable[[], Any] | None = None,
                   loggers: Callable[[], list] | None = None, results: bool = True,
                   replay_learner: Callable[..., Any] | None = None) -> dict:
    """Train what is left of ``spec``, then its replay arm; return ``{"runs": {label: status},
    "results": path | None}``.

    backend / loggers: factories called once per run (tests pass the threaded fake backend);
    replay_learner: the replay arm's learner factory (default: the real agents).
    """
    from pbt_rl.runtime import resume, train

    from pbt_rl.scheduler import Scheduler

    for plan in spec.runs:  # every check before any write: e.g. pb2 without scikit-learn
        Scheduler(plan.config.pbt, seed=plan.config.run.seed)
    states = {plan.label: run_state(plan) for plan in spec.runs}
    statuses: dict[str, str] = {}
    total = len(spec.runs)
    started = time.monotonic()
    for number, plan in enumerate(spec.runs, start=1):
        state = states[plan.label]
        over = sum(s in OVER for s in states.values())
        if state in OVER:
            statuses[plan.label] = state
            _say(console, f"[{number}/{total}] {plan.label}: {state} before, skipped")
            continue
        left = total - over - 1
        verb = "resuming" if state == "resume" else "training"
        _say(console, f"[{number}/{total}] {plan.label}: {verb} ({over} of {total} runs over, {left} to go after "
                      f"this; {time.monotonic() - started:.0f} s in this command)")
        kwargs = {"backend": backend() if backend else None, "loggers": loggers() if loggers else None}
        if state == "resume":
            summary = resume(plan.dir, console=console, **kwargs)
        else:
            summary = train(plan.config, console=console, **kwargs)
        statuses[plan.label] = states[plan.label] = summary["status"]
    if spec.replay is not None:
        from pbt_rl.experiment.replay_arm import run_replays

        statuses.update(run_replays(spec, console, lambda line: _say(console, line), replay_learner))
    path = None
    if results:
        from pbt_rl.experiment.results import write_results

        path = write_results(spec)
        _say(console, f"experiment {spec.name}: results in {path} and {path.with_suffix('.md')}")
        note = _log_results_to_wandb(spec, path)
        if note:
            _say(console, note)
    stopped = [label for label, status in statuses.items() if status not in OVER + ("waiting",)]
    if stopped:
        _say(console, f"experiment {spec.name}: {len(stopped)} run(s) stopped before their budget "
                      f"({', '.join(stopped)}); run the same command again to continue")
    return {"runs": statuses, "results": path}


def _log_results_to_wandb(spec: ExperimentSpec, path: Any) -> str | None:
    """The results table in W&B when the runs log there; a W&B failure never fails the experiment."""
    import json

    from pbt_rl.experiment.wandb_summary import log_experiment_results

    try:
        return log_experiment_results(spec, json.loads(path.read_text()))
    except Exception as exc:  # noqa: BLE001 - the results are on disk; W&B is extra
        return f"pbt-rl: warning: results not logged to W&B: {type(exc).__name__}: {exc}"


def exit_code(outcome: dict) -> int:
    """1 if a run failed, 3 if one ended partial, else 0 (the codes of ``pbt-rl train``)."""
    statuses = set(outcome["runs"].values())
    return 1 if "failed" in statuses else 3 if "partial" in statuses else 0


def _say(console: bool, line: str) -> None:
    if console:
        print(f"experiment: {line}", flush=True)
