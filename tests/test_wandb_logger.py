"""W&B population logger in offline mode, checked by reading back the .wandb transaction logs."""

from __future__ import annotations

import json

import pytest

from pbt_rl.config import from_dict
from pbt_rl.runtime.file_io import read_jsonl
from pbt_rl.wandb_logger import WandbPopulationLogger, resolve_mode
from test_report import experiment_dict, write_synthetic_run
from runtime_support import wait_until
from wandb_records import find_log_files, read_records


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep every W&B side file inside tmp_path and the console quiet; no credentials."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


def test_online_falls_back_to_offline_without_credentials(tmp_path):
    netrc_file = tmp_path / "netrc"
    assert resolve_mode("online", {"NETRC": str(netrc_file)}) == "offline"
    assert resolve_mode("online", {"NETRC": str(netrc_file), "WANDB_API_KEY": "x" * 40}) == "online"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_mode("online", {"NETRC": str(netrc_file)}) == "online"
    # A key for another host does not count for the default host.
    assert resolve_mode("online", {"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    assert resolve_mode("offline", {}) == "offline"
    assert resolve_mode("disabled", {"WANDB_API_KEY": "x" * 40}) == "disabled"


def test_disabled_logger_never_opens_runs(tmp_path):
    config = from_dict(experiment_dict(tmp_path / "run"))
    logger = WandbPopulationLogger(config, tmp_path / "run")
    logger.start({"members": {"0": {"seed": 1, "hyperparameters": {"lr": 0.1}}}})
    logger.log_progress({"member": 0, "env_steps": 10, "hyperparameters": {"lr": 0.1}})
    assert logger.state_dict()["run_ids"] == {}
    assert not (tmp_path / "run" / "wandb").exists()
    logger.close()


def _history(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item})
    return rows


def _of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_offline_logging_and_resume(wandb_env):
    run_dir = write_synthetic_run(wandb_env / "run", config_sections={"logging": {"wandb": "offline"}})
    config = from_dict(experiment_dict(run_dir, logging={"wandb": "offline"}))
    population = json.loads((run_dir / "population.json").read_text())
    lineage = read_jsonl(run_dir / "lineage.jsonl")
    metrics = {m: read_jsonl(run_dir / "members" / str(m) / "metrics.jsonl") for m in (0, 1, 2)}
    for row in lineage:  # the donor checkpoint files the runtime would pass
        path = run_dir / row["donor_checkpoint"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"weights of member {row['donor']} at {row['donor_env_steps']}".encode())

    def drive(logger, until_steps: int, after_steps: int = -1) -> None:
        events = [(r["env_steps"], 0, r) for rows in metrics.values() for r in rows]
        events += [(r["env_steps"], 1, r) for r in lineage]  # an exploit follows the progress row
        for steps, is_exploit, row in sorted(events, key=lambda e: (e[0], e[1], e[2]["member"])):
            if after_steps < steps <= until_steps:
                if is_exploit:
                    logger.log_exploit(row, run_dir / row["donor_checkpoint"])
                else:
                    logger.log_progress(row)

    logger = WandbPopulationLogger(config, run_dir)
    logger.start(population)
    drive(logger, until_steps=150)  # exploit A (member 2 at 100) happens in the first session
    logger.log_event({"time": 1.0e9, "wall_seconds": 1.0, "event": "member_restarted", "member": 0, "env_steps": 150})
    state = json.loads(json.dumps(logger.state_dict()))  # as stored in state.json
    logger.close()
    run_ids = {int(m): run_id for m, run_id in state["run_ids"].items()}
    assert sorted(run_ids) == [0, 1, 2] and len(set(run_ids.values())) == 3

    resumed = WandbPopulationLogger(config, run_dir)
    resumed.load_state_dict(state)
    resumed.start(population)
    assert resumed.run_ids == run_ids
    drive(resumed, until_steps=300, after_steps=150)  # exploits B (member 1 at 200) and C (member 0 at 250)
    resumed.close()

    wandb_dir = run_dir / "wandb"
    logs = {m: find_log_files(wandb_dir, run_id) for m, run_id in run_ids.items()}
    assert all(len(files) == 2 for files in logs.values()), logs  # one log per session, same run id

    # Member 2, first session: identity, hp/lr before and after exploit A at env step 100.
    first = read_records(logs[2][0])
    run_record = _of_type(first, "run")[0]
    assert (run_record.run_id, run_record.run_group, run_record.job_type, run_record.display_name) == (
        run_ids[2], "synthetic", "pbt-member", "member-2")
    history = _history(first)
    lr_by_step = [(h["env_steps"], h["hp/lr"]) for h in history if "hp/lr" in h]
    assert lr_by_step == [(50, 0.03), (100, 0.03), (100, 0.012), (150, 0.012)]
    exploit_point = next(h for h in history if "exploit/donor" in h)
    assert (exploit_point["env_steps"], exploit_point["exploit/donor"], exploit_point["exploit/generation"]) == (100, 0, 1)
    assert {m.glob_name: m.step_metric for m in _of_type(first, "metric") if m.glob_name} == {"*": "env_steps"}

    # Config: the initial values at init, then the parent and the new hyperparameters at the exploit.
    initial_config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert initial_config["parent"] is None and initial_config["hp"] == {"lr": 0.03, "entropy_cost": 0.3}
    updates = [{u.key: json.loads(u.value_json) for u in c.update} for c in _of_type(first, "config")]
    exploit_update = next(u for u in updates if "parent" in u)
    assert exploit_update["parent"] == 0 and exploit_update["generation"] == 1
    assert exploit_update["hp"] == {"lr": 0.012, "entropy_cost": 0.1}

    # The member's new weights as a model artifact with its lineage metadata.
    models = [a for a in _of_type(first, "artifact") if a.type == "model"]
    assert len(models) == 1 and models[0].name == "synthetic-member-2"
    metadata = json.loads(models[0].metadata)
    assert (metadata["member"], metadata["parent"], metadata["generation"]) == (2, 0, 1)

    # The incremental lineage table: one increment with exploit A's row.
    table_files = [f.path for fr in _of_type(first, "files") for f in fr.files if f.path.startswith("media/table/lineage")]
    assert len(table_files) == 1
    table = json.loads((logs[2][0].parent / "files" / table_files[0]).read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert len(table["data"]) == 1
    assert (row["env_steps"], row["member"], row["donor"], row["donor_env_steps"]) == (100, 2, 0, 100)
    assert (row["old/lr"], row["new/lr"], row["op/lr"]) == (0.03, 0.012, "*1.2")
    assert any(a.type == "wandb-run-incremental-table" for a in _of_type(first, "artifact"))

    # Events count in the member's own run only.
    assert any(h.get("events/member_restarted") == 1 for h in _history(read_records(logs[0][0])))
    assert not any("events/member_restarted" in h for h in _history(read_records(logs[1][0])))

    # Member 1's resumed session appends to the same run: exploit B at 200 from member 2.
    second = read_records(logs[1][1])
    assert _of_type(second, "run")[0].run_id == run_ids[1]
    steps = [h["env_steps"] for h in _history(second)]
    assert min(steps) == 200 and max(steps) == 300
    lr_by_step = [(h["env_steps"], h["hp/lr"]) for h in _history(second) if "hp/lr" in h]
    assert lr_by_step[:3] == [(200, 0.02), (200, 0.0144), (250, 0.0144)]
    # The resumed run starts from the config it had (parent still None before exploit B) ...
    resumed_config = {u.key: json.loads(u.value_json) for u in _of_type(second, "run")[0].config.update}
    assert resumed_config["member"] == 1 and resumed_config["parent"] is None
    # ... and member 2's resumed run keeps exploit A's parent in its config.
    member2_resumed = {u.key: json.loads(u.value_json) for u in _of_type(read_records(logs[2][1]), "run")[0].config.update}
    assert member2_resumed["parent"] == 0 and member2_resumed["hp"]["lr"] == 0.012
    models = [json.loads(a.metadata) for a in _of_type(second, "artifact") if a.type == "model"]
    assert [(m["member"], m["parent"], m["generation"]) for m in models] == [(1, 2, 1)]


def test_the_population_run_holds_best_and_median_fitness_a_table_per_ready_point_and_the_lineage(wandb_env):
    run_dir = write_synthetic_run(wandb_env / "run", config_sections={"logging": {"wandb": "offline"}})
    config = from_dict(experiment_dict(run_dir, logging={"wandb": "offline"}))
    population = json.loads((run_dir / "population.json").read_text())
    lineage = read_jsonl(run_dir / "lineage.jsonl")
    checkpoint = run_dir / lineage[0]["donor_checkpoint"]
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"donor weights")

    def snapshot(wall: float, fitness: list) -> dict:
        members = [{"member": m, "env_steps": 100 * (m + 1), "fitness": f, "generation": 0, "status": "training",
                    "hyperparameters": {"lr": 0.01 * (m + 1), "entropy_cost": 0.1}} for m, f in enumerate(fitness)]
        scored = sorted(f for f in fitness if f is not None)
        return {"time": 1.0e9 + wall, "wall_seconds": wall, "env_steps": 600, "exploits": 0, "members": members,
                "best_member": fitness.index(scored[-1]) if scored else None,
                "best_fitness": scored[-1] if scored else None,
                "median_fitness": scored[len(scored) // 2] if scored else None}

    logger = WandbPopulationLogger(config, run_dir)
    logger.start(population)
    logger.log_population(snapshot(5.0, [None, None, None]))
    logger.log_population(snapshot(9.0, [1.0, 3.0, 2.0]))
    logger.log_exploit(lineage[0], checkpoint)
    run_id = logger.state_dict()["population"]["run_id"]
    logger.close()

    (log,) = find_log_files(run_dir / "wandb", run_id)
    # wandb-core writes the log from its own process: wait (bounded) until the run's exit record is in.
    assert wait_until(lambda: bool(_of_type(read_records(log), "exit")))
    records = read_records(log)
    run_record = _of_type(records, "run")[0]
    assert (run_record.run_group, run_record.job_type, run_record.display_name) == ("synthetic", "population", "population")
    history = _history(records)
    points = [h for h in history if "exploits" in h]
    assert [(h["wall_seconds"], h.get("best_fitness"), h.get("median_fitness"), h.get("best_member")) for h in points] == [
        (5.0, None, None, None), (9.0, 3.0, 2.0, 1)]
    tables = sorted(f.path for fr in _of_type(records, "files") for f in fr.files if f.path.startswith("media/table/"))
    population_tables = [t for t in tables if t.startswith("media/table/population")]
    assert len(population_tables) == 2 and any(t.startswith("media/table/lineage") for t in tables)
    last = json.loads((log.parent / "files" / population_tables[-1]).read_text())
    rows = [dict(zip(last["columns"], data)) for data in last["data"]]
    assert [(r["ready_point"], r["member"], r["fitness"], r["hp/lr"]) for r in rows] == [
        (2, 0, 1.0, 0.01), (2, 1, 3.0, 0.02), (2, 2, 2.0, 0.03)]
