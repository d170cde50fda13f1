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
    assert_one_line_error(result, "--seconds: must be > 0")
