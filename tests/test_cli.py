"""The CLI as users run it: help text, exit codes and one-line errors that write nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["train", "resume", "envs", "config", "report", "replay", "eval", "bench"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PBT_RL_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "pbt_rl.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0]


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: pbt-rl " + command in result.stdout


def test_envs_lists_families():
    result = run_cli("envs")
    assert result.returncode == 0
    for expected in ("atari:", "Pong-v5", "mujoco:", "HalfCheetah-v5", "CartPole-v1", "Gymnasium"):
        assert expected in result.stdout


def test_missing_config_file(tmp_path):
    result = run_cli("train", "missing.yaml", cwd=tmp_path)
    assert_one_line_error(result, "config file not found: missing.yaml")
    assert list(tmp_path.iterdir()) == []


def test_file_that_is_not_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("env: {id: [CartPole\n")
    result = run_cli("train", "bad.yaml", cwd=tmp_path)
    assert_one_line_error(result, "bad.yaml is not valid YAML")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_override_without_equals(tmp_path):
    (tmp_path / "exp.yaml").write_text("env: {id: CartPole-v1}\n")
    result = run_cli("train", "exp.yaml", "pbt.population_size", cwd=tmp_path)
    assert_one_line_error(result, "expected section.key=value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_wrong_type_in_override(tmp_path):
    (tmp_path / "exp.yaml").write_text("env: {id: CartPole-v1}\n")
    result = run_cli("train", "exp.yaml", "agent.lr=fast", cwd=tmp_path)
    assert_one_line_error(result, "agent.lr: expected a number, got 'fast'")


def test_unknown_env_id_suggests_close_matches(tmp_path):
    (tmp_path / "exp.yaml").write_text("env: {id: Pongg-v5}\n")
    result = run_cli("train", "exp.yaml", cwd=tmp_path)
    assert_one_line_error(result, "Pong-v5")
    assert "Pongg-v5" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_report_on_missing_run_dir(tmp_path):
    result = run_cli("report", str(tmp_path / "nope"))
    assert_one_line_error(result, "run directory not found")


def test_eval_rejects_bad_member(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    result = run_cli("eval", str(tmp_path), "--member", "worst")
    assert_one_line_error(result, "--member: expected 'best' or a member id")


def test_unknown_command_is_a_usage_error():
    result = run_cli("fly")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_config_prints_resolved_yaml(tmp_path):
    (tmp_path / "exp.yaml").write_text("env: {id: CartPole-v1}\n")
    result = run_cli("config", "exp.yaml", "agent.lr=0.001", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.001" in result.stdout


def test_bench_rejects_a_non_positive_window(tmp_path):
    (tmp_path / "exp.yaml").write_text("env: {id: CartPole-v1}\n")
    result = run_cli("bench", "agent", "exp.yaml", "--seconds", "0", cwd=tmp_path)
    assert_one_line_error(result, "--seconds: must be a finite number > 0")


# ----------------------------------------------------------------------------------------
# In process: bad input is one line and exit 2, found before any work is done or file written
# ----------------------------------------------------------------------------------------


@pytest.fixture
def cli_error(capsys, monkeypatch):
    """``cli_error(*argv)``: run ``pbt_rl.cli.main(argv)`` in this process, check that it failed as
    bad input (exit 2, one ``pbt-rl: error:`` line on stderr, no traceback); return that line."""
    from pbt_rl.cli import main

    monkeypatch.delenv("PBT_RL_DEBUG", raising=False)

    def run(*argv: str) -> str:
        code = main(list(argv))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        assert code == 2, captured.err
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pbt-rl: error: "), captured.err
        return lines[0]

    return run


@pytest.fixture
def calls(monkeypatch):
    """``calls.spy("module.function")`` replaces that function by one that records its calls."""

    class Calls(list):
        def spy(self, target: str) -> None:
            monkeypatch.setattr(target, lambda *args, **kwargs: self.append(target))

    return Calls()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


DUPLICATE_SECTION = """\
agent:
  device: cpu
  hidden_sizes: [8]
run:
  dir: {run_dir}
  total_env_steps: 1000
agent:
  lr: 0.001
"""


def test_train_with_a_repeated_section_writes_nothing(tmp_path, cli_error, calls):
    calls.spy("pbt_rl.runtime.train")
    run_dir = tmp_path / "run"
    config = tmp_path / "exp.yaml"
    config.write_text(DUPLICATE_SECTION.format(run_dir=run_dir))
    line = cli_error("train", str(config), "-q")
    assert line == f"pbt-rl: error: {config}: duplicate key 'agent' at line 7 (first at line 1)"
    assert calls == [] and not run_dir.exists()


@pytest.mark.parametrize("command", ["train", "config"])
def test_deeply_nested_config_is_one_line(tmp_path, monkeypatch, cli_error, calls, command):
    calls.spy("pbt_rl.runtime.train")
    monkeypatch.chdir(tmp_path)
    Path("exp.yaml").write_text("env: " + "[" * 20_000)
    assert cli_error(command, "exp.yaml").startswith("pbt-rl: error: exp.yaml is nested too deeply")
    assert calls == [] and tree(tmp_path) == {"exp.yaml": b"env: " + b"[" * 20_000}


@pytest.mark.parametrize("command", ["train", "config", "bench"])
def test_config_path_too_long_for_the_os_is_one_line(tmp_path, monkeypatch, cli_error, calls, command):
    calls.spy("pbt_rl.runtime.train")
    calls.spy("pbt_rl.bench.bench_population")
    monkeypatch.chdir(tmp_path)
    line = cli_error(command, "x" * 5000 + ".yaml")
    assert line.startswith("pbt-rl: error: cannot read config file xxx") and len(line) < 300
    assert calls == [] and tree(tmp_path) == {}


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "cuda:-1", "cuda:1x"])
def test_config_rejects_malformed_device_strings(tmp_path, cli_error, device):
    config = tmp_path / "exp.yaml"
    config.write_text(f"agent: {{device: '{device}'}}\n")
    line = cli_error("config", str(config))
    assert line.startswith(f"pbt-rl: error: agent.device: {device!r} is not allowed; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")


@pytest.mark.parametrize("target", ["population", "agent"])
@pytest.mark.parametrize("seconds", ["inf", "nan", "-inf", "0", "-1", "1e400"])
def test_bench_rejects_a_window_that_is_not_a_finite_positive_number(tmp_path, monkeypatch, cli_error, calls, target, seconds):
    calls.spy("pbt_rl.bench.bench_population")
    calls.spy("pbt_rl.agents.bench.bench_agent")
    monkeypatch.chdir(tmp_path)
    Path("exp.yaml").write_text("env: {id: CartPole-v1}\n")
    line = cli_error("bench", target, "exp.yaml", f"--seconds={seconds}")
    assert line.startswith("pbt-rl: error: --seconds: must be a finite number > 0, got ")
    assert calls == [] and tree(tmp_path) == {"exp.yaml": b"env: {id: CartPole-v1}\n"}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    """A finished one-member CartPole run directory with one (untrained) checkpoint."""
    import json

    from pbt_rl.agents import make_learner
    from pbt_rl.config import dump_yaml, from_dict
    from pbt_rl.runtime.store import RunStore

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    config = from_dict({"env": {"id": "CartPole-v1", "num_envs": 2}, "agent": {"device": "cpu", "hidden_sizes": [8]},
                        "run": {"dir": str(run_dir), "total_env_steps": 100}})
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    (run_dir / "population.json").write_text(json.dumps({"members": {"0": {"seed": 1, "hyperparameters": {}}}}))
    (run_dir / "summary.json").write_text(json.dumps({"best_member": 0, "best_score": 10.0}))
    learner = make_learner(config, seed=1, device="cpu", num_threads=1)
    try:
        RunStore(run_dir).save_checkpoint(0, 100, {"learner": learner.state_dict(), "member": {}})
    finally:
        learner.close()
    return run_dir


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--video", "/proc/x/y.gif"], "video: the directory of /proc/x/y.gif does not exist: /proc/x"),
        (["--video", "{tmp}/missing/episode.gif"], "video: the directory of {tmp}/missing/episode.gif does not exist"),
        (["--video", "{tmp}/notes.txt/episode.gif"], "video: the directory of {tmp}/notes.txt/episode.gif is not a directory"),
        (["--video", "{tmp}/folder.gif"], "video: {tmp}/folder.gif is a directory"),
        (["--video", "{tmp}/episode.avi"], "video: {tmp}/episode.avi must end in .gif or .mp4"),
        (["--video", "{tmp}/" + "x" * 5000 + ".gif"], "video: cannot write {tmp}/xxx"),
        (["--video", "{tmp}/episode.mp4"], "video: writing episode.mp4 needs the imageio-ffmpeg package"),
        (["--episodes", "0"], "episodes: must be >= 1, got 0"),
        (["--seed", "-1"], "seed: must be from 0 to 2**64 - 1, got -1"),
        (["--seed", str(2**64)], "seed: must be from 0 to 2**64 - 1"),
    ],
    ids=["proc", "missing-dir", "file-as-dir", "dir-as-file", "suffix", "too-long", "mp4-without-ffmpeg",
         "episodes", "negative-seed", "huge-seed"],
)
def test_eval_rejects_bad_arguments_before_loading_anything(tmp_path, monkeypatch, cli_error, calls, eval_run, args, expected):
    (tmp_path / "notes.txt").write_text("not a directory\n")
    (tmp_path / "folder.gif").mkdir()
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    calls.spy("pbt_rl.evaluate.load_run")
    before, around = tree(eval_run), tree(tmp_path)
    line = cli_error("eval", str(eval_run), "--episodes", "1", *(a.format(tmp=tmp_path) for a in args))
    assert line.startswith("pbt-rl: error: " + expected.format(tmp=tmp_path)) and len(line) < 400
    assert calls == [], "the checkpoint was loaded before the arguments were checked"
    assert tree(eval_run) == before and tree(tmp_path) == around


def test_eval_writes_a_video_to_a_relative_path(tmp_path, monkeypatch, capsys, eval_run):
    from pbt_rl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(eval_run), "--episodes", "1", "--video", "episode.gif"]) == 0, capsys.readouterr().err
    assert "written to episode.gif" in capsys.readouterr().out
    assert (tmp_path / "episode.gif").stat().st_size > 0
