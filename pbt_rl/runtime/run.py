"""``train`` and ``resume``: every check first, then the run directory, its lock and the controller.

Nothing is written before the config, the devices and (for resume) every run file have passed
their checks; the run directory is then created whole (``RunStore.create``) or locked
(``RunStore.acquire``) and held until the controller returns (docs/runtime.md, "Fault model").
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Iterable

from pbt_rl.config import ExperimentConfig
from pbt_rl.runtime.backend import Backend, make_backend
from pbt_rl.runtime.controller import Controller
from pbt_rl.runtime.loggers import check_loggers, default_loggers
from pbt_rl.runtime.resources import member_devices
from pbt_rl.runtime.store import RunDirError, RunStore


def say_mps(backend: Backend) -> None:
    """One console line when the run's host processes share their GPU through its own MPS daemon."""
    daemon = getattr(backend, "mps", None)
    if daemon is not None:
        print(f"CUDA MPS: the host processes on a GPU run their kernels together through this run's daemon "
              f"({daemon.pipe_dir}; run.cuda_mps)")


def train(config: ExperimentConfig, console: bool = True, *, loggers: Iterable[Any] | None = None,
          backend: Backend | None = None, stop: threading.Event | None = None) -> dict:
    """Train a population from scratch into ``config.run_dir``; return the summary (summary.json).

    Nothing is written until every check has passed; the run directory then appears whole
    (config.yaml, population.json, state.json, members/) and stays locked until the run ends.
    ``stop``, set from another thread, ends the run as its wall-time limit would (resumable; the
    events say ``stop_requested``).
    """
    member_devices(config)
    check_loggers(config)
    store = RunStore(config.run_dir)
    # A cluster backend connects and reserves resources here: unreachable or too small, nothing is written.
    backend = backend or make_backend(config.run.backend, config)
    if loggers is None:
        loggers = default_loggers(config, store.root)
    controller = Controller(config, store, console=console, loggers=loggers, backend=backend, stop=stop)
    try:
        store.create(config.pbt.population_size, controller.initial_files(), command="train")
    except BaseException:
        backend.close()  # a cluster backend holds reserved resources until closed
        raise
    try:
        if console:
            print(f"Training {config.pbt.population_size} members ({config.agent.algo} on {config.env.id}), "
                  f"{config.run.total_env_steps:,} env steps each, {controller.threads} env thread(s) per member; "
                  f"run directory {store.root}")
            say_mps(backend)
        return controller.run()
    finally:
        store.release()


def resume(run_dir: Path | str, console: bool = True, *, loggers: Iterable[Any] | None = None,
           backend: Backend | None = None, stop: threading.Event | None = None) -> dict:
    """Continue a stopped or killed run from its run directory; return the summary.

    The run directory is locked first (another live controller: one line naming it); state.json
    and the logs are checked whole before anything in the directory changes. ``stop``: as for
    :func:`train`.
    """
    store = RunStore(run_dir)
    store.require_run()
    config = store.read_config()
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(store.root)))
    member_devices(config)
    check_loggers(config)
    backend = backend or make_backend(config.run.backend, config)  # before the lock: see train
    try:
        store.acquire("resume")
    except BaseException:
        backend.close()
        raise
    try:
        store.check_writable()
        if not store.state_path.is_file():
            raise RunDirError(f"{store.root} has no state.json, so it was not made by `pbt-rl train` of this "
                              "version (which creates the directory whole); delete it and train again")
        state = store.read_json(store.state_path)
        if loggers is None:
            loggers = default_loggers(config, store.root)
        controller = Controller(config, store, state=state, console=console, loggers=loggers, backend=backend,
                                stop=stop)
        if console:
            steps = ", ".join(f"{i}: {r.env_steps:,}" for i, r in controller.records.items())
            print(f"Resuming {store.root} (env steps per member {steps})")
            say_mps(backend)
        return controller.run()
    finally:
        backend.close()  # idempotent (the controller closes it too); covers a refused resume
        store.release()
