"""How a run's files are written and read safely: the one place that does byte I/O on them.

Three write disciplines (docs/design.md, "Run directory"):

- whole files that must never be seen half-written (state.json, summary.json, checkpoints) are
  written to a temporary file in the same directory, flushed, fsynced, renamed over the target,
  and the directory is fsynced;
- logs (lineage.jsonl, events.jsonl, metrics.jsonl) are appended one complete line per write and
  fsynced, so after a kill -9 at most the last line is torn: :func:`read_jsonl` ignores it and
  :func:`repair_jsonl` cuts it before the next append;
- a checkpoint's ``.sha256`` is written after the checkpoint itself (``RunStore`` checks it).

The run directory is a POSIX directory that every process of the run sees at the same absolute
path (a local disk, or a shared filesystem on a cluster); these functions need only open, write,
fsync, rename and truncate from it. A storage without those guarantees replaces this module (and
the ``flock`` of run_lock.py), nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from pbt_rl.runtime.run_format import RunDirError, json_bytes, to_json


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row as one line, durably (a single write, then fsync)."""
    line = (to_json(row) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_jsonl(path: Path) -> list[Any]:
    """Rows of a JSONL file, [] if there is none.

    Only the last line can be torn (a writer killed in the middle of an append): when it has no
    newline and is not valid JSON it is ignored. Any other line that is not valid JSON is damage,
    a :class:`RunDirError` naming its line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = text.split("\n")  # the last element is "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines):  # the unterminated last line
                break
            raise RunDirError(f"{path}: line {number} is not valid JSON") from None
    return rows


def rewrite_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically (resume dropping rows past a checkpoint; replay's curve)."""
    atomic_write_bytes(path, "".join(to_json(r) + "\n" for r in rows).encode())


def repair_jsonl(path: Path) -> bool:
    """Cut a torn last line so the next append starts a fresh line; True if something was cut."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
