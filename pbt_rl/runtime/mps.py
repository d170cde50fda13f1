"""CUDA MPS (Multi-Process Service) for the member hosts of one machine (``run.cuda_mps``).

Without MPS, the CUDA contexts of several processes on one GPU take turns on it (time slicing):
one process's small kernels run while every other process waits, however little of the GPU
they fill. Through an MPS server, the hosts' kernels run on the GPU at the same time. Measured on
the GPU machine (one H200, 16 cores), 2026-12-06, Pong IMPALA, 64 members x 16 envs as 16 hosts
of 4 (``pbt-rl bench``): 19,405 env steps/s time-slicing, 35,212 through MPS (docs/runtime.md,
"CUDA MPS").

``run.cuda_mps``:

- ``auto``: a private MPS control daemon for the run when two or more host processes share a
  GPU and ``nvidia-cuda-mps-control`` is on the PATH, unless an MPS daemon is in use already
  (``CUDA_MPS_PIPE_DIRECTORY`` is set, or the default pipe directory has a control pipe): the
  hosts then use that one;
- ``on``: a private daemon whenever a host is on a GPU; no ``nvidia-cuda-mps-control`` is a
  one-line error before anything is written;
- ``off``: never.

The daemon's pipes live in a directory of its own under the temporary directory, named with the
controller's pid. The backend stops the daemon when it closes (after its hosts have ended). A
controller can also end without closing anything (SIGTERM, SIGKILL, a crash): for that, a small
watcher process (this file run by ``python -I``: the standard library only, no torch; in a
session of its own, so that Ctrl-C does not reach it) holds the read end of a pipe from the controller, and when that pipe closes, for
whatever reason, it quits the daemon and removes its directory. A daemon left even so (its watcher
killed too) is stopped by the next run that starts one (:func:`sweep_orphans`). Only the local
backend starts one: on Ray, start MPS on the nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
PREFIX = "pbt-rl-mps-"
START_SECONDS = 10.0
"""How long a started daemon may take to open its control pipe."""
COMMAND_SECONDS = 10.0
"""How long one call of the control program may take."""


class MpsError(RuntimeError):
    """The MPS daemon could not be started."""


def hosts_per_gpu(devices: list[str], per_host: int) -> int:
    """The most host processes that share one CUDA GPU, given every member's device (member ``i``
    on host ``i // per_host``; a host's members share its device)."""
    hosts = {member // per_host: device for member, device in enumerate(devices)}
    counts = Counter(device for device in hosts.values() if device.startswith("cuda"))
    return max(counts.values(), default=0)


def existing_daemon(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The pipe directory of an MPS daemon already in use by this environment, or None."""
    if environ.get(PIPE_ENV):
        return environ[PIPE_ENV]
    return DEFAULT_PIPE_DIR if Path(DEFAULT_PIPE_DIR, "control").exists() else None


def wanted(setting: str, sharing_hosts: int, control: str | None, existing: str | None) -> bool:
    """Whether the run starts its own daemon (the rules in this module's docstring).

    Raises:
        ConfigError: ``on`` with hosts on a GPU and no ``nvidia-cuda-mps-control``.
    """
    if setting == "off" or sharing_hosts == 0 or existing is not None:
        return False
    if setting == "on":
        if control is None:
            from pbt_rl.config import ConfigError

            raise ConfigError(f"run.cuda_mps: 'on' needs {CONTROL} on the PATH (it comes with the NVIDIA "
                              "driver); use 'auto' or 'off'")
        return True
    return sharing_hosts >= 2 and control is not None


def plan(config) -> bool:
    """Whether a run of ``config`` starts its own daemon here (the checks of :func:`wanted`)."""
    from pbt_rl.runtime.resources import hosts_layout, member_devices

    if config.run.backend != "local":
        return False
    per_host, _ = hosts_layout(config)
    return wanted(config.run.cuda_mps, hosts_per_gpu(member_devices(config), per_host), shutil.which(CONTROL),
                  existing_daemon())


class MpsDaemon:
    """A private MPS control daemon (``nvidia-cuda-mps-control -d``) and its directory."""

    def __init__(self, control: str, root: Path):
        self.control = control
        self.root = root
        self.stopped = False
        self.watcher: subprocess.Popen | None = None

    @property
    def pipe_dir(self) -> Path:
        return self.root / "pipe"

    def environment(self) -> dict[str, str]:
        """What a host process sets before it touches CUDA, to become this daemon's client."""
        return {PIPE_ENV: str(self.pipe_dir), LOG_ENV: str(self.root / "log")}

    @classmethod
    def start(cls, control: str | None = None, tmp_dir: str | None = None) -> "MpsDaemon":
        """Start one (stopping orphans of killed runs first); raises :class:`MpsError`."""
        control = control or shutil.which(CONTROL)
        if control is None:
            raise MpsError(f"{CONTROL} is not on the PATH")
        sweep_orphans(control, tmp_dir)
        daemon = cls(control, Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=tmp_dir)))
        for path in daemon.environment().values():
            Path(path).mkdir()
        try:
            done = subprocess.run([control, "-d"], env={**os.environ, **daemon.environment()},
                                  capture_output=True, text=True, timeout=COMMAND_SECONDS)
            if done.returncode != 0:
                raise MpsError(f"{CONTROL} -d exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")
            deadline = time.monotonic() + START_SECONDS
            while not (daemon.pipe_dir / "control").exists():
                if time.monotonic() > deadline:
                    raise MpsError(f"{CONTROL} -d opened no control pipe in {daemon.pipe_dir} "
                                   f"within {START_SECONDS:.0f} s")
                time.sleep(0.05)
            daemon.watcher = subprocess.Popen([sys.executable, "-I", __file__, control, str(daemon.root)],
                                              stdin=subprocess.PIPE, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired, MpsError) as exc:
            daemon.stop()
            raise exc if isinstance(exc, MpsError) else MpsError(f"{CONTROL} -d: {exc}") from exc
        return daemon

    def stop(self) -> None:
        """Ask the daemon to quit (it stops its server) and remove its directory (idempotent):
        the watcher does it when its pipe closes; done here too if the watcher is gone."""
        if self.stopped:
            return
        self.stopped = True
        if self.watcher is not None:
            self.watcher.stdin.close()
            try:
                self.watcher.wait(timeout=2 * COMMAND_SECONDS)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
        _end(self.control, self.root)


def _end(control: str, root: Path) -> None:
    _quit(control, root / "pipe")
    shutil.rmtree(root, ignore_errors=True)


def _quit(control: str, pipe_dir: Path) -> None:
    if not (pipe_dir / "control").exists():
        return
    try:
        subprocess.run([control], input="quit\n", env={**os.environ, PIPE_ENV: str(pipe_dir)},
                       capture_output=True, text=True, timeout=COMMAND_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(control: str, tmp_dir: str | None = None) -> list[Path]:
    """Stop the daemons of runs whose controller is gone (killed before it could stop its own);
    returns their directories, now removed."""
    swept = []
    for root in Path(tmp_dir or tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = root.name[len(PREFIX):].split("-", 1)[0]
        if not (root.is_dir() and pid.isdigit()) or _pid_alive(int(pid)):
            continue
        _end(control, root)
        swept.append(root)
    return swept


def watch(control: str, root: Path) -> None:
    """The watcher: wait until the controller's end of stdin closes, then end the daemon."""
    while sys.stdin.buffer.read(4096):
        pass
    _end(control, root)


if __name__ == "__main__":
    watch(sys.argv[1], Path(sys.argv[2]))
