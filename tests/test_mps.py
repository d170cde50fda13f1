"""A run's own CUDA MPS daemon (runtime/mps.py, ``run.cuda_mps``): when one is started, that host
processes become its clients, that it is stopped after them (and orphans of killed runs are
swept), and that 'on' without the control program is one line. The control program is a fake
that keeps a log of what it was asked; the GPU counts are faked too."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pbt_rl.config import ConfigError, from_dict
from pbt_rl.runtime import backend as backend_module
from pbt_rl.runtime import mps, resources
from pbt_rl.runtime.member_host import HostSettings, start_host

FAKE_CONTROL = """#!/bin/sh
# A stand-in for nvidia-cuda-mps-control: -d opens the control pipe, 'quit' on stdin closes it.
echo "$0 $* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "{log}"
if [ "$1" = "-d" ]; then
  [ -n "{fail}" ] && {{ echo "{fail}" >&2; exit 3; }}
  [ -n "{silent}" ] || touch "$CUDA_MPS_PIPE_DIRECTORY/control"
  exit 0
fi
read command
echo "stdin=$command" >> "{log}"
[ "$command" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""


@pytest.fixture
def control(tmp_path, monkeypatch):
    """A fake control program on the PATH; returns (its log, a function that rewrites it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "control.log"

    def write(fail: str = "", silent: str = "") -> None:
        program = bin_dir / mps.CONTROL
        program.write_text(FAKE_CONTROL.format(log=log, fail=fail, silent=silent))
        program.chmod(program.stat().st_mode | stat.S_IEXEC)

    write()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE_DIR", str(tmp_path / "no-system-daemon"))
    tmp_dir = tmp_path / "tmp"  # the daemons' directories go here, not in the machine's /tmp
    tmp_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_dir))
    return log, write


def gpu_config(population: int, per_host: int, cuda_mps: str = "auto", backend: str = "local"):
    return from_dict({
        "agent": {"device": "auto"},
        "pbt": {"population_size": population,
                "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-3}}},
        "run": {"total_threads": 16, "members_per_host": per_host, "cuda_mps": cuda_mps, "backend": backend},
    })


def test_hosts_per_gpu_counts_host_processes_not_members():
    assert mps.hosts_per_gpu(["cuda:0"] * 8, per_host=4) == 2
    assert mps.hosts_per_gpu(["cuda:0"] * 4 + ["cuda:1"] * 4, per_host=4) == 1
    assert mps.hosts_per_gpu(["cuda:0"] * 6 + ["cuda:1"] * 2, per_host=2) == 3
    assert mps.hosts_per_gpu(["cpu"] * 8, per_host=1) == 0


def test_when_a_run_starts_its_own_daemon():
    control = "/usr/bin/" + mps.CONTROL
    assert mps.wanted("auto", 2, control, None)
    assert not mps.wanted("auto", 1, control, None)  # one host on its GPU: nothing to share
    assert not mps.wanted("auto", 2, None, None)  # no control program: time slicing, as before
    assert not mps.wanted("auto", 2, control, "/tmp/nvidia-mps")  # the machine's daemon serves the hosts
    assert mps.wanted("on", 1, control, None)
    assert not mps.wanted("on", 0, None, None)  # no host on a GPU
    assert not mps.wanted("off", 16, control, None)
    with pytest.raises(ConfigError, match=rf"^run.cuda_mps: 'on' needs {mps.CONTROL} on the PATH"):
        mps.wanted("on", 2, None, None)


def test_a_daemon_in_use_already_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(mps, "DEFAULT_PIPE_DIR", str(tmp_path))
    assert mps.existing_daemon({}) is None
    (tmp_path / "control").touch()
    assert mps.existing_daemon({}) == str(tmp_path)
    assert mps.existing_daemon({mps.PIPE_ENV: "/somewhere"}) == "/somewhere"


def test_plan_follows_the_placement(control, monkeypatch):
    monkeypatch.setattr(resources, "cuda_device_count", lambda: 1)
    assert mps.plan(gpu_config(16, per_host=4))  # 4 hosts on one GPU
    assert not mps.plan(gpu_config(4, per_host=4))  # one host
    assert not mps.plan(gpu_config(16, per_host=4, cuda_mps="off"))
    monkeypatch.setattr(resources, "cuda_device_count", lambda: 4)
    assert not mps.plan(gpu_config(16, per_host=4))  # a host per GPU
    monkeypatch.setattr(resources, "cuda_device_count", lambda: 0)
    assert not mps.plan(gpu_config(16, per_host=4, cuda_mps="on"))  # members on the CPU


def test_the_daemon_starts_in_its_own_directory_and_stops_with_quit(control):
    log, _ = control
    daemon = mps.MpsDaemon.start()
    assert daemon.root.name.startswith(f"{mps.PREFIX}{os.getpid()}-")
    assert (daemon.pipe_dir / "control").exists()
    environment = daemon.environment()
    assert environment == {mps.PIPE_ENV: str(daemon.pipe_dir), mps.LOG_ENV: str(daemon.root / "log")}
    assert f"-d pipe={daemon.pipe_dir} log={daemon.root / 'log'}" in log.read_text()
    daemon.stop()
    daemon.stop()  # idempotent: one quit
    assert log.read_text().count("stdin=quit") == 1
    assert not daemon.root.exists()


@pytest.mark.parametrize("fail, silent, message", [
    ("no GPU for MPS", "", r"-d exited with 3: no GPU for MPS$"),
    ("", "yes", r"-d opened no control pipe in .* within 0 s$"),
])
def test_a_daemon_that_does_not_start_is_an_error_and_leaves_nothing(control, monkeypatch, fail, silent, message):
    _, write = control
    write(fail=fail, silent=silent)
    monkeypatch.setattr(mps, "START_SECONDS", 0.3)
    with pytest.raises(mps.MpsError, match=message):
        mps.MpsDaemon.start()
    assert not list(Path(os.environ["TMPDIR"]).glob(f"{mps.PREFIX}*"))


def test_orphans_of_killed_runs_are_stopped_and_live_runs_kept(control):
    log, _ = control
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(gone.stdout)  # a process that has ended
    tmp = Path(os.environ["TMPDIR"])
    orphan = tmp / f"{mps.PREFIX}{dead_pid}-abc"
    (orphan / "pipe").mkdir(parents=True)
    (orphan / "pipe" / "control").touch()
    live = tmp / f"{mps.PREFIX}{os.getpid()}-def"
    (live / "pipe").mkdir(parents=True)
    (live / "pipe" / "control").touch()
    daemon = mps.MpsDaemon.start()  # sweeps first
    try:
        assert not orphan.exists()
        assert live.exists()
        assert f"pipe={orphan / 'pipe'}" in log.read_text()
        assert f"pipe={live / 'pipe'}" not in log.read_text()
    finally:
        daemon.stop()


def test_the_backend_makes_its_hosts_clients_and_stops_the_daemon_after_them(control, monkeypatch):
    log, _ = control
    monkeypatch.setattr(resources, "cuda_device_count", lambda: 1)
    events, made = [], []

    class FakeHost:
        def __init__(self, index, context, factory, settings):
            made.append(settings)

        def alive(self):
            return True

        def start(self, incarnation, spec):
            pass

        def kill(self):
            events.append(("host killed", (made[0].environment and
                                           Path(dict(made[0].environment)[mps.PIPE_ENV], "control").exists())))

    monkeypatch.setattr(backend_module, "_HostProcess", FakeHost)
    config = gpu_config(8, per_host=4)
    backend = backend_module.make_backend("local", config)
    assert backend.mps is not None
    from pbt_rl.runtime.member import MemberSpec

    backend.start(MemberSpec(member_id=0, config=config, seed=0, run_dir="unused", restore=None, device="cuda:0"))
    assert dict(made[0].environment) == backend.mps.environment()
    backend.close()
    assert events == [("host killed", True)]  # the daemon was still up while its client ended
    assert "stdin=quit" in log.read_text()


def test_on_without_the_control_program_is_one_line_before_anything_is_written(control, monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "cuda_device_count", lambda: 1)
    monkeypatch.setenv("PATH", "/nonexistent")
    from pbt_rl.runtime import train

    raw = {"agent": {"device": "auto"},
           "pbt": {"population_size": 8, "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-3}}},
           "run": {"total_threads": 16, "members_per_host": 4, "cuda_mps": "on", "dir": str(tmp_path / "run")}}
    with pytest.raises(ConfigError, match=rf"^run.cuda_mps: 'on' needs {mps.CONTROL} on the PATH"):
        train(from_dict(raw), console=False)
    assert not (tmp_path / "run").exists()


def test_auto_goes_on_without_a_daemon_that_fails_and_says_so(control, monkeypatch, capsys):
    _, write = control
    write(fail="MPS is not supported here")
    monkeypatch.setattr(resources, "cuda_device_count", lambda: 1)
    backend = backend_module.make_backend("local", gpu_config(8, per_host=4))
    assert backend.mps is None
    assert capsys.readouterr().err == (f"run.cuda_mps: auto: no MPS daemon ({mps.CONTROL} -d exited with 3: "
                                       "MPS is not supported here); the hosts time-slice the GPU\n")
    on = backend_module.make_backend  # 'on' turns the same failure into the run's one line
    with pytest.raises(ConfigError, match=r"^run.cuda_mps: nvidia-cuda-mps-control -d exited with 3"):
        on("local", gpu_config(8, per_host=4, cuda_mps="on"))


def test_a_host_sets_its_environment_before_it_touches_cuda(monkeypatch):
    monkeypatch.setenv(mps.PIPE_ENV, "before")  # restored after the test
    seen = {}

    def factory_probe(*args, **kwargs):
        raise AssertionError("no learner is built here")

    monkeypatch.setattr("pbt_rl.runtime.member_host.load_factory", lambda name: factory_probe)
    monkeypatch.setattr("pbt_rl.runtime.host.configure_process",
                        lambda *args, **kwargs: seen.setdefault("pipe", os.environ.get(mps.PIPE_ENV)))
    settings = HostSettings(device="cpu", num_threads=1, environment=((mps.PIPE_ENV, "/run/mps/pipe"),))
    assert start_host("unused:factory", settings, send=lambda item: None) is not None
    assert seen["pipe"] == "/run/mps/pipe"


def test_a_killed_controller_leaves_no_daemon_behind(control):
    """SIGKILL gives the controller no chance to stop its daemon: the watcher does it."""
    log, _ = control
    controller = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pbt_rl.runtime.mps import MpsDaemon; d = MpsDaemon.start(); "
                               "print(d.root, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    root = Path(controller.stdout.readline().strip())
    assert (root / "pipe" / "control").exists()
    controller.kill()
    controller.wait()
    for _ in range(600):  # the watcher ends the daemon when its pipe closes: a generous bound
        if not root.exists():
            break
        time.sleep(0.05)
    assert not root.exists()
    assert "stdin=quit" in log.read_text()


def test_the_run_says_in_one_line_when_its_hosts_use_its_daemon(capsys):
    from types import SimpleNamespace

    from pbt_rl.runtime.run import say_mps

    say_mps(SimpleNamespace(mps=SimpleNamespace(pipe_dir=Path("/tmp/pbt-rl-mps-1-x/pipe"))))
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith("CUDA MPS:") and "/tmp/pbt-rl-mps-1-x/pipe" in said[0]
    say_mps(SimpleNamespace(mps=None))  # no daemon (time slicing, CPU members, Ray): nothing said
    assert capsys.readouterr().out == ""
