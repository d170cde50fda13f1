"""The benchmark's arithmetic (timings themselves are never asserted)."""

from __future__ import annotations

import json

import pytest

from pbt_rl.bench import _format_fractions
from pbt_rl.bench_raw import bench_raw_envpool
from pbt_rl.bench_window import population_rate_from_metrics, time_fractions
from pbt_rl.config import from_dict
from pbt_rl.runtime.run_format import MetricsRow, RunDirError


def write_metrics(run_dir, member, points):
    path = run_dir / "members" / str(member) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"wall_seconds": t, "env_steps": s}) + "\n" for t, s in points))


def test_population_rate_interpolates_members_over_one_window(tmp_path):
    # Member 0 runs at 100 steps/s, member 1 at 300 steps/s, reporting at different moments.
    write_metrics(tmp_path, 0, [(0.0, 0), (4.0, 400), (10.0, 1000)])
    write_metrics(tmp_path, 1, [(1.0, 300), (7.0, 2100), (9.0, 2700)])
    rate = population_rate_from_metrics(tmp_path, warmup_seconds=1.0)
    # From 1 s after the last first report (1 s) to the earliest last report (9 s).
    assert rate["window_seconds"] == pytest.approx(7.0)
    assert rate["env_steps_per_second"] == pytest.approx(400.0)
    assert rate["members"] == 2


def test_population_rate_leaves_out_a_torn_last_line(tmp_path):
    # The bench reads metrics.jsonl files a controller may have been killed while appending to.
    write_metrics(tmp_path, 0, [(0.0, 0), (4.0, 400), (10.0, 1000)])
    write_metrics(tmp_path, 1, [(1.0, 300), (7.0, 2100), (9.0, 2700)])
    with open(tmp_path / "members" / "1" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"wall_seconds": 12.0, "env_steps": 36')
    rate = population_rate_from_metrics(tmp_path, warmup_seconds=1.0)
    # The same window and rate as without the torn row (it would have moved the window's end to 10 s).
    assert rate["window_seconds"] == pytest.approx(7.0)
    assert rate["env_steps_per_second"] == pytest.approx(400.0)
    # A damaged line that is not the last is an error, not a silently shorter series.
    (tmp_path / "members" / "0" / "metrics.jsonl").write_text('{"wall_seconds": 0.0, "env_steps": 0}\n{"wall\n'
                                                             '{"wall_seconds": 10.0, "env_steps": 1000}\n')
    with pytest.raises(RunDirError, match="line 2 is not valid JSON"):
        population_rate_from_metrics(tmp_path, warmup_seconds=1.0)


def test_time_fractions_sum_timing_over_rows_in_the_window(tmp_path):
    rows = [
        {"wall_seconds": 2.0, "env_steps": 100, "timing_seconds": {"wall": 2.0, "act": 1.0, "env": 0.6, "inference": 0.3, "update": 1.0}},
        {"wall_seconds": 4.0, "env_steps": 200, "timing_seconds": {"wall": 2.0, "act": 1.4, "env": 1.0, "inference": 0.3, "update": 0.4}},
        {"wall_seconds": 6.0, "env_steps": 300, "timing_seconds": {"wall": 100.0, "act": 0.0, "env": 0.0, "inference": 0.0, "update": 0.0}},
    ]
    path = tmp_path / "members" / "0" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_metrics(tmp_path, 1, [(0.0, 0), (4.0, 400)])
    # Window: 1 s after the last first report (2 s) to the earliest last report (4 s): only the
    # second row of member 0 lies inside it.
    fractions = population_rate_from_metrics(tmp_path, warmup_seconds=1.0)["time_fractions"]
    assert fractions == pytest.approx({"act": 0.7, "env": 0.5, "inference": 0.15, "update": 0.2})
    first_two = [MetricsRow.from_dict(row) for row in rows[:2]]
    assert time_fractions(first_two) == pytest.approx({"act": 0.6, "env": 0.4, "inference": 0.15, "update": 0.35})
    assert time_fractions([MetricsRow(env_steps=100, wall_seconds=1.0)]) is None
    line = _format_fractions("a2c", time_fractions(first_two))
    assert line == "member time: acting 60% (env wait 40%, inference 15%), updating 35%, other 5%"
    assert _format_fractions("impala", time_fractions(first_two)).endswith("learner thread updating 35%")


def test_population_rate_needs_a_window(tmp_path):
    write_metrics(tmp_path, 0, [(0.0, 0), (1.0, 100)])
    with pytest.raises(RuntimeError, match="window is empty"):
        population_rate_from_metrics(tmp_path, warmup_seconds=5.0)


def test_the_window_watch_asks_for_a_stop_once_the_window_is_measured(tmp_path):
    from pbt_rl.bench_window import WindowWatch

    watch = WindowWatch(tmp_path / "run", members=3, warmup_seconds=1.0, seconds=5.0, poll_seconds=0.01)
    assert not watch.measured()  # no run directory yet
    write_metrics(tmp_path / "run", 0, [(0.0, 0), (4.0, 400)])
    write_metrics(tmp_path / "run", 1, [(1.0, 300), (5.0, 700)])
    assert not watch.measured()  # a window from 2 s to 4 s: shorter than asked
    write_metrics(tmp_path / "run", 0, [(0.0, 0), (4.0, 400), (8.0, 800)])
    write_metrics(tmp_path / "run", 1, [(1.0, 300), (5.0, 700), (9.0, 1100)])  # 2 s to 8 s
    assert not watch.measured()  # long enough, but member 2 has not reported twice yet
    with watch:
        write_metrics(tmp_path / "run", 2, [(0.5, 0), (1.0, 50), (9.5, 900)])
        assert watch.stop.wait(timeout=60)
    assert watch.measured()


def test_a_bench_run_ends_once_its_window_is_measured():
    """The population's run stops when its window after the warm-up is as long as asked, not at
    its wall-time ceiling (start-up allowance + warm-up + seconds), however long start-up took."""
    from pbt_rl.bench import train_for_bench
    from pbt_rl.config import load_config

    config = load_config("configs/quickstart.yaml", ["pbt.population_size=2", "run.total_threads=2"])
    run = train_for_bench(config, seconds=2.0, warmup=1.0)
    assert run["stopped_when_measured"]
    assert run["population"]["window_seconds"] >= 2.0 and run["population"]["env_steps_per_second"] > 0


def test_raw_envpool_counts_env_steps_at_the_population_size():
    config = from_dict({
        "env": {"id": "CartPole-v1", "num_envs": 4, "async_batch_size": 2},
        "agent": {"algo": "impala"},
        "pbt": {"population_size": 2, "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-3}}},
        "run": {"total_threads": 2},
    })
    result = bench_raw_envpool(config, seconds=0.2, warmup_seconds=0.05)
    assert result["total_envs"] == 8 and result["batch_size"] == 4 and result["mode"] == "async"
    assert result["threads"] == 2
    # Whole batches of the population's batch size, counted over the measured window only.
    steps = result["env_steps"]
    assert steps >= 4 and steps % 4 == 0 and result["seconds"] >= 0.2
    assert result["env_steps_per_second"] == pytest.approx(steps / result["seconds"])


def test_a_bench_over_two_variants_prints_each_rate_hosts_and_their_ratio():
    from pbt_rl.bench import format_population_bench

    def run(label, rate, hosts):
        return {"label": label, "population": {"env_steps_per_second": rate, "window_seconds": 20.0, "members": 4},
                "exploits": 0, "machine": {}, "ratio": rate / 1000.0, "hosts": hosts}

    raw = {"env_steps_per_second": 1000.0, "mode": "async", "total_envs": 32, "batch_size": 16, "threads": 2}
    variants = [run("run.backend=local", 800.0, {"members_per_host": 1, "hosts": 4, "sharing": "turns"}),
                run("run.backend=ray", 760.0, None),
                run("run.cuda_mps=off run.members_per_host=2", 600.0,
                    {"members_per_host": 2, "hosts": 2, "sharing": "turns", "cuda_mps": False})]
    text = format_population_bench({"env": "CartPole-v1", "algo": "a2c", "population_size": 4, "num_envs_per_member": 8,
                                    "raw": raw, "population": variants[0]["population"], "ratio": 0.8,
                                    "exploits": 0, "machine": {"cpu_count": 2}, "variants": variants})
    assert "(the lines above: run.backend=local)" in text
    assert "run.backend=ray: 760 env steps/s (20 s window), ratio to raw 0.760, over the first: 0.950" in text
    assert ("run.cuda_mps=off run.members_per_host=2, 2 hosts of 2 (turns): 600 env steps/s (20 s window), "
            "ratio to raw 0.600, over the first: 0.750") in text


def test_variants_change_how_the_population_trains_but_not_what_raw_envpool_measures():
    from pbt_rl.bench import variant_configs
    from pbt_rl.config import ConfigError, load_config

    config = load_config("configs/quickstart.yaml")
    (label, variant), = variant_configs(config, [["run.cuda_mps=off", "run.members_per_host=2"]])
    assert label == "run.cuda_mps=off run.members_per_host=2"
    assert (variant.run.cuda_mps, variant.run.members_per_host) == ("off", 2)
    assert variant.env == config.env and config.run.members_per_host == 0  # the base is untouched
    # The members' env threads may change: raw envpool runs one thread per core whatever they are.
    (_, more_threads), = variant_configs(config, [["env.num_threads=4"]])
    assert more_threads.env.num_threads == 4
    # So may the batching of the same envs: raw envpool is then measured at that batching.
    (_, grouped), = variant_configs(config, [["env.async_batch_size=8"]])
    assert grouped.env.async_batch_size == 8 and grouped.env.num_envs == config.env.num_envs
    for texts, changed in ((["env.num_envs=8"], "env.num_envs"), (["pbt.population_size=8"], "pbt.population_size"),
                           (["run.total_threads=1"], "run.total_threads")):
        with pytest.raises(ConfigError, match=rf"^--variant '{texts[0]}' changes {changed}: raw envpool is measured at the config's"):
            variant_configs(config, [texts])
    with pytest.raises(ConfigError, match=r"^--variant 'run.cuda_mps=maybe': run.cuda_mps"):
        variant_configs(config, [["run.cuda_mps=maybe"]])


def test_the_cli_trains_the_config_then_each_variant_between_raw_measurements(monkeypatch, capsys):
    from pbt_rl import bench, bench_raw
    from pbt_rl.cli import main

    raws, trained = [], []
    monkeypatch.setattr(bench_raw, "bench_raw_envpool", lambda config, seconds: raws.append(config) or
                        {"env_steps_per_second": 1000.0, "mode": "sync", "total_envs": 64, "batch_size": 64,
                         "threads": 2})

    def fake_train(config, seconds, warmup):
        trained.append((config.run.host_sharing, config.run.backend))
        rate = {"turns": 900.0, "free": 450.0}[config.run.host_sharing]
        return {"population": {"env_steps_per_second": rate, "window_seconds": 10.0, "members": 4},
                "exploits": 0, "cuda_mps": False, "machine": {"cpu_count": 2}}

    monkeypatch.setattr(bench, "train_for_bench", fake_train)
    assert main(["bench", "configs/quickstart.yaml", "--variant", "run.host_sharing=free run.members_per_host=4",
                 "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert len(raws) == 3 and trained == [("turns", "local"), ("free", "local")]  # raw before, between, after
    assert "ratio population / raw: 0.900" in out and "(the lines above: the config as given)" in out
    assert ("run.host_sharing=free run.members_per_host=4, 1 host of 4 (free): 450 env steps/s (10 s window), "
            "ratio to raw 0.450, over the first: 0.500") in out
    # Each measurement is printed as it ends, before the summary: a bench cut short keeps them.
    progress = [line for line in out.splitlines() if line.startswith("measured: ")]
    assert progress == ["measured: raw envpool 1,000 env steps/s",
                        "measured: the config as given: 900 env steps/s, ratio to raw 0.900",
                        "measured: run.host_sharing=free run.members_per_host=4: 450 env steps/s, ratio to raw 0.450"]
    assert out.index(progress[-1]) < out.index("ratio population / raw: 0.900")


def test_a_variant_batching_the_envs_otherwise_is_compared_with_raw_envpool_batched_alike(monkeypatch, capsys):
    from pbt_rl import bench, bench_raw
    from pbt_rl.cli import main

    raws = []
    monkeypatch.setattr(bench_raw, "bench_raw_envpool", lambda config, seconds: raws.append(
        (config.env.async_batch_size, config.env.num_threads)) or {
        "env_steps_per_second": 1000.0 if config.env.async_batch_size else 2000.0, "mode": "sync", "total_envs": 64,
        "batch_size": 64, "threads": 2})
    monkeypatch.setattr(bench, "train_for_bench", lambda config, seconds, warmup: {
        "population": {"env_steps_per_second": 900.0, "window_seconds": 10.0, "members": 4},
        "exploits": 0, "cuda_mps": False, "machine": {"cpu_count": 2}})
    assert main(["bench", "configs/quickstart.yaml", "env.async_batch_size=8", "--variant", "env.num_threads=4",
                 "--variant", "env.async_batch_size=0", "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    # Raw before and after each population, at its own batching; the members' env threads do not
    # change what raw stepping measures, so that variant shares the measurement before it.
    assert raws == [(8, 0), (8, 0), (8, 4), (0, 0), (0, 0)]
    assert "measured: env.async_batch_size=0: 900 env steps/s, ratio to raw 0.450" in out  # 900 / 2,000
    assert "measured: env.num_threads=4: 900 env steps/s, ratio to raw 0.900" in out


def test_a_population_is_compared_with_the_mean_of_the_raw_rates_either_side_and_a_drift_is_said():
    from pbt_rl.bench_raw import DRIFT_NOTED, drift_note, raw_around

    around = raw_around({"env_steps_per_second": 1000.0}, {"env_steps_per_second": 800.0})
    assert around == {"before": 1000.0, "after": 800.0, "env_steps_per_second": 900.0, "drift": pytest.approx(-0.2)}
    assert drift_note(around) == " (raw moved -20% around it: 1,000 before, 800 after)"
    steady = raw_around({"env_steps_per_second": 1000.0}, {"env_steps_per_second": 1000.0 * (1 + 0.9 * DRIFT_NOTED)})
    assert drift_note(steady) == "" and drift_note(None) == ""  # within the noted drift, or no raw after


def test_the_bench_says_when_the_machine_drifted_around_a_population(monkeypatch, capsys):
    from pbt_rl import bench, bench_raw
    from pbt_rl.cli import main

    rates = iter([1000.0, 600.0])
    monkeypatch.setattr(bench_raw, "bench_raw_envpool", lambda config, seconds: {
        "env_steps_per_second": next(rates), "mode": "sync", "total_envs": 64, "batch_size": 64, "threads": 2})
    monkeypatch.setattr(bench, "train_for_bench", lambda config, seconds, warmup: {
        "population": {"env_steps_per_second": 720.0, "window_seconds": 10.0, "members": 4},
        "exploits": 0, "cuda_mps": False, "machine": {"cpu_count": 2}})
    assert main(["bench", "configs/quickstart.yaml", "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    drifted = " (raw moved -40% around it: 1,000 before, 600 after)"
    assert f"measured: the population: 720 env steps/s, ratio to raw 0.900{drifted}" in out  # 720 over 800
    assert "1,000 env steps/s before the population, 600 after (the ratio is to their mean)" in out
    assert f"ratio population / raw: 0.900{drifted}" in out


def test_repeats_run_the_variants_in_turn_and_report_each_ones_median(monkeypatch, capsys):
    from pbt_rl import bench, bench_raw
    from pbt_rl.cli import main

    raws, trained = [], []
    monkeypatch.setattr(bench_raw, "bench_raw_envpool", lambda config, seconds: raws.append(config) or {
        "env_steps_per_second": 1000.0, "mode": "sync", "total_envs": 64, "batch_size": 64, "threads": 2})
    rates = iter([800.0, 900.0, 600.0, 1000.0, 700.0, 950.0])  # turns, free, turns, free, turns, free

    def fake_train(config, seconds, warmup):
        trained.append(config.run.host_sharing)
        return {"population": {"env_steps_per_second": next(rates), "window_seconds": 10.0, "members": 4},
                "exploits": 0, "cuda_mps": False, "machine": {"cpu_count": 2}}

    monkeypatch.setattr(bench, "train_for_bench", fake_train)
    assert main(["bench", "configs/quickstart.yaml", "--variant", "run.host_sharing=free", "--repeats", "3",
                 "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert trained == ["turns", "free"] * 3 and len(raws) == 7  # in turn, each run between two raw measurements
    assert "measured: run.host_sharing=free (run 3 of 3): 950 env steps/s, ratio to raw 0.950" in out
    assert "ratio population / raw: 0.700 (median of 3 runs: 0.600 to 0.800)" in out  # the first variant's median
    assert ("the config as given, a process each: median ratio 0.700 (runs: 0.800, 0.600, 0.700), median 700 env "
            "steps/s, over the first's median: 1.000") in out
    assert ("run.host_sharing=free, a process each: median ratio 0.950 (runs: 0.900, 1.000, 0.950), "
            "median 950 env steps/s, over the first's median: 1.357") in out


def test_repeat_summary_groups_runs_by_variant_in_first_run_order():
    from pbt_rl.bench import repeat_summary

    def run(label, rate):
        return {"label": label, "ratio": rate / 1000, "population": {"env_steps_per_second": rate}, "hosts": None}

    summary = repeat_summary([run("b", 500.0), run("a", 900.0), run("b", 700.0), run("a", 100.0), run("b", 600.0)])
    assert [entry["label"] for entry in summary] == ["b", "a"]
    assert summary[0]["rates"] == [500.0, 700.0, 600.0] and summary[0]["median_rate"] == 600.0
    assert summary[1]["ratios"] == [0.9, 0.1] and summary[1]["median_ratio"] == pytest.approx(0.5)  # even count: mean of two


def test_bench_refuses_variants_with_another_table_in_one_line(capsys):
    from pbt_rl.cli import main

    for extra in (["--backends", "local", "--variant", "run.cuda_mps=off"],
                  ["--backends", "local", "--populations", "2,4"],
                  ["--variant", "env.num_envs=8"], ["--variant", "env.num_envs=8", "--populations", "2,4"],
                  ["--repeats", "2", "--populations", "2,4"], ["--repeats", "0"]):
        assert main(["bench", "configs/quickstart.yaml", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and any(option in err[0] for option in ("--variant", "--backends", "--repeats")), err


def test_bench_refuses_an_unknown_backend_in_one_line(capsys):
    from pbt_rl.cli import main

    assert main(["bench", "configs/quickstart.yaml", "--backends", "local,slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backends: 'slurm' is not a backend; choose from local, ray" in err[0]


def test_the_bench_names_how_its_members_share_host_processes():
    from pbt_rl.bench import _format_hosts, hosts_of
    from pbt_rl.config import load_config

    shared = hosts_of(load_config("configs/quickstart.yaml", ["pbt.population_size=8", "run.total_threads=2",
                                                              "run.host_sharing=batched"]))
    assert shared == {"members_per_host": 2, "hosts": 4, "sharing": "batched"}
    assert _format_hosts(shared) == ", 4 hosts of 2 (batched)"
    alone = hosts_of(load_config("configs/quickstart.yaml", ["run.total_threads=2"]))
    assert _format_hosts(alone) == ", a process each"
    # hosts that shared their GPU through the run's own MPS daemon (train_for_bench says which)
    assert _format_hosts({**shared, "cuda_mps": True}) == ", 4 hosts of 2 (batched, CUDA MPS)"
    assert _format_hosts({**alone, "cuda_mps": True}) == ", a process each, CUDA MPS"


def test_the_bench_prints_cores_by_thread_and_envpool_cpu_per_env_step_against_raw():
    from pbt_rl.bench import format_population_bench

    raw = {"env_steps_per_second": 40_000.0, "mode": "async", "total_envs": 1024, "batch_size": 512, "threads": 16,
           "envpool_cores": 15.2}
    population = {"env_steps_per_second": 32_000.0, "window_seconds": 12.0, "members": 8}
    machine = {"cpu_count": 16, "cores_by_thread": {"pbt-envpool": 12.8, "pbt-actor": 1.6, "pbt-member": 0.4,
                                                    "python": 0.01}}
    text = format_population_bench({"env": "Pong-v5", "algo": "impala", "population_size": 8,
                                    "num_envs_per_member": 128, "env_batch_size": 64, "raw": raw,
                                    "population": population, "ratio": 0.8, "exploits": 0, "machine": machine})
    assert "cores by thread over the window: pbt-envpool 12.80, pbt-actor 1.60, pbt-member 0.40 (total 14.8)" in text
    # 15.2 cores / 40k steps/s = 380 us; 12.8 / 32k = 400 us
    assert "envpool CPU per env step: raw 380 us, population 400 us" in text
    # actors and members' threads: 2.0 cores over 32k / 64 = 500 batches/s = 4,000 us per batch
    assert "members' threads CPU per env batch of 64: 4,000 us" in text
