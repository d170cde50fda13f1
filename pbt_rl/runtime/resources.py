"""How the machine is shared among members: env threads per member, members per host process and
each member's device."""

from __future__ import annotations

import os


def machine_threads(total_threads: int = 0) -> int:
    """Env threads the whole population may use: ``run.total_threads``, or the core count."""
    return total_threads if total_threads > 0 else (os.cpu_count() or 1)


def threads_per_member(population_size: int, total_threads: int = 0, env_threads: int = 0) -> int:
    """Env worker threads for one member: ``env.num_threads`` when set, else the machine's
    threads (``run.total_threads`` or the core count) divided among members, at least 1.

    Members never ask for more threads than their share, so N members do not oversubscribe
    the cores (on CPU a member's torch also keeps to that share: runtime/host.py).
    """
    if env_threads > 0:
        return env_threads
    return max(1, machine_threads(total_threads) // max(1, population_size))


MIN_AUTO_HOSTS = 4
"""Hosts that auto makes at least, on machines with fewer cores: one host's env waits and updates
overlap another's. Measured on the 2-core CPU machine, quickstart, 4 members: 4 processes 36.3k
env steps/s, 2 hosts of 2 members taking turns 31.0k (docs/runtime.md, "Member hosts")."""


def members_per_host(population_size: int, members_per_host: int = 0, members_per_gpu: int = 0,
                     total_threads: int = 0, backend: str = "local") -> int:
    """How many members share one host process (runtime/member_host.py).

    ``run.members_per_host`` when set (at most the population). Auto (0): one host per core
    (``run.total_threads`` or the core count), but at least :data:`MIN_AUTO_HOSTS`, i.e.
    ``ceil(population / hosts)`` members each: a population larger than that does not pay an
    interpreter, a torch import and a CUDA context per member, and one no larger keeps a process
    per member. With ``run.members_per_gpu`` the count is lowered until it divides it (a host's
    members share its GPU). Members ``h*k .. h*k+k-1`` live on host ``h``. On ``run.backend: ray``
    auto is 1: Ray places each host by the resources it reserves, not by this machine's cores.
    """
    if members_per_host > 0:
        return max(1, min(members_per_host, population_size))
    if backend != "local":
        return 1
    hosts = max(1, min(population_size, max(MIN_AUTO_HOSTS, machine_threads(total_threads))))
    per_host = -(-population_size // hosts)
    while members_per_gpu > 0 and members_per_gpu % per_host:
        per_host -= 1
    return per_host


def gpu_index(member_id: int, gpus: int, members_per_gpu: int, *, per_host: int, population_size: int) -> int:
    """Which of ``gpus`` GPUs member ``member_id`` uses.

    ``run.members_per_gpu`` k > 0: members 0..k-1 on GPU 0, k..2k-1 on GPU 1, and so on (wrapping
    around when there are more members than the GPUs take). Auto (0): the population's hosts
    (``per_host`` members each) spread evenly over the GPUs, host ``h`` of ``H`` on GPU
    ``h * gpus // H``, so every GPU gets its share and a host's members share one GPU.
    """
    if members_per_gpu > 0:
        return (member_id // members_per_gpu) % gpus
    hosts = -(-population_size // per_host)
    return (member_id // per_host) * gpus // hosts


def member_device(agent_device: str, member_id: int, members_per_gpu: int, cuda_device_count: int, *,
                  per_host: int, population_size: int) -> str:
    """The torch device of one member.

    ``agent.device`` 'auto' means CUDA when there is a GPU; 'auto' and 'cuda' place the member on
    one of the ``cuda_device_count`` GPUs the run uses (:func:`gpu_index`). An explicit 'cuda:N' is
    kept for every member.
    """
    if agent_device == "cpu":
        return "cpu"
    if agent_device != "auto" and cuda_device_count <= 0:
        from pbt_rl.config import ConfigError

        raise ConfigError(f"agent.device: {agent_device!r} was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if agent_device.startswith("cuda:"):
        if int(agent_device[5:]) >= cuda_device_count:
            from pbt_rl.config import ConfigError

            raise ConfigError(f"agent.device: {agent_device!r} was asked for but only {cuda_device_count} CUDA GPU(s) "
                              f"are visible (cuda:0 to cuda:{cuda_device_count - 1})")
        return agent_device
    if cuda_device_count <= 0:
        return "cpu"
    return f"cuda:{gpu_index(member_id, cuda_device_count, members_per_gpu, per_host=per_host, population_size=population_size)}"


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def too_few_gpus(option: str, wanted: int, visible: int):
    """The one-line error for asking ``option`` for more GPUs than are visible."""
    from pbt_rl.config import ConfigError

    return ConfigError(f"{option}: {wanted} GPUs asked for but {visible} {'is' if visible == 1 else 'are'} visible")


def run_gpus(config, visible: int | None = None) -> int:
    """GPUs the run's members use: ``run.gpus`` (the first N visible), or every visible one when it
    is 0; 0 on the CPU. ``visible`` defaults to what torch sees here. (On ``run.backend: ray``
    Ray gives each host its GPU share instead: runtime/ray_backend.py.)

    Raises ConfigError when ``run.gpus`` asks for more GPUs than are visible.
    """
    if config.agent.device == "cpu":
        return 0
    visible = cuda_device_count() if visible is None else visible
    wanted = config.run.gpus if config.run.backend == "local" else 0
    if wanted > visible:
        raise too_few_gpus("run.gpus", wanted, visible)
    return min(wanted, visible) if wanted > 0 else visible


def member_devices(config, visible: int | None = None) -> list[str]:
    """Every member's device (:func:`member_device` over the run's GPUs and host layout), or the
    ConfigError a member would hit: called before anything is written."""
    gpus = run_gpus(config, visible)
    per_host, _ = hosts_layout(config)
    population = config.pbt.population_size
    return [member_device(config.agent.device, i, config.run.members_per_gpu, gpus, per_host=per_host,
                          population_size=population) for i in range(population)]


def hosts_layout(config) -> tuple[int, int]:
    """``(members per host, number of hosts)`` of a run's population (the one rule: members_per_host)."""
    run, population = config.run, config.pbt.population_size
    per_host = members_per_host(population, run.members_per_host, run.members_per_gpu, run.total_threads, run.backend)
    return per_host, -(-population // per_host)
