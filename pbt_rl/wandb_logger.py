"""Weights & Biases logging for a population: one W&B run per member, all from the controller.

:class:`WandbPopulationLogger` implements the ``PopulationLogger`` protocol of docs/design.md. The
controller's logging thread opens one W&B run per member (``wandb.init(reinit="create_new")`` keeps
several runs open in one process), grouped by experiment name, so the W&B UI shows the population
as a group and each member as a run, and one more run of job type ``population`` for the whole
population (best and median fitness, a population table per ready point, the lineage:
:mod:`pbt_rl.wandb_population`). Per member run:

- time series against ``env_steps`` (``define_metric(..., step_metric="env_steps")``): episodic
  returns, fitness, losses, env steps/s and every hyperparameter as ``hp/<name>``;
- on each exploit of the member: the parent (``parent`` in the run config and ``exploit/donor``
  in the history), a config update with the new hyperparameters, one row of the incremental
  ``lineage`` table, and the member's new weights (the donor's checkpoint file) as a ``model``
  artifact with metadata ``{member, parent, generation, env_steps}``;
- online only: the donor's checkpoint is logged as an artifact of the donor's run and the child
  run records it with ``use_artifact``, so W&B's artifact graph draws the family tree. W&B refuses
  ``use_artifact`` in offline mode; offline runs keep the donor's artifact name in the lineage
  table and config instead (docs/lineage.md).

Modes (``logging.wandb``): ``online``, ``offline`` (files under ``<run.dir>/wandb/``, upload later
with ``wandb sync``) and ``disabled`` (this logger does nothing and never imports wandb).
``online`` falls back to ``offline`` when no W&B credentials are configured; see
:func:`wandb_credentials_found`.

Resume: :meth:`state_dict` returns the W&B run ids (and each run's current config); after
:meth:`load_state_dict`, :meth:`start` re-opens the same runs (same ids, ``resume="allow"``), so
a resumed population keeps appending to the runs it had.
"""

from __future__ import annotations

import functools
import json
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from pbt_rl.config import ExperimentConfig, to_dict
from pbt_rl.runtime.run_format import EventRow, LineageRow, MetricsRow, Population
from pbt_rl.runtime.store import RunStore
from pbt_rl.wandb_population import WandbPopulationRun

JOB_TYPE = "pbt-member"
DEFAULT_BASE_URL = "https://api.wandb.ai"
LINEAGE_TABLE_KEY = "lineage"


def wandb_credentials_found(environ: dict[str, str] | None = None) -> bool:
    """True when W&B credentials are configured, checked without touching the network.

    The sources are those wandb 0.31 reads itself (``wandb.sdk.lib.wbauth``): the
    ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` environment variables, then the netrc
    file (``$NETRC`` or ``~/.netrc``) entry for the host of ``WANDB_BASE_URL``
    (default api.wandb.ai). ``wandb.login()`` is not used: it verifies the key over the network
    by default and refuses to run once a run is open.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netrc_path = Path(env["NETRC"]) if env.get("NETRC") else Path.home() / ".netrc"
    if not netrc_path.is_file():
        return False
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname or ""
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_mode(requested: str, environ: dict[str, str] | None = None) -> str:
    """The W&B mode to use: ``online`` becomes ``offline`` when no credentials are found."""
    if requested == "online" and not wandb_credentials_found(environ):
        return "offline"
    return requested


def run_names(config: ExperimentConfig) -> tuple[str, str, str]:
    """``(group, member job type, run-name prefix)`` of a run's W&B runs: the group is
    ``logging.wandb_group`` or ``run.name``; the member runs' job type ``logging.wandb_job_type`` or
    ``pbt-member``; run names are ``member-<id>`` and ``population``, prefixed with ``run.name/``
    when the group is not the run's own (several runs of an experiment share one group)."""
    logging = config.logging
    group = logging.wandb_group or config.run.name
    prefix = f"{config.run.name}/" if logging.wandb_group and logging.wandb_group != config.run.name else ""
    return group, logging.wandb_job_type or JOB_TYPE, prefix


def _artifact_name(experiment: str, member: int) -> str:
    """Artifact names are project-wide; the experiment name keeps two experiments apart."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in experiment)
    return f"{safe}-member-{member}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class WandbPopulationLogger:
    """PopulationLogger that writes one W&B run per member (see the module docstring).

    Args:
        config: the experiment; uses ``logging.wandb``, ``logging.wandb_project``,
            ``logging.wandb_entity`` and ``run.name`` (the W&B group).
        run_dir: the run directory; W&B files go to its ``RunStore.wandb_dir``.

    The rows it is given are the dicts the controller writes to the run files; each is read as
    its typed row (``MetricsRow``, ``LineageRow``, ``EventRow``, ``Population``) first.
    """

    def __init__(self, config: ExperimentConfig, run_dir: Path) -> None:
        self.config = config
        self.store = RunStore(run_dir)
        self.requested_mode = config.logging.wandb
        self.mode = resolve_mode(self.requested_mode)
        self._run_ids: dict[int, str] = {}
        self._run_configs: dict[int, dict[str, Any]] = {}  # what each run's config holds now
        self._runs: dict[int, Any] = {}
        self._tables: dict[int, Any] = {}
        self._search_space: list[str] = [spec.name for spec in config.pbt.search_space]
        self._started = False
        self._population = WandbPopulationRun(self._search_space)
        self._env_steps: dict[int, int] = {}  # each member's latest, from its progress rows

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    @property
    def run_ids(self) -> dict[int, str]:
        return dict(self._run_ids)

    # -- PopulationLogger -----------------------------------------------------------------

    def start(self, population: dict) -> None:
        """Open (or, after load_state_dict, re-open) one W&B run per member (``population``: the
        population.json content)."""
        if not self.enabled or self._started:
            return
        import wandb

        if self.requested_mode == "online" and self.mode == "offline":
            print("W&B: no credentials found (WANDB_API_KEY, ~/.netrc); logging offline to "
                  f"{self.store.wandb_dir} (upload later with `wandb sync`)", file=sys.stderr)
        members = Population.from_dict(population, where="population")
        self._search_space = list(members.search_space or self._search_space)
        self.store.root.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off",  # stdout belongs to the controller's progress lines, not to one member
            x_disable_stats=True,  # one process, many runs: machine stats would repeat per member
            save_code=False,
            disable_git=True,
        )
        experiment = to_dict(self.config)
        group, job_type, prefix = run_names(self.config)
        init = functools.partial(
            wandb.init,
            project=self.config.logging.wandb_project,
            entity=self.config.logging.wandb_entity or None,
            group=group,
            dir=str(self.store.root),  # W&B writes under <dir>/wandb: RunStore.wandb_dir
            mode=self.mode,
            reinit="create_new",
            settings=settings,
        )
        for member, info in members.members.items():
            run_config = self._run_configs.get(member) or {
                "member": member,
                "seed": info.seed,
                "parent": None,
                "generation": 0,
                "hp": dict(info.hyperparameters),
                "experiment": experiment,
            }
            resuming = member in self._run_ids
            run = init(job_type=job_type, name=f"{prefix}member-{member}", id=self._run_ids.get(member),
                       resume="allow" if resuming else None, config=run_config)
            run.define_metric("env_steps")
            run.define_metric("*", step_metric="env_steps")
            self._runs[member] = run
            self._run_ids[member] = run.id
            self._run_configs[member] = run_config
            self._tables[member] = wandb.Table(columns=self._lineage_columns(), log_mode="INCREMENTAL")
        self._population.search_space = list(self._search_space)
        self._population.start(init, wandb, experiment, self._lineage_columns(), name=f"{prefix}population",
                               job_type=f"{self.config.logging.wandb_job_type}/population"
                               if self.config.logging.wandb_job_type else None)
        self._started = True

    def log_population(self, row: dict) -> None:
        """A population snapshot at a ready point, to the population's own run."""
        if self._started:
            self._population.log_population(row)

    def log_progress(self, row: dict) -> None:
        """Log one metrics.jsonl row as a point of the member's time series at ``env_steps``."""
        if not self._started:
            return
        progress = MetricsRow.from_dict(row)
        run = self._runs.get(progress.member)
        if run is None:
            return
        self._env_steps[progress.member] = progress.env_steps
        data: dict[str, Any] = {"env_steps": progress.env_steps}
        if progress.updates is not None:
            data["updates"] = progress.updates
        if progress.fitness is not None:
            data["fitness"] = progress.fitness
        returns = progress.episode_returns
        if returns:
            data["episode_return/mean"] = _mean(returns)
            data["episode_return/max"] = max(returns)
            data["episode_return/min"] = min(returns)
        data["episodes_finished"] = len(returns)
        if progress.episode_lengths:
            data["episode_length/mean"] = _mean(progress.episode_lengths)
        for name, value in progress.losses.items():
            data[f"losses/{name}"] = value
        if progress.env_steps_per_second is not None:
            data["env_steps_per_second"] = progress.env_steps_per_second
        for name, value in progress.hyperparameters.items():
            data[f"hp/{name}"] = value
        run.log(data)

    def log_exploit(self, row: dict, checkpoint_path: Path) -> None:
        """Record an exploit of ``row["member"]`` (a lineage row); ``checkpoint_path`` = donor checkpoint."""
        if not self._started:
            return
        exploit = LineageRow.from_dict(row)
        run = self._runs.get(exploit.member)
        if run is None:
            return
        import wandb

        member, donor, generation = exploit.member, exploit.donor, exploit.generation
        checkpoint_path = Path(checkpoint_path)
        experiment = self.config.run.name

        donor_artifact_name = None
        donor_run = self._runs.get(donor)
        if self.mode == "online" and donor_run is not None:
            # The donor's run outputs its checkpoint; the child consumes it: an edge in W&B's graph.
            donor_artifact = wandb.Artifact(
                _artifact_name(experiment, donor), type="model",
                metadata={"member": donor, "parent": self._run_configs[donor].get("parent"),
                          "generation": self._run_configs[donor].get("generation", 0),
                          "env_steps": exploit.donor_env_steps},
            )
            donor_artifact.add_file(str(checkpoint_path), name="checkpoint.pt")
            donor_run.log_artifact(donor_artifact, aliases=[f"step-{exploit.donor_env_steps}"])
            try:
                donor_artifact.wait()
                run.use_artifact(donor_artifact)
                donor_artifact_name = f"{donor_artifact.name}"
            except Exception as exc:  # the graph edge is a nicety; never stop training for it
                print(f"W&B: could not link member {member} to its donor's artifact: {exc}", file=sys.stderr)
        if donor_artifact_name is None:
            donor_artifact_name = f"{_artifact_name(experiment, donor)} (step {exploit.donor_env_steps})"

        new_hp = dict(exploit.new_hyperparameters)
        config_update = {
            "parent": donor,
            "generation": generation,
            "hp": {**self._run_configs[member].get("hp", {}), **new_hp},
            "last_exploit": {
                "env_steps": exploit.env_steps,
                "donor": donor,
                "donor_env_steps": exploit.donor_env_steps,
                "donor_checkpoint": exploit.donor_checkpoint,
                "donor_artifact": donor_artifact_name,
            },
        }
        run.config.update(config_update, allow_val_change=True)
        self._run_configs[member] = {**self._run_configs[member], **config_update}

        table = self._tables[member]
        cells = self._lineage_cells(exploit, donor_artifact_name)
        table.add_data(*cells)
        self._population.log_exploit(cells, sum(self._env_steps.values()))
        data: dict[str, Any] = {
            "env_steps": exploit.env_steps,
            "exploit/donor": donor,
            "exploit/generation": generation,
            LINEAGE_TABLE_KEY: table,
        }
        if exploit.member_score is not None:
            data["exploit/member_score"] = exploit.member_score
        if exploit.donor_score is not None:
            data["exploit/donor_score"] = exploit.donor_score
        for name, value in new_hp.items():
            data[f"hp/{name}"] = value  # the schedule steps at the exploit's env step
        run.log(data)

        artifact = wandb.Artifact(
            _artifact_name(experiment, member), type="model",
            metadata={"member": member, "parent": donor, "generation": generation,
                      "env_steps": exploit.env_steps, "donor_env_steps": exploit.donor_env_steps,
                      "hyperparameters": new_hp},
        )
        artifact.add_file(str(checkpoint_path), name="checkpoint.pt")
        run.log_artifact(artifact, aliases=[f"generation-{generation}"])

    def log_event(self, row: dict) -> None:
        """An events.jsonl row: counted as ``events/<kind>`` in the member's run (all runs if no member)."""
        if not self._started:
            return
        event = EventRow.from_dict(row)
        kind = event.event
        targets = [event.member] if event.member in self._runs else list(self._runs)
        for target in targets:
            run = self._runs[target]
            data: dict[str, Any] = {f"events/{kind}": 1}
            if event.env_steps is not None:
                data["env_steps"] = int(event.env_steps)
            run.log(data)
            run.summary[f"last_event/{kind}"] = json.dumps(event.to_dict(), default=str)

    def state_dict(self) -> dict:
        """The W&B run ids and each run's current config (JSON-serialisable), for state.json."""
        return {
            "mode": self.mode,
            "run_ids": {str(m): run_id for m, run_id in self._run_ids.items()},
            "run_configs": {str(m): cfg for m, cfg in self._run_configs.items()},
            "population": self._population.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Called before start() on resume: start() then re-opens these runs."""
        self._run_ids = {int(m): str(run_id) for m, run_id in (state.get("run_ids") or {}).items()}
        self._run_configs = {int(m): dict(cfg) for m, cfg in (state.get("run_configs") or {}).items()}
        self._population.load_state_dict(state.get("population") or {})

    def close(self) -> None:
        """Finish every run (flushes the offline files)."""
        runs, self._runs = self._runs, {}
        for run in runs.values():
            run.finish()
        self._population.close()
        self._tables = {}
        self._started = False

    # -- helpers ----------------------------------------------------------------------------

    def _lineage_columns(self) -> list[str]:
        columns = ["env_steps", "member", "generation", "donor", "donor_env_steps", "donor_checkpoint",
                   "donor_artifact", "member_score", "donor_score", "exploit"]
        for name in self._search_space:
            columns += [f"old/{name}", f"new/{name}", f"op/{name}"]
        return columns

    def _lineage_cells(self, row: LineageRow, donor_artifact: str) -> list[Any]:
        cells = [row.env_steps, row.member, row.generation, row.donor, row.donor_env_steps, row.donor_checkpoint,
                 donor_artifact, row.member_score, row.donor_score, row.exploit]
        for name in self._search_space:
            cells += [row.old_hyperparameters.get(name), row.new_hyperparameters.get(name), row.operations.get(name)]
        return cells


def log_eval_video(run_dir: Path, config: ExperimentConfig, member: int, video: Path, result: dict) -> str | None:
    """Log ``pbt-rl eval``'s video and scores to ``member``'s W&B run; returns what to print.

    The member's run id comes from state.json (what :meth:`WandbPopulationLogger.state_dict`
    saved); the run is re-opened (``resume="allow"``) under the run directory, in the mode the run
    used (``online`` without credentials is ``offline``), and gets ``eval/video`` (a W&B video),
    ``eval/return_mean`` and ``eval/return_std`` at the checkpoint's env steps. Skipped, with the
    reason returned, while a controller holds the run (its process has the member's run open) or
    when the run has no W&B run for the member. Imports wandb only here.
    """
    from pbt_rl.runtime.run_lock import RunLock
    from pbt_rl.runtime.store import RunDirError

    store = RunStore(run_dir)
    state = store.read_json(store.state_path)
    saved = [s for s in (state.get("loggers") or []) if isinstance(s, dict) and "run_ids" in s]
    run_id = (saved[0].get("run_ids") or {}).get(str(member)) if saved else None
    if not run_id:
        return "W&B: the run has no W&B run for this member; video not logged to W&B"
    lock = RunLock(store.root, "pbt-rl eval")
    try:
        lock.acquire()
    except RunDirError as exc:  # e.g. a controller holds the run: it has the member's W&B run open
        return f"W&B: video not logged to W&B: {exc}"
    try:
        try:
            import wandb
        except ImportError:
            return "W&B: wandb is not installed (pip install 'pbt-rl[wandb]'); video not logged to W&B"

        group, job_type, prefix = run_names(config)
        run = wandb.init(project=config.logging.wandb_project, entity=config.logging.wandb_entity or None,
                         group=group, job_type=job_type, name=f"{prefix}member-{member}", id=run_id,
                         resume="allow", dir=str(store.root), mode=saved[0].get("mode") or resolve_mode(config.logging.wandb),
                         reinit="create_new", settings=wandb.Settings(console="off", x_disable_stats=True,
                                                                       save_code=False, disable_git=True))
        run.log({"env_steps": result["checkpoint_env_steps"], "eval/video": wandb.Video(str(video)),
                 "eval/return_mean": result["mean"], "eval/return_std": result["std"],
                 "eval/episodes": result["episodes"]})
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the video is written; W&B is extra
        return f"W&B: video not logged to W&B ({type(exc).__name__}: {exc})"
    finally:
        lock.release()
    return f"W&B: video logged to member {member}'s run {run_id}"
