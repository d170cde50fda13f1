"""The run directory of one run: the only code that knows where its files are.

``RunStore`` builds every path from :attr:`RunStore.root` (absolute: nothing depends on the
working directory, so member processes and readers on other hosts can share it), creates the
directory whole, holds its one-writer lock, writes files with the disciplines of
:mod:`pbt_rl.runtime.file_io`, and reads them back as the typed rows of
:mod:`pbt_rl.runtime.run_format` (:meth:`RunStore.snapshot` for readers: report, replay, eval).
Layout and formats: docs/design.md ("Run directory", "File formats").

Member processes write their own checkpoints; everything else is written by the controller.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Any, Collection

from pbt_rl.config import ExperimentConfig, abbreviate, load_config
from pbt_rl.runtime.file_io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    read_jsonl,
    repair_jsonl,
    rewrite_jsonl,
    sha256_bytes,
)
from pbt_rl.runtime.run_format import (
    CHECKPOINT_PATTERN,
    CHECKPOINTS_DIR,
    CHECKSUM_SUFFIX,
    CONFIG_FILE,
    EVENTS_FILE,
    LINEAGE_FILE,
    MEMBERS_DIR,
    METRICS_FILE,
    POPULATION_FILE,
    REPLAY_DIR_PREFIX,
    REPORT_DIR,
    STATE_FILE,
    SUMMARY_FILE,
    WANDB_DIR,
    TENSORBOARD_DIR,
    LOGGING_STAGING_DIR,
    CheckpointError,
    EventRow,
    LineageRow,
    MetricsRow,
    Population,
    RunDirError,
    RunSnapshot,
    checkpoint_env_steps,
    checkpoint_id,
    checkpoint_member,
    json_bytes,
)

# The runtime imports these from here: this module is the run directory's API.
__all__ = ["CheckpointError", "RunDirError", "RunStore", "json_bytes", "load_run", "read_jsonl", "repair_jsonl",
           "rewrite_jsonl"]


def load_run(run_dir: Path | str) -> RunSnapshot:
    """A run directory as its readers see it (report, replay, eval): ``RunStore(run_dir).snapshot()``."""
    return RunStore(run_dir).snapshot()


class RunStore:
    """Paths, safe writes and typed reads for one run directory."""

    def __init__(self, run_dir: Path | str):
        self.root = Path(run_dir).absolute()
        self.lock = None  # a RunLock while this process is the run directory's writer

    # -- paths ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def population_path(self) -> Path:
        return self.root / POPULATION_FILE

    @property
    def lineage_path(self) -> Path:
        return self.root / LINEAGE_FILE

    @property
    def events_path(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def report_dir(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def wandb_dir(self) -> Path:
        """Where W&B's files end up when W&B is given ``root`` as its directory."""
        return self.root / WANDB_DIR

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard's event files (``logging.tensorboard``): ``member_<id>/`` and ``population/``."""
        return self.root / TENSORBOARD_DIR

    @property
    def logging_staging_dir(self) -> Path:
        """Where donor checkpoints wait, hard-linked, for the loggers that record an exploit."""
        return self.root / LOGGING_STAGING_DIR

    def replay_dir(self, member: int) -> Path:
        return self.root / f"{REPLAY_DIR_PREFIX}{member}"

    def member_dir(self, member: int) -> Path:
        return self.root / MEMBERS_DIR / str(member)

    def metrics_path(self, member: int) -> Path:
        return self.member_dir(member) / METRICS_FILE

    def checkpoint_dir(self, member: int) -> Path:
        return self.member_dir(member) / CHECKPOINTS_DIR

    checkpoint_id = staticmethod(checkpoint_id)
    checkpoint_env_steps = staticmethod(checkpoint_env_steps)
    checkpoint_member = staticmethod(checkpoint_member)

    def path(self, relative: str) -> Path:
        """The absolute path of a run-relative id (a checkpoint id)."""
        return self.root / relative

    def checksum_path(self, checkpoint: str) -> Path:
        path = self.path(checkpoint)
        return path.with_name(path.name + CHECKSUM_SUFFIX)

    def initial_files(self, config_yaml: str, population: dict, state: dict) -> dict[str, bytes]:
        """What a fresh run directory holds before any member starts, for :meth:`create`."""
        return {CONFIG_FILE: config_yaml.encode(), POPULATION_FILE: json_bytes(population), STATE_FILE: json_bytes(state)}

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
        fsync_dir(self.root.parent)
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

    # -- typed reads ------------------------------------------------------------------------
    def require_run(self) -> None:
        """RunDirError (one line) unless ``root`` is a run directory."""
        try:
            found, is_run = self.root.is_dir(), self.config_path.is_file()
        except OSError as exc:  # e.g. a path longer than the OS allows
            raise RunDirError(f"run directory {abbreviate(str(self.root))}: {exc.strerror or exc}") from None
        if not found:
            raise RunDirError(f"run directory not found: {self.root}")
        if not is_run:
            raise RunDirError(f"{self.root} is not a pbt-rl run directory (no {CONFIG_FILE})")

    def read_config(self) -> ExperimentConfig:
        return load_config(self.config_path)

    def read_population(self) -> Population:
        return Population.from_dict(self.read_json(self.population_path), where=str(self.population_path))

    def read_summary(self) -> dict | None:
        """summary.json, or None while the run is in progress (it is written when the run stops)."""
        if not self.summary_path.is_file():
            return None
        summary = self.read_json(self.summary_path)
        if not isinstance(summary, dict):
            raise RunDirError(f"{self.summary_path}: not a JSON object")
        return summary

    def read_lineage(self) -> list[LineageRow]:
        return _rows(self.lineage_path, LineageRow)

    def read_events(self) -> list[EventRow]:
        return _rows(self.events_path, EventRow)

    def read_metrics(self, member: int) -> list[MetricsRow]:
        return _rows(self.metrics_path(member), MetricsRow)

    def member_ids(self) -> list[int]:
        """Members that have a folder under members/, in id order."""
        folder = self.root / MEMBERS_DIR
        if not folder.is_dir():
            return []
        return sorted(int(child.name) for child in folder.iterdir() if child.is_dir() and child.name.isdigit())

    def snapshot(self) -> RunSnapshot:
        """Read the whole run for a reader (finished or in progress); RunDirError if it is not one."""
        self.require_run()
        config = self.read_config()
        population = self.read_population()
        lineage = tuple(self.read_lineage())
        folders = self.member_ids()
        metrics = {m: tuple(self.read_metrics(m)) for m in folders}
        steps = {m: tuple(checkpoint_env_steps(c) for c in self.list_checkpoints(m))
                 for m in sorted(set(folders) | set(population.members))}
        return RunSnapshot(root=self.root, config=config, population=population, lineage=lineage, metrics=metrics,
                           checkpoint_steps=steps, summary=self.read_summary())

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, member: int, env_steps: int, payload: dict) -> str:
        """Write a checkpoint, then its checksum, each atomically; return its id."""
        import torch

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        checkpoint = checkpoint_id(member, env_steps)
        path = self.path(checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        atomic_write_bytes(self.checksum_path(checkpoint), (sha256_bytes(data) + "\n").encode())
        return checkpoint

    def read_checkpoint_bytes(self, checkpoint: str) -> bytes:
        """The checkpoint's bytes, after checking them against its ``.sha256`` file (the one rule)."""
        try:
            data = self.path(checkpoint).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {checkpoint} not found in {self.root}") from None
        try:
            words = self.checksum_path(checkpoint).read_text(encoding="utf-8").split()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {checkpoint} has no .sha256 file (incomplete write)") from None
        expected = words[0] if words else ""  # also accepts `sha256sum` output: "<hash>  <name>"
        actual = sha256_bytes(data)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {checkpoint} is corrupt: SHA-256 {actual[:12]}... does not match {expected[:12]}..."
            )
        return data

    def verify_checkpoint(self, checkpoint: str) -> bool:
        try:
            self.read_checkpoint_bytes(checkpoint)
        except CheckpointError:
            return False
        return True

    def load_checkpoint(self, checkpoint: str, map_location: Any = "cpu") -> dict:
        import torch

        data = self.read_checkpoint_bytes(checkpoint)
        # Tensors and plain containers only (learner states keep their RNG states as tensors).
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    def list_checkpoints(self, member: int) -> list[str]:
        """Checkpoint ids of a member, oldest first (complete or not)."""
        directory = self.checkpoint_dir(member)
        if not directory.is_dir():
            return []
        steps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)))
        return [checkpoint_id(member, s) for s in steps]

    def newest_verified_checkpoint(self, member: int, *, at_most_env_steps: int | None = None,
                                   exclude: Collection[str] = (), skip_corrupt: bool = False) -> str | None:
        """The member's newest checkpoint whose ``.sha256`` matches: what eval loads and what resume
        falls back to. One without its ``.sha256`` is an interrupted write and is passed over; one
        whose checksum does not match raises :class:`CheckpointError`, unless ``skip_corrupt`` (resume,
        which records the damage as an event). None if no checkpoint qualifies."""
        for checkpoint in reversed(self.list_checkpoints(member)):
            if checkpoint in exclude or (at_most_env_steps is not None
                                         and checkpoint_env_steps(checkpoint) > at_most_env_steps):
                continue
            if not self.checksum_path(checkpoint).is_file():
                continue
            try:
                self.read_checkpoint_bytes(checkpoint)
            except CheckpointError:
                if skip_corrupt:
                    continue
                raise
            return checkpoint
        return None

    def prune_checkpoints(self, member: int, keep: int, pinned: set[str]) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints of a member, never a pinned one."""
        ids = self.list_checkpoints(member)
        removed = []
        for checkpoint in ids[: max(0, len(ids) - keep)]:
            if checkpoint in pinned:
                continue
            for victim in (self.checksum_path(checkpoint), self.path(checkpoint)):
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass
            removed.append(checkpoint)
        return removed


def _rows(path: Path, row_type: type) -> list:
    return [row_type.from_dict(raw, where=f"{path}: row {number}") for number, raw in enumerate(read_jsonl(path), start=1)]
