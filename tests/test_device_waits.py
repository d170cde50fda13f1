"""How a member's threads wait for the GPU (run.gpu_wait's scheduling flag, an update's sleeping
wait for its end), and unrolls concatenated for one update (host arrays, device observations)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from learner_support import cartpole_unroll
from pbt_rl.agents.rollout import Unroll


class _FakeDriver:
    """Stands in for libcuda: records the driver calls of :func:`set_gpu_wait`."""

    def __init__(self, init_status: int = 0, with_v2: bool = True) -> None:
        self.calls: list[tuple] = []
        self.init_status = init_status
        if with_v2:
            self.cuDevicePrimaryCtxSetFlags_v2 = self._set_flags

    def cuInit(self, flags):
        self.calls.append(("init", flags))
        return self.init_status

    def cuDeviceGet(self, handle, ordinal):
        self.calls.append(("device", ordinal))
        return 0

    def _set_flags(self, handle, flags):
        self.calls.append(("flags", flags.value))
        return 0


def use_driver(monkeypatch, driver) -> list[str]:
    """Make ``driver`` the CUDA driver library; returns the list of times it was loaded."""
    from pbt_rl.agents import device

    loads: list[str] = []

    def load():
        loads.append("libcuda")
        return driver

    monkeypatch.setattr(device, "load_cuda_driver", load)
    return loads


@pytest.mark.parametrize("mode, flags", [("block", 0x04), ("yield", 0x02), ("spin", 0x01)])
def test_set_gpu_wait_sets_the_primary_context_scheduling_flag(monkeypatch, mode, flags):
    from pbt_rl.agents.device import set_gpu_wait

    driver = _FakeDriver()
    use_driver(monkeypatch, driver)
    assert set_gpu_wait(torch.device("cuda:1"), mode)
    assert driver.calls == [("init", 0), ("device", 1), ("flags", flags)]


def test_set_gpu_wait_changes_nothing_without_a_usable_driver(monkeypatch):
    from pbt_rl.agents.device import set_gpu_wait

    loads = use_driver(monkeypatch, _FakeDriver())
    assert not set_gpu_wait(torch.device("cpu"), "block")
    assert not set_gpu_wait(torch.device("cuda"), "auto")
    assert loads == []  # a CPU learner, or CUDA's own choice, never touches the driver
    use_driver(monkeypatch, None)  # no libcuda.so.1
    assert not set_gpu_wait(torch.device("cuda"), "block")
    use_driver(monkeypatch, _FakeDriver(with_v2=False))
    assert not set_gpu_wait(torch.device("cuda"), "block")
    failing = _FakeDriver(init_status=100)  # CUDA_ERROR_NO_DEVICE
    use_driver(monkeypatch, failing)
    assert not set_gpu_wait(torch.device("cuda"), "block")
    assert ("flags", 0x04) not in failing.calls


class _FakeEvent:
    """A recorded CUDA event that has happened after ``pending`` queries."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.queries > self.pending


def test_a_learners_update_end_sleeps_until_the_device_is_done_and_not_at_all_on_the_cpu(monkeypatch):
    from pbt_rl.agents import device

    sleeps: list[float] = []
    monkeypatch.setattr(device.time, "sleep", sleeps.append)
    event = _FakeEvent(2)
    device.sleep_until(event, 0.5)
    assert sleeps == [0.5, 0.5] and event.queries == 3
    sleeps.clear()
    device.sleep_until_done(torch.device("cpu"))  # nothing queued anywhere: returns at once
    assert sleeps == []


def test_unrolls_concatenate_side_by_side_with_their_dtypes_and_observations_on_a_device_stay_tensors():
    first, second = cartpole_unroll(4, 2, seed=0), cartpole_unroll(4, 3, seed=1)
    second.policy_version = 5
    joined = Unroll.concatenate([first, second])
    for name in ("obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid", "policy_updates"):
        expected = np.concatenate([getattr(first, name), getattr(second, name)], axis=1)
        np.testing.assert_array_equal(getattr(joined, name), expected, err_msg=name)
        assert getattr(joined, name).dtype == expected.dtype, name
    assert joined.num_envs == 5 and joined.policy_version == 0
    on_device = [dataclasses.replace(u, obs=torch.from_numpy(u.obs)) for u in (first, second)]  # as the device rings cut
    joined_tensors = Unroll.concatenate(on_device)
    assert isinstance(joined_tensors.obs, torch.Tensor)
    np.testing.assert_array_equal(joined_tensors.obs.numpy(), joined.obs)
