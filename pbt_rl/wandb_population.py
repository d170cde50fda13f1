"""The population's own W&B run (job type ``population``), beside the one run per member.

Opened and fed by :class:`pbt_rl.wandb_logger.WandbPopulationLogger`. At every ready point it
logs the population's best and median fitness, its best member and the exploits so far, against
the population's env steps (summed over members; ``env_steps``) with the wall time beside them
(``wall_seconds``: pick it as the x-axis in the W&B UI for fitness over time); one incremental
``population`` table gets a row per member per ready point (``ready_point`` numbers them), and
one incremental ``lineage`` table a row per exploit of any member. Resume re-opens the same run.
"""

from __future__ import annotations

from typing import Any, Callable

JOB_TYPE = "population"
POPULATION_TABLE_KEY = "population"
LINEAGE_TABLE_KEY = "lineage"


class WandbPopulationRun:
    """One W&B run for the whole population (see the module docstring)."""

    def __init__(self, search_space: list[str]) -> None:
        self.search_space = list(search_space)
        self.run_id: str | None = None
        self.ready_points = 0
        self._run: Any = None
        self._population_table: Any = None
        self._lineage_table: Any = None

    def start(self, init: Callable[..., Any], wandb: Any, experiment: dict, lineage_columns: list[str],
              name: str = "population", job_type: str | None = None) -> None:
        """Open (or re-open, after :meth:`load_state_dict`) the run; ``init`` is ``wandb.init``
        with the member runs' common arguments bound."""
        self._run = init(name=name, job_type=job_type or JOB_TYPE, id=self.run_id,
                         resume="allow" if self.run_id else None,
                         config={"population": True, "experiment": experiment})
        self._run.define_metric("env_steps")
        self._run.define_metric("*", step_metric="env_steps")
        self.run_id = self._run.id
        columns = ["ready_point", "env_steps", "wall_seconds", "member", "member_env_steps", "fitness",
                   "generation", "status", *(f"hp/{name}" for name in self.search_space)]
        self._population_table = wandb.Table(columns=columns, log_mode="INCREMENTAL")
        self._lineage_table = wandb.Table(columns=lineage_columns, log_mode="INCREMENTAL")

    def log_population(self, row: dict) -> None:
        """A :func:`pbt_rl.runtime.summary.population_row` snapshot."""
        if self._run is None:
            return
        self.ready_points += 1
        for member in row["members"]:
            self._population_table.add_data(
                self.ready_points, row["env_steps"], row["wall_seconds"], member["member"], member["env_steps"],
                member["fitness"], member["generation"], member["status"],
                *(member["hyperparameters"].get(name) for name in self.search_space))
        data: dict[str, Any] = {"env_steps": row["env_steps"], "wall_seconds": row["wall_seconds"],
                                "exploits": row["exploits"], POPULATION_TABLE_KEY: self._population_table}
        for key in ("best_fitness", "median_fitness", "best_member"):
            if row.get(key) is not None:
                data[key] = row[key]
        self._run.log(data)

    def log_exploit(self, cells: list[Any], population_env_steps: int) -> None:
        """One lineage table row (the member runs' lineage columns)."""
        if self._run is None:
            return
        self._lineage_table.add_data(*cells)
        self._run.log({"env_steps": population_env_steps, LINEAGE_TABLE_KEY: self._lineage_table})

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "ready_points": self.ready_points}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id") or None
        self.ready_points = int(state.get("ready_points") or 0)

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish()
