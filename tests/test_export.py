"""``pbt-rl export`` and ``pbt_rl.load_policy``: the exported policy acts exactly like the member's learner.

Two tiny real runs (members as threads, real A2C learners): a CartPole population with exploits
(discrete actions) and one Pendulum member with observation normalisation on (continuous actions).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import pbt_rl
from pbt_rl.agents import make_learner
from pbt_rl.cli import main
from pbt_rl.config import ConfigError, from_dict, load_config
from pbt_rl.envs import make_env
from pbt_rl.lineage import final_fitness, schedule_of
from pbt_rl.runtime import InProcessBackend, train
from pbt_rl.runtime.store import RunStore, load_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


def _train(run_dir: Path, sections: dict) -> dict:
    raw = {
        "agent": {"device": "cpu", "hidden_sizes": [16]},
        "run": {"name": run_dir.name, "dir": str(run_dir), "seed": 2},
        "logging": {"report": False, "console_interval_seconds": 60},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return train(from_dict(raw), console=False, backend=InProcessBackend(make_learner))


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cartpole") / "run"
    summary = _train(run_dir, {
        "env": {"id": "CartPole-v1", "num_envs": 4},
        "pbt": {"population_size": 3, "ready_after_steps": 400, "truncation_fraction": 0.34, "fitness_window": 3,
                "search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2}}},
        "run": {"total_env_steps": 2000},
    })
    assert summary["finished"] and summary["exploits"] > 0
    return run_dir


@pytest.fixture(scope="module")
def pendulum_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pendulum") / "run"
    summary = _train(run_dir, {
        "env": {"id": "Pendulum-v1", "num_envs": 4},
        "agent": {"normalize_observations": "on"},
        "run": {"total_env_steps": 800},
    })
    assert summary["finished"]
    return run_dir


def _learner_from_checkpoint(run_dir: Path, checkpoint: str):
    """The member as its own learner: the run's config, the checkpoint read with weights_only=True."""
    store = RunStore(run_dir)
    payload = torch.load(store.path(checkpoint), map_location="cpu", weights_only=True)
    learner = make_learner(store.read_config(), seed=11, device="cpu", num_threads=1)
    learner.load_state_dict(payload["learner"], resume=False)
    return learner


def _observations(run_dir: Path, scale: float) -> np.ndarray:
    """Observations the env really produces, plus scaled random ones (far from the statistics)."""
    config = RunStore(run_dir).read_config()
    env = make_env(config.env, 4, seed=3)
    try:
        batch = env.reset()
        seen = [batch.obs]
        for _ in range(10):
            batch = env.step(np.array([env.action_space.sample() for _ in range(4)]))
            seen.append(batch.obs)
        shape = env.observation_space.shape
    finally:
        env.close()
    noise = np.random.default_rng(0).normal(scale=scale, size=(16, *shape)).astype(np.float32)
    return np.concatenate(seen + [noise])


def _doc_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return next(block for block in blocks if block.startswith(marker))


def test_export_best_cartpole_member_acts_like_its_learner(cartpole_run, tmp_path):
    out = tmp_path / "cartpole-policy"
    assert main(["export", str(cartpole_run), str(out)]) == 0

    run = load_run(cartpole_run)
    best = run.summary["best_member"]
    spec = json.loads((out / "policy.json").read_text())
    assert spec["member"] == best
    assert spec["checkpoint"] == RunStore(cartpole_run).newest_verified_checkpoint(best)
    assert spec["action"] == {"kind": "discrete", "n": 2} and spec["observation"] == {"shape": [4], "dtype": "float32"}
    assert spec["network"]["torso"] == "mlp" and spec["network"]["hidden_sizes"] == [16]
    assert spec["observation_normalization"]["enabled"] is False
    assert spec["final_fitness"] == final_fitness(run, best)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "model.safetensors",
                                                     "policy.json", "schedule.json"]
    assert load_config(out / "config.yaml") == run.config
    schedule = json.loads((out / "schedule.json").read_text())
    assert [(row["env_steps"], row["hyperparameters"]) for row in schedule["schedule"]] == schedule_of(run, best)

    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "pbt-rl" and "CartPole-v1" in header["tags"]
    for row in schedule["schedule"]:
        assert re.search(rf"^\| {row['env_steps']:,} \| {row['hyperparameters']['lr']:.4g} \|$", card, re.M)
    assert f"| member | {best} |" in card and "load_policy" in card

    policy = pbt_rl.load_policy(out)
    learner = _learner_from_checkpoint(cartpole_run, spec["checkpoint"])
    try:
        obs = _observations(cartpole_run, scale=2.0)
        expected = learner.act(obs, deterministic=True)
        actions = policy(obs)
        assert actions.dtype == expected.dtype == np.int64
        np.testing.assert_array_equal(actions, expected)
        with torch.no_grad():  # the same logits and values, not only the same argmax
            for mine, theirs in zip(policy.model(torch.from_numpy(obs)), learner.model(torch.from_numpy(obs))):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    finally:
        learner.close()
    with pytest.raises(ValueError, match="batch"):
        policy(obs[0])


def test_export_pendulum_member_normalises_and_samples_like_its_learner(pendulum_run, tmp_path):
    out = tmp_path / "pendulum-policy"
    assert main(["export", str(pendulum_run), "--member", "0", str(out)]) == 0
    spec = json.loads((out / "policy.json").read_text())
    assert spec["action"] == {"kind": "box", "shape": [1], "dtype": "float32", "low": [-2.0], "high": [2.0]}
    assert spec["observation_normalization"]["enabled"] is True

    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    saved = torch.load(RunStore(pendulum_run).path(spec["checkpoint"]), weights_only=True)["learner"]["obs_normalizer"]
    torch.testing.assert_close(tensors["obs_normalizer.mean"], saved["mean"], rtol=0, atol=0)
    torch.testing.assert_close(tensors["obs_normalizer.var"], saved["var"], rtol=0, atol=0)
    assert float(tensors["obs_normalizer.count"]) == saved["count"] > 0
    assert bool((saved["mean"].abs() > 1e-3).any()), "the statistics should not be the identity"

    policy = pbt_rl.load_policy(out)
    learner = _learner_from_checkpoint(pendulum_run, spec["checkpoint"])
    try:
        obs = _observations(pendulum_run, scale=30.0)  # beyond the normaliser's clip for some entries
        expected = learner.act(obs, deterministic=True)
        actions = policy(obs)
        assert actions.dtype == expected.dtype == np.float32 and actions.shape == (len(obs), 1)
        np.testing.assert_array_equal(actions, expected)
        # Sampling: the same generator stream gives the learner's own sampled actions.
        learner.state.acting_generator.manual_seed(5)
        expected_sampled = learner.act(obs, deterministic=False)
        np.testing.assert_array_equal(policy(obs, deterministic=False, seed=5), expected_sampled)
        np.testing.assert_array_equal(policy(obs, deterministic=False, generator=torch.Generator().manual_seed(5)),
                                      expected_sampled)
        assert not np.array_equal(expected_sampled, actions)
    finally:
        learner.close()

    # The docs' plain loading (safetensors + policy.json + torch) on this continuous, normalised member.
    namespace = {"folder": out, "observations": obs, "policy": policy, "np": np}
    exec(compile(_doc_block("# plain loading"), str(DOC), "exec"), namespace)
    np.testing.assert_array_equal(namespace["plain_actions"], actions)


def _no_output_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_bad_input_is_one_line_exit_2_and_writes_nothing(cartpole_run, tmp_path, capsys):
    out = tmp_path / "out"
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    cases = [
        ([str(tmp_path / "missing"), str(out)], "run directory not found"),
        ([str(not_a_run), str(out)], "not a pbt-rl run directory"),
        ([str(cartpole_run), str(out), "--member", "9"], "member 9 is not in this run"),
        ([str(cartpole_run), str(out), "--member", "worst"], "--member: expected 'best' or a member id"),
        ([str(cartpole_run), str(tmp_path / "no-parent" / "out")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert _no_output_left(out)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for target, message in ((taken, "is not empty"), (a_file, "is not a directory")):
        assert main(["export", str(cartpole_run), str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and a_file.read_text() == "mine"

    # A member whose checkpoints all lack their .sha256 (interrupted writes) has nothing to export.
    copy = tmp_path / "copy"
    shutil.copytree(cartpole_run, copy, ignore=shutil.ignore_patterns(".lock"))
    for checksum in (copy / "members" / "0" / "checkpoints").glob("*.sha256"):
        checksum.unlink()
    assert main(["export", str(copy), str(out), "--member", "0"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err and _no_output_left(out)


def test_export_takes_the_newest_verified_checkpoint(cartpole_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cartpole_run, copy, ignore=shutil.ignore_patterns(".lock"))
    store = RunStore(copy)
    newest, older = store.list_checkpoints(1)[-1], store.list_checkpoints(1)[-2]
    store.checksum_path(newest).unlink()  # the newest one's write was interrupted
    out = tmp_path / "out"
    assert main(["export", str(copy), str(out), "--member", "1"]) == 0
    spec = json.loads((out / "policy.json").read_text())
    assert spec["checkpoint"] == older and spec["checkpoint_env_steps"] == store.checkpoint_env_steps(older)
    assert f"These weights are from the member's env step {spec['checkpoint_env_steps']:,}" in (out / "README.md").read_text()
    from safetensors.torch import load_file

    saved = torch.load(store.path(older), weights_only=True)["learner"]["model"]
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == {"model." + name for name in saved}
    for name, value in saved.items():
        torch.testing.assert_close(exported["model." + name], value, rtol=0, atol=0)


def test_an_empty_output_folder_is_filled_and_a_killed_exports_leftover_removed(cartpole_run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".empty.partial-{int(dead.stdout)}"  # a killed export's half-written folder
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert main(["export", str(cartpole_run), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not leftover.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_push_to_hub_uploads_the_exported_folder(cartpole_run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")  # the dev extra installs it
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(**kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "to-push"
    assert main(["export", str(cartpole_run), str(out), "--push-to-hub", "someone/cartpole-pbt", "--private"]) == 0
    assert [(name, repo) for name, repo, _ in calls] == [("create_repo", "someone/cartpole-pbt"),
                                                         ("upload_folder", "someone/cartpole-pbt")]
    assert calls[0][2]["private"] is True and calls[0][2]["repo_type"] == "model"
    upload = calls[1][2]
    assert Path(upload["folder_path"]) == out and upload["repo_type"] == "model"
    assert upload["files"] == ["README.md", "config.yaml", "model.safetensors", "policy.json", "schedule.json"]


def test_push_to_hub_without_huggingface_hub_writes_nothing(cartpole_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    out = tmp_path / "to-push"
    assert main(["export", str(cartpole_run), str(out), "--push-to-hub", "someone/cartpole-pbt"]) == 2
    assert "pip install 'pbt-rl[hub]'" in capsys.readouterr().err and _no_output_left(out)


def test_export_imports_huggingface_hub_only_to_push():
    code = ("import sys, pbt_rl.cli, pbt_rl.export, pbt_rl.policy; "
            "assert 'huggingface_hub' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_load_policy_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        pbt_rl.load_policy(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is not an exported pbt-rl policy"):
        pbt_rl.load_policy(tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps({"format": 99}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="policy format 99"):
        pbt_rl.load_policy(tmp_path)
