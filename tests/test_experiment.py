"""``pbt-rl experiment``: specs checked whole, arms x seeds as ordinary runs, resumable, results.

End-to-end runs use fake learners in threads (tests/runtime_support.py): seconds, not minutes.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pbt_rl.cli import main
from pbt_rl.config import ConfigError, dump_yaml
from pbt_rl.experiment.runner import exit_code, run_experiment
from pbt_rl.experiment.spec import load_spec
from pbt_rl.runtime.store import RunStore
from runtime_support import fake_config, make_fake_learner, threaded_backend

ARMS = {"pbt": {}, "random_search": {}, "pb2": {}, "hand_tuned": {}, "fast_ready": {"pbt.ready_after_steps": 200}}


def write_spec(tmp_path, **fields):
    base = tmp_path / "base.yaml"
    base.write_text(dump_yaml(fake_config(tmp_path / "unused", run={"total_env_steps": 2000})))
    spec = {"base": "base.yaml", "dir": str(tmp_path / "exp"), "seeds": [0, 1], "arms": ARMS,
            "thresholds": [80.0, 1e9], "replay": {"seeds": [500, 501]}, **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(spec_path, *overrides):
    return run_experiment(load_spec(spec_path, list(overrides)), console=True, backend=threaded_backend,
                          loggers=lambda: [], replay_learner=make_fake_learner)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One whole experiment, trained once for the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("experiment")
    spec_path = write_spec(tmp_path)
    outcome = run(spec_path)
    return tmp_path, spec_path, outcome


# ---------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("fields,words", [
    ({"seeds": []}, "seeds"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"seeds": [-1]}, "seeds"),
    ({"arms": {}}, "arms"),
    ({"arms": {"pbt": {"run.seed": 3}}}, "arms.pbt.run.seed"),
    ({"arms": {"pbt": {}, "bigger": {"pbt.population_size": 8}}}, "equal budgets"),
    ({"arms": {"pbt": {"pbt.exploit": "greedy"}}}, "pbt.exploit"),
    ({"arms": {"a/b": {}}}, "folder name"),
    ({"base": "missing.yaml"}, "base"),
    ({"compare": "nope"}, "compare"),
    ({"thresholds": "high"}, "thresholds"),
    ({"seed": [0]}, "unknown key 'seed'"),
    ({"replay": {"arm": "nope", "seeds": 2}}, "replay.arm"),
    ({"replay": {"seeds": [1, 1]}}, "replay.seeds"),
    ({"replay": {"seeds": 2}, "arms": {"pbt": {}, "replay": {}}}, "arms.replay"),
])
def test_a_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, fields, words):
    spec_path = write_spec(tmp_path, **fields)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["experiment", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no experiment directory


def test_a_bad_command_line_override_is_refused_before_anything_is_written(tmp_path, capsys):
    spec_path = write_spec(tmp_path)
    assert main(["experiment", str(spec_path), "agent.lr=-1"]) == 2
    assert "agent.lr" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


# ---------------------------------------------------------------------------- the runs


def test_every_arm_and_seed_is_an_ordinary_finished_run(finished):
    tmp_path, _, outcome = finished
    assert exit_code(outcome) == 0
    assert set(outcome["runs"]) == {f"{arm}/seed_{s}" for arm in ARMS for s in (0, 1)} | {"replay/seed_500", "replay/seed_501"}
    for arm in ARMS:
        for seed in (0, 1):
            store = RunStore(tmp_path / "exp" / arm / f"seed_{seed}")
            assert store.read_summary()["status"] == "finished"
            assert store.read_config().run.seed == seed


def test_baselines_never_copy_and_start_as_their_definition_says(finished):
    tmp_path, _, _ = finished
    root = tmp_path / "exp"
    for seed in (0, 1):
        pbt = RunStore(root / "pbt" / f"seed_{seed}").snapshot()
        random = RunStore(root / "random_search" / f"seed_{seed}").snapshot()
        hand = RunStore(root / "hand_tuned" / f"seed_{seed}").snapshot()
        assert random.lineage == () and hand.lineage == ()
        assert random.initial_hyperparameters == pbt.initial_hyperparameters  # the same draws
        base_lr = hand.config.agent.lr
        assert {v["lr"] for v in hand.initial_hyperparameters.values()} == {base_lr}
        assert len(set(hand.seeds.values())) == len(hand.seeds)  # copies that differ by seed
        budget = pbt.config.pbt.population_size * pbt.config.run.total_env_steps
        assert budget == random.config.pbt.population_size * random.config.run.total_env_steps
    pb2 = RunStore(root / "pb2" / "seed_0").snapshot()
    assert any(row.operations.get("lr") == "pb2" for row in pb2.lineage)


def test_results_json_has_per_seed_rows_arm_statistics_and_comparisons(finished):
    tmp_path, _, _ = finished
    root = tmp_path / "exp"
    results = json.loads((root / "results.json").read_text())
    assert set(results["arms"]) == set(ARMS) | {"replay"} and results["compare"] == "pbt"
    for arm in ARMS:
        rows = results["runs"][arm]
        best = [rows[f"seed_{s}"]["best_final_fitness"] for s in (0, 1)]
        stats = results["arms"][arm]["best_final_fitness"]
        assert stats["mean"] == pytest.approx(sum(best) / 2)
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
        for seed in (0, 1):
            row = rows[f"seed_{seed}"]
            assert row["median_final_fitness"] <= row["best_final_fitness"]
            assert row["env_steps"] >= 4 * 2000  # every member trained its whole budget
            assert row["thresholds"]["1e+09"] is None  # never reached
            reached = row["thresholds"]["80"]
            assert reached is None or 0 < reached["env_steps"] <= 2000
    for arm in set(ARMS) - {"pbt"} | {"replay"}:
        comparison = results["comparisons"][arm]
        for key in ("welch_t_p", "mann_whitney_u_p"):
            assert comparison[key] is None or 0.0 <= comparison[key] <= 1.0
    markdown = (root / "results.md").read_text()
    assert all(f"| {arm} |" in markdown for arm in ARMS) and "Welch" in markdown
    assert (root / "best_fitness.png").stat().st_size > 0 and (root / "schedules.png").stat().st_size > 0


def test_results_are_the_same_when_written_again(finished, capsys):
    tmp_path, spec_path, _ = finished
    before = (tmp_path / "exp" / "results.json").read_text()
    assert main(["experiment", str(spec_path), "--results-only"]) == 0
    assert (tmp_path / "exp" / "results.json").read_text() == before  # seeded bootstrap


def test_running_again_skips_finished_runs_and_resumes_stopped_ones(finished, monkeypatch, capsys):
    tmp_path, spec_path, _ = finished
    target = RunStore(tmp_path / "exp" / "pb2" / "seed_1").root
    real_summary = RunStore.read_summary

    def stopped_one(store):  # as if pb2/seed_1 had been stopped before its budget
        summary = real_summary(store)
        return {**summary, "status": "stopped"} if store.root == target else summary

    resumed, trained = [], []
    import pbt_rl.runtime as runtime

    real_resume = runtime.resume
    monkeypatch.setattr(RunStore, "read_summary", stopped_one)
    monkeypatch.setattr(runtime, "resume", lambda d, **kw: resumed.append(d) or real_resume(d, **kw))
    monkeypatch.setattr(runtime, "train", lambda c, **kw: trained.append(c))
    outcome = run(spec_path)
    assert [RunStore(d).root for d in resumed] == [target] and trained == []
    out = capsys.readouterr().out
    assert out.count("before, skipped") == len(outcome["runs"]) - 1
    assert "pb2/seed_1: resuming" in out


def test_a_run_directory_made_with_another_config_is_refused_untouched(finished):
    tmp_path, spec_path, _ = finished
    store = RunStore(tmp_path / "exp" / "pbt" / "seed_0")
    state_before = store.state_path.read_bytes()
    with pytest.raises(ConfigError, match="another config"):
        run(spec_path, "pbt.fitness_window=2")
    assert store.state_path.read_bytes() == state_before


def test_results_list_missing_runs_and_leave_them_out_of_the_statistics(tmp_path):
    spec = load_spec(write_spec(tmp_path, seeds=[0]))
    from pbt_rl.experiment.results import collect

    results = collect(spec)
    assert results["runs"]["pbt"]["seed_0"] == {"status": "missing"}
    assert results["arms"]["pbt"]["best_final_fitness"]["mean"] is None
    assert not (tmp_path / "exp").exists()


def test_statistics_of_known_samples():
    from pbt_rl.experiment.results import compare, mean_ci

    stats = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and 1.0 <= stats["ci_low"] < 2.5 < stats["ci_high"] <= 4.0
    assert mean_ci([5.0])["ci_low"] is None
    separated = compare([10.0, 11.0, 12.0, 13.0], [1.0, 2.0, 3.0, 4.0])
    assert separated["mean_difference"] == 9.0
    assert separated["welch_t_p"] < 0.01 and separated["mann_whitney_u_p"] < 0.05
    same = compare([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["welch_t_p"] == pytest.approx(1.0) and same["mann_whitney_u_p"] == pytest.approx(1.0)
    assert compare([1.0], [2.0, 3.0])["welch_t_p"] is None
    assert not math.isnan(compare([1.0, 1.0], [1.0, 1.0])["mean_difference"])


def test_the_replay_arm_replays_the_best_pbt_member_on_fresh_seeds_at_one_members_budget(finished):
    tmp_path, _, _ = finished
    root = tmp_path / "exp"
    results = json.loads((root / "results.json").read_text())
    pbt_runs = results["runs"]["pbt"]
    best_seed = max(pbt_runs, key=lambda k: pbt_runs[k]["best_final_fitness"])
    source = RunStore(root / "pbt" / best_seed).snapshot()
    from pbt_rl.lineage import schedule_of

    # The replay follows the switches inside its budget (an ancestry timeline can run past it when
    # a member copied a donor that was ahead: pbt_rl/replay.py).
    budget = source.config.run.total_env_steps
    schedule = schedule_of(source, "best")
    discovered = [values for step, values in schedule if step < budget] or [schedule[0][1]]
    for seed in (500, 501):
        row = results["runs"]["replay"][f"seed_{seed}"]
        assert row["status"] == "finished" and row["source"]["run"] == f"pbt/{best_seed}"
        replayed = json.loads((root / "replay" / f"seed_{seed}" / "replay.json").read_text())
        assert replayed["seed"] == seed
        assert [s["hyperparameters"] for s in replayed["schedule"]] == discovered
        assert row["env_steps"] == source.config.run.total_env_steps  # one member's budget
    assert results["arms"]["replay"]["one_member_budget"] is True
    assert results["arms"]["replay"]["budget_env_steps_per_run"] == source.config.run.total_env_steps
    assert "replay" in results["comparisons"]
    assert "(one member's budget)" in (root / "results.md").read_text()


def test_in_wandb_an_experiment_is_one_group_arms_are_job_types_and_the_results_are_a_table(tmp_path, monkeypatch):
    from runtime_support import wait_until
    from test_wandb_logger import _of_type
    from wandb_records import read_records

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    spec_path = write_spec(tmp_path, name="tiny", seeds=[0], arms={"pbt": {}, "random_search": {}},
                           overrides={"logging.wandb": "offline", "pbt.population_size": 2}, replay=None)
    outcome = run_experiment(load_spec(spec_path), console=False, backend=threaded_backend)
    assert set(outcome["runs"].values()) == {"finished"}

    identities = {}
    for log in sorted((tmp_path / "exp").rglob("run-*.wandb")):
        assert wait_until(lambda: bool(_of_type(read_records(log), "exit")))
        records = read_records(log)
        run = _of_type(records, "run")[0]
        identities[run.display_name] = (run.run_group, run.job_type, records)
    assert {name: ident[:2] for name, ident in identities.items()} == {
        "tiny-pbt-seed_0/member-0": ("tiny", "pbt"), "tiny-pbt-seed_0/member-1": ("tiny", "pbt"),
        "tiny-pbt-seed_0/population": ("tiny", "pbt/population"),
        "tiny-random_search-seed_0/member-0": ("tiny", "random_search"),
        "tiny-random_search-seed_0/member-1": ("tiny", "random_search"),
        "tiny-random_search-seed_0/population": ("tiny", "random_search/population"),
        "tiny/results": ("tiny", "experiment"),
    }
    records = identities["tiny/results"][2]
    (table_path,) = [f.path for fr in _of_type(records, "files") for f in fr.files if f.path.startswith("media/table/results")]
    log = next(p for p in (tmp_path / "exp").rglob("run-*.wandb") if read_records(p) and
               _of_type(read_records(p), "run")[0].display_name == "tiny/results")
    table = json.loads((log.parent / "files" / table_path).read_text())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert set(rows) == {"pbt", "random_search"}
    for arm, row in rows.items():
        assert row["best_final_fitness_mean"] == results["arms"][arm]["best_final_fitness"]["mean"]
        assert row["runs"] == 1


def test_the_shipped_cpu_spec_runs_end_to_end_with_real_learners_at_a_short_budget(tmp_path):
    """configs/experiments/cartpole_arms.yaml as shipped (its arms, seeds, thresholds and replay),
    with real A2C learners as threads and a budget cut to 4,000 env steps per member."""
    from pathlib import Path

    from pbt_rl.agents import make_learner
    from pbt_rl.runtime import InProcessBackend

    shipped = Path(__file__).resolve().parent.parent / "configs" / "experiments" / "cartpole_arms.yaml"
    raw = yaml.safe_load(shipped.read_text())
    raw["base"] = str(shipped.parent / raw["base"])
    raw["dir"] = str(tmp_path / "exp")
    spec_path = tmp_path / "cartpole_arms.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = load_spec(spec_path, ["run.total_env_steps=4000", "pbt.burn_in_steps=1000", "pbt.ready_after_steps=1000"])
    outcome = run_experiment(spec, console=False, backend=lambda: InProcessBackend(make_learner), loggers=lambda: [],
                             replay_learner=make_learner)
    assert set(outcome["runs"].values()) == {"finished"} and len(outcome["runs"]) == 4 * 3 + 3
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert set(results["arms"]) == {"pbt", "random_search", "pb2", "hand_tuned", "replay"}
    budgets = {arm: stats["budget_env_steps_per_run"] for arm, stats in results["arms"].items()}
    assert budgets == {"pbt": 16000, "random_search": 16000, "pb2": 16000, "hand_tuned": 16000, "replay": 4000}
    assert all(stats["runs"] == 3 for stats in results["arms"].values())
    assert set(results["comparisons"]) == {"random_search", "pb2", "hand_tuned", "replay"}
