"""The console view: plain periodic lines off a terminal, a live table redrawn in place on one.

The live view is checked in a pseudo-terminal: a child process drives ``ConsoleProgress`` with
commands read from a pipe (so the test decides when each update happens, not a clock), its
stdout is the terminal, and the test reads back what the terminal received.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time

from pbt_rl.runtime.console import ConsoleProgress

NAMES = ("lr",)


def rows_at(steps, scores, generations=(0, 1, 2), status="training"):
    return [{"member": i, "env_steps": s, "score": score, "generation": g, "status": status,
             "hyperparameters": {"lr": 0.001 * (i + 1)}}
            for i, (s, score, g) in enumerate(zip(steps, scores, generations))]


FIRST = rows_at((0, 100, 200), (None, 1.0, 2.0))  # member 2 best
SECOND = rows_at((500, 600, 700), (9.5, 1.0, 2.0))  # member 0 best


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def plain_view(**kwargs):
    lines: list[str] = []
    clock = Clock()
    view = ConsoleProgress(1.0, 1000, NAMES, printer=lines.append, clock=clock, **kwargs)
    return view, lines, clock


def test_plain_lines_every_interval_with_the_population_rate_and_time_left():
    view, lines, clock = plain_view()
    assert view.live is None
    view.start(0)
    clock.now = 0.5
    view.maybe_print(3.0, FIRST)
    assert lines == []  # not yet an interval since the start
    clock.now = 2.0
    view.maybe_print(5.0, FIRST)  # 300 env steps in 2 s
    assert lines == [
        "[    5s] population 150 env steps/s |  10.0% of 3,000 env steps | ~18s left",
        "  member   0            0 steps  score    n/a  gen  0  training   lr=0.001",
        "  member   1          100 steps  score      1.0  gen  1  training   lr=0.002",
        "  member   2          200 steps  score      2.0  gen  2  training   lr=0.003",
    ]
    clock.now = 2.5
    view.maybe_print(5.5, SECOND)
    assert len(lines) == 4
    clock.now = 4.0
    view.maybe_print(7.0, SECOND)  # 1500 more in 2 s; 1200 left
    assert lines[4] == "[    7s] population 750 env steps/s |  60.0% of 3,000 env steps | ~1s left"
    assert view.rate == 750.0


def test_the_final_table_is_not_repeated_within_a_second_of_the_last():
    view, lines, clock = plain_view()
    view.start(0)
    clock.now = 2.0
    view.maybe_print(5.0, FIRST)
    clock.now = 2.5
    view.print_table(5.5, FIRST, final=True)
    assert len(lines) == 4
    clock.now = 3.6
    view.print_table(6.6, rows_at((1000, 1000, 1000), (1.0, 1.0, 1.0), status="done"), final=True)
    assert len(lines) == 8 and lines[4].endswith("| 100.0% of 3,000 env steps | ~0s left")


def test_time_left_respects_the_wall_time_limit():
    lines: list[str] = []
    clock = Clock()
    view = ConsoleProgress(1.0, 10**9, (), printer=lines.append, clock=clock, max_wall_seconds=90.0)
    view.start(0)
    clock.now = 10.0
    rows = [{"member": 0, "env_steps": 10, "score": None, "generation": 0, "status": "training", "hyperparameters": {}}]
    view.maybe_print(10.0, rows)  # 1 env step/s: a billion steps would take years; the limit stops it in 80 s
    assert lines[0].endswith("~1m20s left")


def test_a_disabled_view_prints_nothing():
    view, lines, clock = plain_view(enabled=False)
    view.start(0)
    clock.now = 5.0
    view.maybe_print(5.0, FIRST)
    view.print_table(5.0, FIRST, final=True)
    view.close()
    assert lines == [] and view.live is None


def test_the_live_table_is_drawn_by_its_own_thread_never_by_the_control_loop():
    view = ConsoleProgress(1.0, 1000, NAMES, live=True, clock=Clock())
    drawn_by: list[int] = []
    render = view.live.render
    view.live.render = lambda: (drawn_by.append(threading.get_ident()), render())[1]
    view.start(0)
    drawn_by.clear()  # rich builds the (empty) table once when the view starts
    try:
        for turn in range(2000):  # turns of the control loop: each only hands the rows over
            view.maybe_print(5.0, FIRST)
        assert view.latest == (5.0, FIRST)
        for _ in range(2400):  # a generous count of short waits for the first redraw
            if drawn_by:
                break
            time.sleep(0.05)
        assert drawn_by and threading.get_ident() not in drawn_by
    finally:
        view.close()
    view.close()  # twice is fine


# ------------------------------------------------------------------------------ in a child process

DRIVER = """
import json, sys
from pbt_rl.runtime.console import ConsoleProgress
clock = [0.0]
view = ConsoleProgress(1.0, 1000, ("lr",), clock=lambda: clock[0])
for line in sys.stdin:
    command = json.loads(line)
    clock[0] = command["clock"]
    if command["call"] == "start":
        view.start(0)
    elif command["call"] == "update":
        view.maybe_print(command["wall"], command["rows"])
    elif command["call"] == "print":
        print(command["text"])
    else:
        view.print_table(command["wall"], command["rows"], final=True)
print("the run's last words")
"""

COMMANDS = [
    {"call": "start", "clock": 0.0},
    {"call": "update", "clock": 2.0, "wall": 5.0, "rows": FIRST},
    {"call": "update", "clock": 4.0, "wall": 7.0, "rows": SECOND},
    {"call": "final", "clock": 4.5, "wall": 7.5, "rows": SECOND},
]


def child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_COLOR", "COLORTERM", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM")}
    return {**env, "COLUMNS": "120", "LINES": "40", **extra}


def start_child(stdout, env):
    return subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=stdout, stderr=stdout,
                            env=env)


def send(child, command):
    child.stdin.write((json.dumps(command) + "\n").encode())
    child.stdin.flush()


class Terminal:
    """The reading end of a pseudo-terminal: everything the child wrote to it."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.received = b""

    def read_until(self, text: str, seconds: float = 120.0) -> bool:
        """Read until ``text`` arrived (a generous bound for a loaded machine, not a timing)."""
        deadline = time.monotonic() + seconds
        while text.encode() not in self.received and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the child closed its end
                    break
                if not chunk:
                    break
                self.received += chunk
        return text.encode() in self.received


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
REDRAW = re.compile(r"\r\x1b\[2K((?:\x1b\[1A\x1b\[2K)*)")  # back to the table's first line, erasing


def plain(text: str) -> str:
    return ANSI.sub("", text)


def frames(output: str) -> tuple[list[str], list[int]]:
    """The frames the live view drew, and how many lines up each redraw went first."""
    shown = output.split("\x1b[?25l", 1)[1]  # the cursor is hidden while the table is up
    parts = REDRAW.split(shown.split("\x1b[?25h", 1)[0])
    return parts[0::2], [part.count("\x1b[1A") for part in parts[1::2]]


def member_line(frame: str, member: int) -> str:
    return next(line for line in frame.splitlines() if re.match(rf"^│ .? │ +{member} │", plain(line)))


def test_on_a_terminal_the_table_is_redrawn_in_place_with_the_best_member_highlighted():
    terminal = Terminal()
    child = start_child(terminal.slave, child_env(TERM="xterm-256color"))
    os.close(terminal.slave)
    try:
        send(child, COMMANDS[0])
        send(child, COMMANDS[1])
        assert terminal.read_until("> best member"), terminal.received
        send(child, {"call": "print", "clock": 2.0, "text": "a warning while the table is up"})
        send(child, COMMANDS[2])
        assert terminal.read_until("700"), terminal.received
        send(child, COMMANDS[3])
        child.stdin.close()
        assert terminal.read_until("the run's last words"), terminal.received
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
        os.close(terminal.master)
    output = terminal.received.decode()
    drawn, ups = frames(output)
    assert len(drawn) >= 3
    for frame, up in zip(drawn, ups):  # each redraw goes back to where the table before it started
        lines = [plain(line) for line in frame.split("\n")]
        table_starts = next(i for i, line in enumerate(lines) if line.startswith("pbt-rl "))
        assert up == len(lines) - table_starts - 1
    first = next(f for f in drawn if "200" in plain(f))
    assert "population 150 env steps/s" in plain(first) and "3 exploits" in plain(first)
    assert "300 of 3,000 env steps" in plain(first) and "ETA ~18s" in plain(first)
    header = plain(next(line for line in first.splitlines() if "member" in line and "lr" in line))
    assert all(column in header for column in ("env steps", "fitness", "gen", "status", "lr"))
    best = member_line(first, 2)
    assert plain(best).startswith("│ > │") and "\x1b[1;32m" in best  # marked and bold green
    assert "0.003" in plain(best) and "training" in plain(best)
    assert "\x1b[1;32m" not in member_line(first, 0) and plain(member_line(first, 1)).startswith("│   │")
    last = drawn[-1]
    assert "population 750 env steps/s" in plain(last) and "1,800 of 3,000" in plain(last)
    assert plain(member_line(last, 0)).startswith("│ > │") and "9.5" in plain(member_line(last, 0))
    assert not plain(member_line(last, 2)).startswith("│ > │")
    # A line printed while the table is up appears above it, and the table stays one table.
    assert "a warning while the table is up" in plain(output.split("\x1b[?25h")[0])
    assert "a warning" not in plain(last)
    after = output.split("\x1b[?25h", 1)[1]  # the cursor is back once the final table is drawn
    assert "the run's last words" in after and "│" not in after


def run_plain_child(stdout_kind: str, term: str = "xterm-256color") -> str:
    if stdout_kind == "pipe":
        child = start_child(subprocess.PIPE, child_env(TERM=term))
        out, _ = child.communicate("".join(json.dumps(c) + "\n" for c in COMMANDS).encode(), timeout=120)
        assert child.returncode == 0
        return out.decode()
    terminal = Terminal()
    child = start_child(terminal.slave, child_env(TERM=term))
    os.close(terminal.slave)
    try:
        child.communicate("".join(json.dumps(c) + "\n" for c in COMMANDS).encode(), timeout=120)
        terminal.read_until("the run's last words")
    finally:
        os.close(terminal.master)
    return terminal.received.decode().replace("\r\n", "\n")


def test_off_a_terminal_and_on_a_dumb_one_the_lines_are_plain():
    for output in (run_plain_child("pipe"), run_plain_child("pty", term="dumb")):
        assert "\x1b" not in output
        lines = output.splitlines()
        assert lines[0] == "[    5s] population 150 env steps/s |  10.0% of 3,000 env steps | ~18s left"
        assert lines[4] == "[    7s] population 750 env steps/s |  60.0% of 3,000 env steps | ~1s left"
        assert lines[5] == "  member   0          500 steps  score      9.5  gen  0  training   lr=0.001"
        assert lines[-1] == "the run's last words" and len(lines) == 9  # the final table came too soon
