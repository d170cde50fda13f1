"""Progress on the console: a live table on a terminal, plain periodic lines anywhere else.

:class:`ConsoleProgress` is what the controller calls (``start``, ``maybe_print`` at each turn of
its loop, ``print_table(final=True)`` at the end, ``close``). When stdout is a terminal (and not a
dumb one) it shows :class:`LiveTable`: one table redrawn in place by rich's own refresh thread, at
most :data:`LIVE_REFRESH_PER_SECOND` times a second, from the latest rows the controller handed
over; the control loop only stores a reference to those rows, so a slow or blocked terminal never
slows it. Anywhere else (a log file, a pipe, ``--quiet`` aside) it prints the population's lines
every ``logging.console_interval_seconds``, the same lines as ever, so logs stay readable.

A row is the controller's view of one member: ``{"member", "env_steps", "score", "generation",
"status", "hyperparameters"}``; ``generation`` counts the member's exploits, so their sum is the
population's exploits (lineage rows).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

from pbt_rl.runtime.summary import best_member

LIVE_REFRESH_PER_SECOND = 2.0  # redraws of the live table per second, at most
FINISHED = ("done", "abandoned")


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


def stdout_is_live_terminal() -> bool:
    """A terminal that can redraw in place: stdout is a TTY and TERM is not dumb."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")


class ConsoleProgress:
    """The population's progress every ``interval`` seconds (lines), or live on a terminal.

    Args:
        interval: seconds between plain lines, and the window of the env steps/s estimate.
        total_env_steps: each member's budget (``run.total_env_steps``).
        names: the searched hyperparameters, shown in this order.
        enabled: False prints nothing at all.
        printer: where plain lines go.
        max_wall_seconds: ``run.max_wall_seconds``, counted from this object's creation (as the
            controller counts it): the time left shown is at most what it still allows.
        live: True for the live table, False for plain lines; None (default): live when
            ``printer`` is ``print`` and stdout is a terminal (:func:`stdout_is_live_terminal`).
        clock: seconds, monotonic (the time source of rates and time left).
    """

    def __init__(self, interval: float, total_env_steps: int, names: tuple[str, ...],
                 enabled: bool = True, printer: Callable[[str], None] = print, max_wall_seconds: float = 0.0,
                 *, live: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.max_wall_seconds = max_wall_seconds
        self.clock = clock
        self._created = clock()
        self.total = total_env_steps
        self.names = names
        self.enabled = enabled
        self.printer = printer
        if live is None:
            live = enabled and printer is print and stdout_is_live_terminal()
        self.live = LiveTable(self) if enabled and live else None
        self._last_time = clock()
        self._last_steps: int | None = None
        self._rate = 0.0
        self._printed_at = -math.inf
        self.latest: tuple[float, list[dict]] | None = None  # (wall seconds, rows) last handed over

    @property
    def rate(self) -> float:
        """The population's env steps per second over the last ``interval`` (0 before one)."""
        return self._rate

    def start(self, env_steps: int) -> None:
        """The population's step count when this process started (the first rate is from here)."""
        self._last_time, self._last_steps = self.clock(), env_steps
        if self.live is not None:
            try:
                self.live.start()
            except ImportError:  # rich missing from a broken install: plain lines then
                self.live = None

    def maybe_print(self, wall_seconds: float, rows: list[dict]) -> None:
        """Called at every turn of the control loop; prints (or updates the rate) every ``interval``."""
        if not self.enabled:
            return
        if self.live is not None:
            self.latest = (wall_seconds, rows)  # drawn by the live table's own thread
        now = self.clock()
        if now - self._last_time < self.interval:
            return
        steps = sum(r["env_steps"] for r in rows)
        if self._last_steps is not None and now > self._last_time:
            self._rate = max(0.0, (steps - self._last_steps) / (now - self._last_time))
        self._last_time, self._last_steps = now, steps
        if self.live is None:
            self.print_table(wall_seconds, rows)

    def print_table(self, wall_seconds: float, rows: list[dict], final: bool = False) -> None:
        """The table now; ``final``: the last one (the live table stops, drawn one last time)."""
        if not self.enabled:
            return
        if self.live is not None:
            self.latest = (wall_seconds, rows)
            if final:
                self.live.stop()
            return
        if final and self.clock() - self._printed_at < 1.0:
            return
        self._printed_at = self.clock()
        self.printer(self.headline(wall_seconds, rows))
        for r in rows:
            self.printer(
                f"  member {r['member']:>3} {r['env_steps']:>12,} steps  score {format_score(r['score'])}  "
                f"gen {r['generation']:>2}  {r['status']:<10} {format_hyperparameters(r['hyperparameters'], self.names)}"
            )

    def close(self) -> None:
        """Stop the live table (if any) and give the terminal back; safe to call more than once."""
        if self.live is not None:
            self.live.stop()

    # -- what both views show ---------------------------------------------------------------

    def budget(self, rows: list[dict]) -> int:
        return self.total * max(1, len(rows))

    def time_left(self, rows: list[dict]) -> float:
        """Seconds until every unfinished member reaches its budget at the current rate."""
        remaining = sum(max(0, self.total - r["env_steps"]) for r in rows if r["status"] not in FINISHED)
        left = remaining / self._rate if self._rate > 0 else math.inf
        if self.max_wall_seconds > 0:
            left = min(left, max(0.0, self.max_wall_seconds - (self.clock() - self._created)))
        return left

    def headline(self, wall_seconds: float, rows: list[dict]) -> str:
        steps = sum(r["env_steps"] for r in rows)
        budget = self.budget(rows)
        return (f"[{format_duration(wall_seconds):>6}] population {self._rate:,.0f} env steps/s | "
                f"{100 * steps / budget:5.1f}% of {budget:,} env steps | ~{format_duration(self.time_left(rows))} left")


class LiveTable:
    """The live view: a rich table redrawn in place (rich imported only here, at ``start``)."""

    def __init__(self, progress: ConsoleProgress, refresh_per_second: float = LIVE_REFRESH_PER_SECOND):
        self.progress = progress
        self.refresh_per_second = refresh_per_second
        self._live: Any = None
        self._last: Any = None  # the last renderable drawn (shown again if a draw fails)

    def start(self) -> None:
        if self._live is not None:
            return
        from rich.console import Console
        from rich.live import Live

        # stdout and stderr printed while the table is up go above it (rich's redirection). The
        # refresh thread calls _draw; start() itself draws nothing.
        self._live = Live(get_renderable=self._draw, console=Console(), refresh_per_second=self.refresh_per_second,
                          transient=False, redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        atexit.register(self.stop)  # the cursor comes back even if the run dies

    def stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            atexit.unregister(self.stop)
            live.stop()  # draws the latest rows one last time and leaves them on screen

    def _draw(self) -> Any:
        try:
            self._last = self.render()
        except Exception:  # noqa: BLE001 - a drawing problem never stops the refresh thread
            pass
        return self._last if self._last is not None else ""

    def render(self) -> Any:
        """The headline and the table for the rows last handed over (``ConsoleProgress.latest``)."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        progress = self.progress
        wall_seconds, rows = progress.latest or (0.0, [])
        steps = sum(r["env_steps"] for r in rows)
        budget = progress.budget(rows)
        exploits = sum(r["generation"] for r in rows)
        best = best_member({r["member"]: r["score"] for r in rows})
        headline = Text(f"pbt-rl {format_duration(wall_seconds)} | population {progress.rate:,.0f} env steps/s | "
                        f"{steps:,} of {budget:,} env steps ({100 * steps / budget:.1f}%) | {exploits} exploits | "
                        f"ETA ~{format_duration(progress.time_left(rows))}", style="bold")
        table = Table(caption="> best member (highest fitness)" if best is not None else None, caption_justify="left")
        table.add_column("", width=1)
        for column in ("member", "env steps", "fitness", "gen"):
            table.add_column(column, justify="right")
        table.add_column("status")
        for name in progress.names:
            table.add_column(name, justify="right")
        for r in rows:
            hp = r["hyperparameters"]
            is_best = r["member"] == best
            table.add_row(">" if is_best else "", str(r["member"]), f"{r['env_steps']:,}", format_score(r["score"]).strip(),
                          str(r["generation"]), r["status"], *(format_value(hp[n]) if n in hp else "" for n in progress.names),
                          style="bold green" if is_best else None)
        return Group(headline, table)
