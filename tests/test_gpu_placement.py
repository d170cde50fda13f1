"""Members over the GPUs of one machine (runtime/resources.py), with faked GPU counts: every GPU
the run uses gets its share, a host's members share one GPU, and impossible requests are one line."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbt_rl.config import ConfigError, from_dict
from pbt_rl.runtime.resources import gpu_index, hosts_layout, member_devices, run_gpus


def gpu_config(population: int, device: str = "auto", **run) -> object:
    return from_dict({
        "agent": {"device": device},
        "pbt": {"population_size": population,
                "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-3}}},
        "run": {"total_threads": 16, **run},
    })


def test_auto_spreads_the_population_over_every_visible_gpu():
    # 16 members on 16 cores: a process each, 8 per GPU on 2 GPUs, 4 per GPU on 4.
    assert member_devices(gpu_config(16), visible=2) == ["cuda:0"] * 8 + ["cuda:1"] * 8
    assert collections.Counter(member_devices(gpu_config(32), visible=4)) == {f"cuda:{g}": 8 for g in range(4)}
    assert member_devices(gpu_config(4), visible=1) == ["cuda:0"] * 4  # one GPU: as before
    assert member_devices(gpu_config(4), visible=0) == ["cpu"] * 4  # auto without a GPU


def test_run_gpus_uses_the_first_n_gpus_and_refuses_more_than_are_visible():
    assert set(member_devices(gpu_config(16, gpus=2), visible=8)) == {"cuda:0", "cuda:1"}
    assert run_gpus(gpu_config(8, gpus=0), visible=8) == 8
    with pytest.raises(ConfigError, match=r"^run.gpus: 4 GPUs asked for but 2 are visible$"):
        member_devices(gpu_config(8, gpus=4), visible=2)
    with pytest.raises(ConfigError, match=r"^run.gpus: 1 GPUs asked for but 0 are visible$"):
        member_devices(gpu_config(8, gpus=1), visible=0)
    for device in ("cpu", "cuda:1"):  # members that can only be on one device
        with pytest.raises(ConfigError, match=rf"^run.gpus: 4 GPUs asked for, but agent.device is '{device}'; use"):
            gpu_config(2, gpus=4, device=device)


def test_explicit_members_per_gpu_keeps_its_blocks():
    assert member_devices(gpu_config(8, members_per_gpu=2), visible=2) == [
        "cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_hosts_of_several_members_stay_on_one_gpu():
    # 64 members on 16 cores: 16 hosts of 4, 4 hosts per GPU on 4 GPUs.
    config = gpu_config(64)
    devices = member_devices(config, visible=4)
    per_host, hosts = hosts_layout(config)
    assert (per_host, hosts) == (4, 16)
    for host in range(hosts):
        assert len(set(devices[host * per_host:(host + 1) * per_host])) == 1
    assert collections.Counter(devices) == {f"cuda:{g}": 16 for g in range(4)}


@settings(max_examples=300, deadline=None)
@given(population=st.integers(1, 96), per_host=st.integers(1, 16), gpus=st.integers(1, 8))
def test_auto_placement_is_balanced_by_host_and_never_splits_one(population, per_host, gpus):
    per_host = min(per_host, population)
    hosts = -(-population // per_host)
    placed = [gpu_index(i, gpus, 0, per_host=per_host, population_size=population) for i in range(population)]
    assert all(0 <= g < gpus for g in placed)
    by_host = [set(placed[h * per_host:(h + 1) * per_host]) for h in range(hosts)]
    assert all(len(s) == 1 for s in by_host)  # a host's members share its GPU
    hosts_per_gpu = collections.Counter(next(iter(s)) for s in by_host)
    assert max(hosts_per_gpu.values()) - min(hosts_per_gpu.get(g, 0) for g in range(min(gpus, hosts))) <= 1
    assert len(hosts_per_gpu) == min(gpus, hosts)  # as many GPUs used as there are hosts to put on them
    assert placed == sorted(placed)  # contiguous blocks: hosts 0.. on the first GPU
