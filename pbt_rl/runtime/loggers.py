"""The population loggers (W&B and others) behind one object that never stops training.

The controller calls :class:`Loggers` at each event of the run; every call reaches every
logger, from a worker thread (never on the control loop), and a logger that fails (network,
quota, a bug) is reported once per method on the console and otherwise ignored. The
``PopulationLogger`` protocol is in docs/design.md.
"""

from __future__ import annotations

import collections
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable

from pbt_rl.config import ExperimentConfig


def check_loggers(config: ExperimentConfig) -> None:
    """The ConfigError an enabled logger would hit (TensorBoard not installed): called before
    anything is written."""
    if config.logging.tensorboard:
        from pbt_rl.tensorboard_logger import require_tensorboard

        require_tensorboard()


def default_loggers(config: ExperimentConfig, run_dir: Path) -> list[Any]:
    """The W&B logger when ``logging.wandb`` is on, the TensorBoard one when ``logging.tensorboard``
    is (each imported only then)."""
    loggers: list[Any] = []
    if config.logging.wandb != "disabled":
        try:
            from pbt_rl.wandb_logger import WandbPopulationLogger
        except ImportError as exc:
            print(f"pbt-rl: warning: W&B logging is off: {exc}")
        else:
            loggers.append(WandbPopulationLogger(config, run_dir))
    if config.logging.tensorboard:
        from pbt_rl.tensorboard_logger import TensorBoardPopulationLogger

        loggers.append(TensorBoardPopulationLogger(config, run_dir))
    return loggers


QUEUE_LIMIT = 10_000  # calls waiting for the loggers; beyond it, progress rows are dropped (counted)
CLOSE_SECONDS = 120.0  # how long close() waits for the loggers to drain and finish


class Loggers:
    """Fan-out to the run's loggers, off the control loop, with failure isolation.

    Every call is queued and returns at once; one worker thread makes the calls, in order, so a
    slow or hanging logger (W&B online, a network stall) never stalls the controller. A logger
    that raises is reported once per method and otherwise ignored. When ``QUEUE_LIMIT`` calls are
    waiting, new progress rows are dropped (counted in :attr:`dropped`, reported once); exploits,
    events and population rows never are. :meth:`state_dicts` answers from the loggers' states
    as of their last completed call (or the saved ones, on resume). The donor checkpoint of an
    exploit is hard-linked (or copied) into ``staging_dir`` before the call is queued, so pruning
    cannot remove it before a logger reads it; the link is removed once every logger has.
    :meth:`close` waits up to ``close_seconds`` for the queue to drain and the loggers to close.
    """

    def __init__(self, loggers: Iterable[Any], staging_dir: Path | None = None, *,
                 queue_limit: int = QUEUE_LIMIT, close_seconds: float = CLOSE_SECONDS):
        self.loggers = list(loggers)
        self.staging_dir = staging_dir
        self.queue_limit = queue_limit
        self.close_seconds = close_seconds
        self.started = False
        self.dropped = 0
        self._warned: set[tuple[int, str]] = set()
        self._states: list[dict] = [{} for _ in self.loggers]
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- the control loop's side ---------------------------------------------------------------

    def start(self, population: dict, saved_states: list | None = None) -> None:
        """Start every logger; on resume first give each its saved state (W&B run ids)."""
        if not self.loggers:
            return
        saved = list(saved_states or [])
        self._states = [dict(saved[i]) if i < len(saved) and saved[i] else {} for i in range(len(self.loggers))]
        if self.staging_dir is not None:
            shutil.rmtree(self.staging_dir, ignore_errors=True)  # links left by a killed session
        self._thread = threading.Thread(target=self._work, name="pbt-loggers", daemon=True)
        self._thread.start()
        self._submit(("start", population, saved))
        self.started = True

    def state_dicts(self) -> list[dict]:
        with self._wake:
            return [dict(state) for state in self._states]

    def progress(self, row: dict) -> None:
        self._submit(("call", "log_progress", (row,)), droppable=True)

    def exploit(self, row: dict, checkpoint_path: Path) -> None:
        if self.started:
            staged = self._stage(Path(checkpoint_path))
            self._submit(("exploit", row, staged, staged != Path(checkpoint_path)))

    def population(self, row: dict) -> None:
        """A population snapshot at a ready point (:func:`pbt_rl.runtime.summary.population_row`)."""
        self._submit(("call", "log_population", (row,)))

    def event(self, row: dict) -> None:
        if self.started:  # events of resume's reconciliation come before the loggers start
            self._submit(("call", "log_event", (row,)))

    def close(self) -> None:
        """Drain the queue and close every logger, waiting at most ``close_seconds``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._submit(("close",), force=True)
        thread.join(self.close_seconds)
        if thread.is_alive():
            with self._wake:
                left = len(self._queue)
            print(f"pbt-rl: warning: the loggers did not finish within {self.close_seconds:.0f} s "
                  f"({left} calls not made); training results are not affected")
        if self.dropped:
            print(f"pbt-rl: warning: {self.dropped} progress rows were not logged (the loggers fell behind)")
        self.started = False

    def _submit(self, item: tuple, droppable: bool = False, force: bool = False) -> None:
        if self._thread is None and not force:
            return
        with self._wake:
            if droppable and len(self._queue) >= self.queue_limit:
                self.dropped += 1
                return
            self._queue.append(item)
            self._wake.notify()

    def _stage(self, path: Path) -> Path:
        if self.staging_dir is None:
            return path
        try:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            staged = self.staging_dir / f"{uuid.uuid4().hex}-{path.name}"
            try:
                os.link(path, staged)
            except OSError:
                shutil.copyfile(path, staged)
            return staged
        except OSError:
            return path  # the logger reads the original (it may have been pruned by then)

    # -- the worker's side -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                item = self._queue.popleft()
            kind = item[0]
            if kind == "start":
                _, population, saved = item
                for logger, state in zip(self.loggers, saved):
                    self._call(logger, "load_state_dict", state)
                self._each("start", population)
            elif kind == "call":
                _, method, args = item
                self._each(method, *args)
            elif kind == "exploit":
                _, row, path, staged = item
                self._each("log_exploit", row, path)
                if staged:
                    path.unlink(missing_ok=True)
            elif kind == "close":
                self._each("close")
                return
            if kind != "call" or item[1] != "log_progress":
                states = [self._call(logger, "state_dict") or {} for logger in self.loggers]
                with self._wake:
                    self._states = [new or old for new, old in zip(states, self._states)]

    def _each(self, method: str, *args: Any) -> None:
        for logger in self.loggers:
            if method == "log_population" and not hasattr(logger, method):
                continue  # optional in the PopulationLogger protocol
            self._call(logger, method, *args)

    def _call(self, logger: Any, method: str, *args: Any) -> Any:
        try:
            return getattr(logger, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a logger failure must not stop training
            key = (id(logger), method)
            if key not in self._warned:
                self._warned.add(key)
                print(f"pbt-rl: warning: {type(logger).__name__}.{method} failed: {type(exc).__name__}: {exc}")
            return None
