"""The experiment in W&B: its runs share one group (the experiment's name) with the arm as the
member runs' job type (set by :mod:`pbt_rl.experiment.spec`), and one more run of job type
``experiment`` holds the results table (per arm the mean and 95% CI of the best member's final
fitness and of the population median; the comparison p-values). Nothing happens when the base
config has W&B off; wandb is imported only otherwise.
"""

from __future__ import annotations

from typing import Any

JOB_TYPE = "experiment"
RESULTS_TABLE_KEY = "results"
COLUMNS = ["arm", "runs", "budget_env_steps_per_run", "one_member_budget", "best_final_fitness_mean",
           "best_final_fitness_ci_low", "best_final_fitness_ci_high", "median_final_fitness_mean",
           "mean_difference_vs_compare", "welch_t_p", "mann_whitney_u_p"]


def results_rows(results: dict) -> list[list[Any]]:
    """One row per arm of ``results`` (the results.json object), in :data:`COLUMNS` order."""
    rows = []
    for arm, stats in results["arms"].items():
        best, median = stats["best_final_fitness"], stats["median_final_fitness"]
        comparison = results["comparisons"].get(arm, {})
        rows.append([arm, stats["runs"], stats["budget_env_steps_per_run"], stats["one_member_budget"],
                     best["mean"], best["ci_low"], best["ci_high"], median["mean"],
                     comparison.get("mean_difference"), comparison.get("welch_t_p"),
                     comparison.get("mann_whitney_u_p")])
    return rows


def log_experiment_results(spec: Any, results: dict) -> str | None:
    """Log the results table to the experiment's W&B group; returns what to print (None: W&B off)."""
    config = spec.runs[0].config
    if config.logging.wandb == "disabled":
        return None
    import wandb

    from pbt_rl.wandb_logger import resolve_mode

    mode = resolve_mode(config.logging.wandb)
    run = wandb.init(project=config.logging.wandb_project, entity=config.logging.wandb_entity or None,
                     group=spec.name, job_type=JOB_TYPE, name=f"{spec.name}/results", dir=str(spec.dir.absolute()),
                     mode=mode, reinit="create_new",
                     config={"experiment": spec.name, "seeds": list(spec.seeds), "arms": list(results["arms"]),
                             "compare": spec.compare, "thresholds": list(spec.thresholds)},
                     settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False, disable_git=True))
    run.log({RESULTS_TABLE_KEY: wandb.Table(columns=COLUMNS, data=results_rows(results))})
    run.finish()
    return f"W&B ({mode}): results of experiment {spec.name} logged to group {spec.name}, run {run.id}"
