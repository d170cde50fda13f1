"""The scaling tables of ``pbt-rl bench``: ``--populations`` (the same envs divided among more
members, each size's batching, a row per size and variant between raw measurements) and ``--gpus``."""

from __future__ import annotations

import pytest


def test_scaling_divides_the_same_envs_among_each_population_size():
    from pbt_rl.bench_scaling import config_at_population
    from pbt_rl.config import ConfigError, load_config

    config = load_config("configs/atari/pong_impala.yaml")  # 8 members x 128 envs in async batches of 64
    for size, envs, batch in ((8, 128, 64), (16, 64, 32), (32, 32, 16), (64, 16, 0), (1024, 1, 0)):
        sized = config_at_population(config, size)
        assert sized.pbt.population_size == size and sized.env.num_envs == envs
        # each member keeps its 2 groups while a group holds 16 envs or more, else one synchronous batch
        assert sized.env.async_batch_size == batch
        assert sized.agent == config.agent and sized.pbt.search_space == config.pbt.search_space
    with pytest.raises(ConfigError, match="--populations: 3 members cannot share the config's 1024 envs"):
        config_at_population(config, 3)


def test_members_keep_as_many_groups_as_hold_the_smallest_batch():
    from pbt_rl.bench_scaling import config_at_population, member_groups
    from pbt_rl.config import load_config

    assert member_groups(96, 4, 16) == 4  # batches of 24
    assert member_groups(48, 4, 16) == 3  # 4 groups would hold 12 envs; 3 hold 16
    assert member_groups(40, 4, 16) == 2  # 3 does not divide 40; 2 groups of 20
    assert member_groups(24, 4, 16) == 1  # no split leaves 16 in a group: one synchronous batch
    assert member_groups(8, 4, 2) == 4  # a floor as small as the config's own batch keeps its groups
    config = load_config("configs/atari/pong_impala.yaml", ["env.num_envs=32", "env.async_batch_size=8"])
    sized = config_at_population(config, 16)  # 16 envs each: batches of 8 stay, as the config chose them
    assert sized.env.num_envs == 16 and sized.env.async_batch_size == 8


def test_scaling_table_has_a_row_per_population_size():
    from pbt_rl.bench_scaling import format_scaling

    raw = {"env_steps_per_second": 1000.0, "mode": "async", "total_envs": 64, "batch_size": 32, "threads": 2}

    def size(population, rate, startup, memory, mps=False, cores=None):
        return {"population_size": population, "num_envs_per_member": 64 // population, "members_per_host": 1,
                "ratio": rate / 1000.0, "raw_around": {"before": 1010.0, "after": 990.0},
                "population": {"env_steps_per_second": rate, "startup_seconds": startup},
                "machine": {"resident_mib_max": memory, "cores_by_thread": cores}, "cuda_mps": mps}

    cores = {"pbt-envpool": 1.24, "pbt-actor": 0.5, "pbt-member": 0.21, "python": 0.05}
    text = format_scaling({"env": "CartPole-v1", "algo": "a2c", "raw": raw,
                           "sizes": [size(4, 900.0, 5.2, 1500.0, cores=cores), size(8, 850.0, 9.7, None, mps=True)]})
    assert "| 4 x 16 | 1 | 900 | 1,010 / 990 | 0.900 | 5 s | 1,500 | 1.2 / 0.7 |" in text  # envpool's, members' cores
    assert "| 8 x 8 | 1, MPS | 850 | 1,010 / 990 | 0.850 | 10 s | - | - |" in text  # hosts shared the GPU through MPS


def test_populations_refuses_bad_sizes_in_one_line(capsys):
    from pbt_rl.cli import main

    assert main(["bench", "configs/quickstart.yaml", "--populations", "8,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--populations: expected population sizes such as 8,16,32,64" in err[0]
    assert main(["bench", "configs/quickstart.yaml", "--populations", "3"]) == 2
    assert "3 members cannot share the config's 64 envs" in capsys.readouterr().err


def test_scaling_reports_each_size_as_it_is_measured(monkeypatch):
    """Raw envpool at the config's envs before the first size and after each; the header as soon as
    the first exists, then a row per size in order, its ratio to the mean of the raws either side."""
    import pbt_rl.bench as bench
    import pbt_rl.bench_raw as bench_raw
    from pbt_rl.bench_scaling import bench_scaling
    from pbt_rl.config import load_config

    calls, said, rates = [], [], iter([1000.0, 1000.0, 600.0])  # the machine slows down after the first size

    def fake_raw(config, seconds):
        calls.append(("raw", config.pbt.population_size, config.env.num_envs))
        return {"env_steps_per_second": next(rates), "mode": "sync", "total_envs": 64, "batch_size": 64, "threads": 2}

    def fake_train(config, seconds, warmup):
        calls.append(("train", config.pbt.population_size, config.env.num_envs))
        assert len(said) == 4 + sum(call[0] == "train" for call in calls) - 1  # the header, every earlier size
        return {"population": {"env_steps_per_second": 100.0 * config.pbt.population_size, "startup_seconds": 3.0},
                "exploits": 0, "machine": {"resident_mib_max": 500.0}}

    monkeypatch.setattr(bench_raw, "bench_raw_envpool", fake_raw)
    monkeypatch.setattr(bench, "train_for_bench", fake_train)
    config = load_config("configs/quickstart.yaml", ["run.total_threads=2"])  # hosts as on a 2-core machine
    result = bench_scaling(config, (2, 8), seconds=5.0, say=said.append)
    assert calls == [("raw", 4, 16), ("train", 2, 32), ("raw", 4, 16), ("train", 8, 8), ("raw", 4, 16)]
    assert said[4:] == ["| 2 x 32 | 1 | 200 | 1,000 / 1,000 | 0.200 | 3 s | 500 | - |",
                        "| 8 x 8 | 2 | 800 | 1,000 / 600 | 1.000 | 3 s | 500 | - |"]  # 800 over the mean, 800
    assert [row["population_size"] for row in result["sizes"]] == [2, 8]
    assert result["raw_rates"] == [1000.0, 1000.0, 600.0] and result["sizes"][1]["raw_around"]["drift"] == pytest.approx(-0.4)


def test_scaling_trains_each_size_then_each_variant_of_it_each_between_raws_batched_alike(monkeypatch):
    import pbt_rl.bench as bench
    import pbt_rl.bench_raw as bench_raw
    from pbt_rl.bench_scaling import bench_scaling
    from pbt_rl.config import ConfigError, load_config

    calls, said = [], []
    monkeypatch.setattr(bench_raw, "bench_raw_envpool", lambda config, seconds: calls.append(
        ("raw", config.pbt.population_size, config.env.async_batch_size)) or {
        "env_steps_per_second": 1000.0 if config.env.async_batch_size else 500.0, "mode": "sync", "total_envs": 16,
        "batch_size": 16, "threads": 2})

    def fake_train(config, seconds, warmup):
        calls.append(("train", config.pbt.population_size, config.env.async_batch_size))
        return {"population": {"env_steps_per_second": 400.0, "startup_seconds": 3.0}, "exploits": 0, "machine": {}}

    monkeypatch.setattr(bench, "train_for_bench", fake_train)
    config = load_config("configs/quickstart.yaml", ["env.async_batch_size=8", "run.total_threads=2"])  # 4 x 16 in 2 groups
    result = bench_scaling(config, (2, 4), seconds=5.0, say=said.append, variants=(["env.async_batch_size=0"],))
    assert calls == [("raw", 4, 8), ("train", 2, 16), ("raw", 4, 8),  # each size as divided: 2 groups per member
                     ("raw", 4, 0), ("train", 2, 0), ("raw", 4, 0),  # then its variant, raw synchronous too
                     ("raw", 4, 8), ("train", 4, 8), ("raw", 4, 8), ("raw", 4, 0), ("train", 4, 0), ("raw", 4, 0)]
    assert said[4:6] == ["| 2 x 32 | 1 | 400 | 1,000 / 1,000 | 0.400 | 3 s | - | - |",
                         "| 2 x 32, env.async_batch_size=0 | 1 | 400 | 500 / 500 | 0.800 | 3 s | - | - |"]
    assert [row["label"] for row in result["sizes"]] == ["", "env.async_batch_size=0"] * 2
    calls.clear()
    with pytest.raises(ConfigError, match="env.async_batch_size"):  # fits the config's 16 envs, not 8 a member
        bench_scaling(config, (2, 8), seconds=5.0, variants=(["env.async_batch_size=16"],))
    assert calls == []  # refused before any measurement


def test_gpu_scaling_grows_the_population_and_its_cores_with_the_gpus(monkeypatch):
    """--gpus 1,2,4 on a faked 4-GPU, 16-core machine: one GPU's population each, its share of cores,
    raw envpool at each size, a row said as each size is measured."""
    import pbt_rl.bench as bench
    import pbt_rl.bench_raw as bench_raw
    from pbt_rl.bench_scaling import bench_gpu_scaling
    from pbt_rl.config import load_config

    calls, said = [], []

    def fake_raw(config, seconds):
        calls.append(("raw", config.pbt.population_size, config.run.total_threads))
        return {"env_steps_per_second": 1000.0 * config.run.total_threads}

    def fake_train(config, seconds, warmup):
        calls.append(("train", config.pbt.population_size, config.run.gpus))
        assert len(said) == 3 + (len(calls) - 2) // 3  # the header and every earlier row were said already
        return {"population": {"env_steps_per_second": 900.0 * config.run.total_threads, "startup_seconds": 12.0},
                "exploits": 0, "machine": {"gpu_utilization_percent": 50.0}}

    monkeypatch.setattr(bench_raw, "bench_raw_envpool", fake_raw)
    monkeypatch.setattr(bench, "train_for_bench", fake_train)
    config = load_config("configs/atari/pong_impala.yaml", ["run.total_threads=16"])
    per_gpu = config.pbt.population_size
    result = bench_gpu_scaling(config, (1, 2, 4), seconds=5.0, visible=4, say=said.append)
    assert calls == [("raw", per_gpu, 4), ("train", per_gpu, 1), ("raw", per_gpu, 4),  # before and after each size
                     ("raw", 2 * per_gpu, 8), ("train", 2 * per_gpu, 2), ("raw", 2 * per_gpu, 8),
                     ("raw", 4 * per_gpu, 16), ("train", 4 * per_gpu, 4), ("raw", 4 * per_gpu, 16)]
    envs = config.env.num_envs
    assert said[3:] == [f"| 1 | {per_gpu} x {envs} | 4 | 4,000 / 4,000 | 3,600 | 0.900 | 900 | 12 s | 50% |",
                        f"| 2 | {2 * per_gpu} x {envs} | 8 | 8,000 / 8,000 | 7,200 | 0.900 | 900 | 12 s | 50% |",
                        f"| 4 | {4 * per_gpu} x {envs} | 16 | 16,000 / 16,000 | 14,400 | 0.900 | 900 | 12 s | 50% |"]
    assert [row["gpus"] for row in result["rows"]] == [1, 2, 4]


def test_gpus_refuses_what_the_machine_cannot_do_in_one_line(capsys, monkeypatch):
    import pbt_rl.runtime.resources as resources
    from pbt_rl.cli import main

    monkeypatch.setattr(resources, "cuda_device_count", lambda: 0)  # as on CI, wherever the test runs

    assert main(["bench", "configs/atari/pong_impala.yaml", "--gpus", "1,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus: expected GPU counts such as 1,2,4, got '1,x'" in err[0]
    assert main(["bench", "configs/atari/pong_impala.yaml", "--gpus", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus: 2 GPUs asked for but 0 are visible" in err[0]
    assert main(["bench", "configs/quickstart.yaml", "--gpus", "1", "--populations", "4"]) == 2
    assert "not with --populations" in capsys.readouterr().err
