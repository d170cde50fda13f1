"""The run directory: every file a run writes, and how each is written safely.

Layout and formats are in docs/design.md ("Run directory"). Three write disciplines:

- whole files that must never be seen half-written (state.json, summary.json, checkpoints) are
  written to a temporary file in the same directory, flushed, fsynced, renamed over the target,
  and the directory is fsynced;
- logs (lineage.jsonl, events.jsonl, metrics.jsonl) are appended one complete line per write and
  fsynced, so after a kill -9 at most the last line is torn, which :func:`repair_jsonl` removes;
- checkpoints carry a ``.sha256`` file written after the checkpoint itself; a checkpoint without
  a matching checksum is treated as absent (:class:`CheckpointError`).

Member processes write their own checkpoints; everything else is written by the controller.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

from pbt_rl.config import ConfigError

CHECKPOINT_PATTERN = re.compile(r"^(\d{12})\.pt$")


class RunDirError(ConfigError):
    """The run directory cannot be used (unwritable, full, not a run, not empty): one line for the user."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or fails its SHA-256 check."""


def _json_default(value: Any) -> Any:
    # numpy scalars and tuples reach the logs through hyperparameters and returns.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a missing score is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def to_json(row: Any) -> str:
    return json.dumps(_finite_or_none(row), default=_json_default, allow_nan=False)


def _fsync_dir(directory: Path) -> None:
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
    _fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    """How the run directory's whole JSON files are encoded (NaN as null, numpy unwrapped)."""
    return (json.dumps(_finite_or_none(obj), default=_json_default, indent=1) + "\n").encode()


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


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (kill -9 during a write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number >= len(lines) - 2:  # the last, unterminated line
                break
            raise RunDirError(f"{path}: line {number + 1} is not valid JSON") from None
    return rows


def rewrite_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Replace a JSONL file atomically (used only by resume to drop rows past a checkpoint)."""
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


class RunStore:
    """Paths and safe I/O for one run directory."""

    def __init__(self, run_dir: Path | str):
        self.root = Path(run_dir).absolute()
        self.lock = None  # a RunLock while this process is the run directory's writer

    # -- paths ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def population_path(self) -> Path:
        return self.root / "population.json"

    @property
    def lineage_path(self) -> Path:
        return self.root / "lineage.jsonl"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def member_dir(self, member: int) -> Path:
        return self.root / "members" / str(member)

    def metrics_path(self, member: int) -> Path:
        return self.member_dir(member) / "metrics.jsonl"

    def checkpoint_dir(self, member: int) -> Path:
        return self.member_dir(member) / "checkpoints"

    @staticmethod
    def checkpoint_id(member: int, env_steps: int) -> str:
        """Checkpoint ids are paths relative to the run directory (docs/design.md)."""
        return f"members/{member}/checkpoints/{env_steps:012d}.pt"

    @staticmethod
    def checkpoint_env_steps(checkpoint_id: str) -> int:
        match = CHECKPOINT_PATTERN.match(Path(checkpoint_id).name)
        if not match:
            raise CheckpointError(f"not a checkpoint id: {checkpoint_id}")
        return int(match.group(1))

    @staticmethod
    def checkpoint_member(checkpoint_id: str) -> int:
        """The member whose env-step clock names the checkpoint (the one that saved it)."""
        parts = Path(checkpoint_id).parts
        if len(parts) != 4 or parts[0] != "members" or parts[2] != "checkpoints" or not parts[1].isdigit():
            raise CheckpointError(f"not a checkpoint id: {checkpoint_id}")
        return int(parts[1])

    def path(self, relative: str) -> Path:
        return self.root / relative

    # -- creation and the one-writer lock ----------------------------------------------------
    def _partial_path(self) -> Path:
        return self.root.parent / f".{self.root.name}.partial-{os.getpid()}"

    def _remove_stale_partials(self) -> None:
        """Delete half-built siblings left by a creation that was killed (no live holder)."""
        import shutil

        from pbt_rl.runtime.run_lock import is_locked

        for leftover in self.root.parent.glob(f".{self.root.name}.partial-*"):
            if leftover.is_dir() and not is_locked(leftover):
                shutil.rmtree(leftover, ignore_errors=True)

    def create(self, num_members: int, files: dict[str, bytes], command: str = "train") -> None:
        """Make a fresh run directory holding ``files`` (name -> bytes) and the member folders,
        all at once, and hold its lock.

        The directory is built under a hidden sibling name, then renamed into place, so a kill at
        any instant leaves either no run directory or a complete one that ``resume`` continues.
        Refuses a non-empty directory; an empty one is replaced.
        """
        import shutil

        from pbt_rl.runtime.run_lock import RunLock, in_use_error, is_locked

        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} exists and is not a directory; choose another run.dir")
        if self.root.is_dir() and any(self.root.iterdir()):
            if is_locked(self.root):
                raise in_use_error(self.root)
            raise RunDirError(
                f"run directory {self.root} is not empty; use `pbt-rl resume {self.root}` to continue it, "
                "or choose another run.dir"
            )
        partial = self._partial_path()
        lock, renaming = None, False
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
            partial.mkdir()
            lock = RunLock(partial, command).acquire()
            for member in range(num_members):
                (partial / self.checkpoint_dir(member).relative_to(self.root)).mkdir(parents=True)
            for name, data in files.items():
                atomic_write_bytes(partial / name, data)
            renaming = True
            os.rename(partial, self.root)
        except (OSError, RunDirError) as exc:
            if lock is not None:
                lock.release()
            shutil.rmtree(partial, ignore_errors=True)
            if renaming and isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise RunDirError(f"run directory {self.root} was created by another process meanwhile; "
                                  "choose another run.dir") from None
            if isinstance(exc, RunDirError):
                raise
            raise RunDirError(f"cannot create run directory {self.root}: {exc.strerror or exc}") from None
        _fsync_dir(self.root.parent)
        lock.path = self.root / lock.path.name
        self.lock = lock

    def acquire(self, command: str) -> None:
        """Hold this run directory's lock until :meth:`release` or the process ends (run_lock.py)."""
        from pbt_rl.runtime.run_lock import RunLock

        if self.lock is None:
            self.lock = RunLock(self.root, command).acquire()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def check_writable(self) -> None:
        """Fail early, with one line, when the directory cannot take a file."""
        if not self.root.is_dir():
            raise RunDirError(f"run directory not found: {self.root}")
        probe = self.root / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"x" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise RunDirError(f"run directory {self.root} is not writable: {exc.strerror or exc}") from None
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    # -- JSON files -------------------------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_json(path, obj)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{path} not found; is {self.root} a pbt-rl run directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            detail = "not valid JSON" if isinstance(exc, (ValueError, RecursionError)) else exc.strerror or exc
            raise RunDirError(f"cannot read {path}: {detail}") from None

    def append(self, path: Path, row: dict) -> None:
        append_jsonl(path, row)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, member: int, env_steps: int, payload: dict) -> str:
        """Write a checkpoint and its checksum atomically; return its id."""
        import torch

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        checkpoint_id = self.checkpoint_id(member, env_steps)
        path = self.path(checkpoint_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        atomic_write_bytes(path.with_name(path.name + ".sha256"), (sha256_bytes(data) + "\n").encode())
        return checkpoint_id

    def read_checkpoint_bytes(self, checkpoint_id: str) -> bytes:
        """The checkpoint's bytes, after checking them against the ``.sha256`` file."""
        path = self.path(checkpoint_id)
        checksum_path = path.with_name(path.name + ".sha256")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {checkpoint_id} not found in {self.root}") from None
        try:
            expected = checksum_path.read_text().strip()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {checkpoint_id} has no .sha256 file (incomplete write)") from None
        actual = sha256_bytes(data)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {checkpoint_id} is corrupt: SHA-256 {actual[:12]}... does not match {expected[:12]}..."
            )
        return data

    def verify_checkpoint(self, checkpoint_id: str) -> bool:
        try:
            self.read_checkpoint_bytes(checkpoint_id)
        except CheckpointError:
            return False
        return True

    def load_checkpoint(self, checkpoint_id: str, map_location: Any = "cpu") -> dict:
        import torch

        data = self.read_checkpoint_bytes(checkpoint_id)
        # Our own files: they hold numpy RNG states and plain Python objects besides tensors.
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)

    def list_checkpoints(self, member: int) -> list[str]:
        """Checkpoint ids of a member, oldest first (complete or not)."""
        directory = self.checkpoint_dir(member)
        if not directory.is_dir():
            return []
        steps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)))
        return [self.checkpoint_id(member, s) for s in steps]

    def prune_checkpoints(self, member: int, keep: int, pinned: set[str]) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints of a member, never a pinned one."""
        ids = self.list_checkpoints(member)
        removed = []
        for checkpoint_id in ids[: max(0, len(ids) - keep)]:
            if checkpoint_id in pinned:
                continue
            path = self.path(checkpoint_id)
            for victim in (path.with_name(path.name + ".sha256"), path):
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass
            removed.append(checkpoint_id)
        return removed
