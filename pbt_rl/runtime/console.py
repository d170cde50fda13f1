"""Live progress on the console: plain lines, one per member, every few seconds."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def format_hyperparameters(values: Mapping[str, Any], names: tuple[str, ...]) -> str:
    return " ".join(f"{name}={format_value(values[name])}" for name in names if name in values)


def format_score(score: float | None) -> str:
    return "   n/a" if score is None or not math.isfinite(score) else f"{score:8.1f}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ConsoleProgress:
    """Prints the population table every ``interval`` seconds (no curses: logs stay readable)."""

    def __init__(self, interval: float, total_env_steps: int, names: tuple[str, ...],
                 enabled: bool = True, printer: Callable[[str], None] = print, max_wall_seconds: float = 0.0):
        self.interval = interval
        # run.max_wall_seconds, counted from this process's start (as the controller does): the
        # time left shown is at most what it still allows.
        self.max_wall_seconds = max_wall_seconds
        self._created = time.monotonic()
        self.total = total_env_steps
        self.names = names
        self.enabled = enabled
        self.printer = printer
        self._last_time = time.monotonic()
        self._last_steps: int | None = None
        self._rate = 0.0
        self._printed_at = -math.inf

    def start(self, env_steps: int) -> None:
        """The population's step count when this process started (the first rate is from here)."""
        self._last_time, self._last_steps = time.monotonic(), env_steps

    def maybe_print(self, wall_seconds: float, rows: list[dict]) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last_time < self.interval:
            return
        steps = sum(r["env_steps"] for r in rows)
        if self._last_steps is not None and now > self._last_time:
            self._rate = max(0.0, (steps - self._last_steps) / (now - self._last_time))
        self._last_time, self._last_steps = now, steps
        self.print_table(wall_seconds, rows)

    def print_table(self, wall_seconds: float, rows: list[dict], final: bool = False) -> None:
        if not self.enabled or (final and time.monotonic() - self._printed_at < 1.0):
            return
        self._printed_at = time.monotonic()
        steps = sum(r["env_steps"] for r in rows)
        budget = self.total * max(1, len(rows))
        remaining = sum(max(0, self.total - r["env_steps"]) for r in rows if r["status"] not in ("done", "abandoned"))
        left = remaining / self._rate if self._rate > 0 else math.inf
        if self.max_wall_seconds > 0:
            left = min(left, max(0.0, self.max_wall_seconds - (time.monotonic() - self._created)))
        self.printer(
            f"[{format_duration(wall_seconds):>6}] population {self._rate:,.0f} env steps/s | "
            f"{100 * steps / budget:5.1f}% of {budget:,} env steps | ~{format_duration(left)} left"
        )
        for r in rows:
            self.printer(
                f"  member {r['member']:>3} {r['env_steps']:>12,} steps  score {format_score(r['score'])}  "
                f"gen {r['generation']:>2}  {r['status']:<10} {format_hyperparameters(r['hyperparameters'], self.names)}"
            )
