"""One writer per run directory: an OS lock held for the whole life of a controller (or replay).

``train``, ``resume`` and ``replay`` hold an exclusive ``flock`` on ``<run.dir>/.lock``. The
kernel drops the lock when the holding process dies, however it dies (kill -9 included), so a
killed controller never blocks ``pbt-rl resume``; a live one makes every other writer refuse
with one line naming it. The file also records who holds it (pid, host, command, start time),
for that line; the content is informative only, the lock itself is the ``flock``.

On network filesystems ``flock`` is only as good as the server's lock support (NFSv4 and Lustre
with ``flock`` mounts honour it; NFSv3 without lockd does not): see docs/runtime.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from pbt_rl.runtime.run_format import LOCK_FILE, RunDirError



def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"`pbt-rl {holder['command']}` (pid {int(holder['pid'])} on {holder['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another pbt-rl process"


class RunLock:
    """An exclusive, process-lifetime lock on one run directory (see the module docstring)."""

    def __init__(self, root: Path, command: str):
        self.path = Path(root) / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunDirError` naming the holder; returns self."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot lock run directory {self.path.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise in_use_error(self.path.parent) from None
            raise RunDirError(f"cannot lock run directory {self.path.parent}: {exc.strerror or exc}") from None
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time(),
                  "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass  # the flock is what counts; the description is a courtesy
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(root: Path) -> bool:
    """True when some live process holds ``root``'s lock (used to tell stale leftovers apart)."""
    path = Path(root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this probe may have taken
    return False


def in_use_error(root: Path) -> RunDirError:
    """The one line for a run directory another live process holds."""
    return RunDirError(f"run directory {root} is in use by {_describe_holder(Path(root) / LOCK_FILE)}; "
                       "wait for it to end or stop it first")
