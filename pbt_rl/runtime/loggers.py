"""The population loggers (W&B and others) behind one object that never stops training.

The controller calls :class:`Loggers` at each event of the run; every call reaches every
logger, and a logger that fails (network, quota, a bug) is reported once per method on the
console and otherwise ignored. The ``PopulationLogger`` protocol is in docs/design.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from pbt_rl.config import ExperimentConfig


def default_loggers(config: ExperimentConfig, run_dir: Path) -> list[Any]:
    """The W&B logger when ``logging.wandb`` is on (imported only then)."""
    if config.logging.wandb == "disabled":
        return []
    try:
        from pbt_rl.wandb_logger import WandbPopulationLogger
    except ImportError as exc:
        print(f"pbt-rl: warning: W&B logging is off: {exc}")
        return []
    return [WandbPopulationLogger(config, run_dir)]


class Loggers:
    """Fan-out to the run's loggers with failure isolation."""

    def __init__(self, loggers: Iterable[Any]):
        self.loggers = list(loggers)
        self.started = False
        self._warned: set[tuple[int, str]] = set()

    def _call(self, logger: Any, method: str, *args: Any) -> Any:
        try:
            return getattr(logger, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a logger failure must not stop training
            key = (id(logger), method)
            if key not in self._warned:
                self._warned.add(key)
                print(f"pbt-rl: warning: {type(logger).__name__}.{method} failed: {type(exc).__name__}: {exc}")
            return None

    def _each(self, method: str, *args: Any) -> None:
        for logger in self.loggers:
            self._call(logger, method, *args)

    def start(self, population: dict, saved_states: list | None = None) -> None:
        """Start every logger; on resume first give each its saved state (W&B run ids)."""
        for logger, state in zip(self.loggers, saved_states or []):
            self._call(logger, "load_state_dict", state)
        self._each("start", population)
        self.started = True

    def state_dicts(self) -> list[dict]:
        return [self._call(logger, "state_dict") or {} for logger in self.loggers]

    def progress(self, row: dict) -> None:
        self._each("log_progress", row)

    def exploit(self, row: dict, checkpoint_path: Path) -> None:
        self._each("log_exploit", row, checkpoint_path)

    def event(self, row: dict) -> None:
        if self.started:  # events of resume's reconciliation come before the loggers start
            self._each("log_event", row)

    def close(self) -> None:
        self._each("close")
