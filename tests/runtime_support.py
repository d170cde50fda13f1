"""A learner for runtime tests: no envs, milliseconds per call, but real checkpoints and weights.

Member processes import this module by name (``FAKE``, the ``module:function`` learner factory of
:func:`fake_backend`), which works because pytest puts tests/ on sys.path and spawned children
inherit it.

Fault injection through the environment (inherited by member processes):
``PBT_RL_TEST_CRASH=member:env_steps:marker[:diverge]`` makes that member raise once (the marker
file records that it did); ``PBT_RL_TEST_KILL=member:env_steps:marker`` makes it die by SIGKILL once; ``PBT_RL_TEST_STOP=member:env_steps:marker`` makes that member stop
its own process with SIGSTOP once (alive, silent, pipe open: a hang); ``PBT_RL_TEST_BROKEN=ids``
makes the listed members (comma-separated seeds) fail as soon as they are built, every time;
``PBT_RL_TEST_SLEEP`` slows each call (seconds), ``PBT_RL_TEST_SLOW=member:seconds`` one member's
calls more; ``PBT_RL_TEST_PIDS=folder`` records which process built each learner (``<seed>-<pid>-...``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pbt_rl.config import dump_yaml, from_dict, tunable_agent_fields
from pbt_rl.runtime.backend import LocalProcessBackend
from pbt_rl.runtime.in_process import InProcessBackend
from pbt_rl.runtime.run_format import LOCK_FILE
from pbt_rl.runtime.store import read_jsonl

FAKE = "runtime_support:make_fake_learner"
TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class FakeReport:
    env_steps: int
    episode_returns: list = field(default_factory=list)
    episode_lengths: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)
    updates: int = 0
    env_steps_per_second: float = 0.0
    extra: dict = field(default_factory=dict)


class FakeLearner:
    """Scores well when lr is near 3e-3; weights change at every call so copies are detectable.

    Faults are injected through the environment (module docstring).
    """

    STEPS_PER_CALL = 40  # like 8 envs x unroll 5

    def __init__(self, config, seed, device=None, num_threads=0):
        self.member_id = None
        self.run_dir = config.run_dir
        self.seed = seed
        self.env_steps = 0
        self.hp = {name: getattr(config.agent, name) for name in tunable_agent_fields()}
        self.weights = torch.full((8,), float(seed % 997))
        self.rng = np.random.default_rng(seed)
        if str(seed) in os.environ.get("PBT_RL_TEST_BROKEN", "").split(","):
            raise RuntimeError("injected broken member")
        pids = os.environ.get("PBT_RL_TEST_PIDS")
        if pids:  # which process hosts this member (a file per build: <seed>-<pid>-<unique>)
            Path(pids, f"{seed}-{os.getpid()}-{time.monotonic_ns()}").touch()

    def train(self, until_env_steps):
        returns, updates = [], 0
        while self.env_steps < until_env_steps:
            self.env_steps += self.STEPS_PER_CALL
            updates += 1
            self.weights += self.hp["lr"]
            if self.env_steps % 200 == 0:
                quality = 100.0 - 30.0 * abs(np.log10(self.hp["lr"]) - np.log10(3e-3))
                returns.append(float(quality + self.rng.normal()))
        self._maybe_crash()
        time.sleep(float(os.environ.get("PBT_RL_TEST_SLEEP", "0")))
        slow = os.environ.get("PBT_RL_TEST_SLOW")
        if slow and self.seed == int(slow.split(":")[0]):
            time.sleep(float(slow.split(":")[1]))
        return FakeReport(self.env_steps, returns, [200] * len(returns), {"total_loss": 0.5}, updates, 1e5)

    def _maybe_crash(self):
        kill = os.environ.get("PBT_RL_TEST_KILL")
        if kill:
            member, steps, marker = kill.split(":")
            if self.seed == int(member) and self.env_steps >= int(steps) and not Path(marker).exists():
                Path(marker).write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        stop = os.environ.get("PBT_RL_TEST_STOP")
        if stop:
            member, steps, marker = stop.split(":")
            if self.seed == int(member) and self.env_steps >= int(steps) and not Path(marker).exists():
                Path(marker).write_text("stopped")
                os.kill(os.getpid(), signal.SIGSTOP)  # the controller must notice the silence
        spec = os.environ.get("PBT_RL_TEST_CRASH")
        if not spec:
            return
        member, steps, marker, *kind = spec.split(":")
        if self.seed == int(member) and self.env_steps >= int(steps) and not Path(marker).exists():
            if kind == ["diverge"]:
                # A reseed needs a donor: wait until one exists (member processes start unevenly).
                deadline = time.monotonic() + 60.0
                while not self._a_peer_has_a_checkpoint() and time.monotonic() < deadline:
                    time.sleep(0.05)
            Path(marker).write_text("crashed")
            if kind == ["diverge"]:
                from pbt_rl.agents.base import TrainingDiverged

                raise TrainingDiverged("injected non-finite loss")
            raise RuntimeError("injected env error")

    def _a_peer_has_a_checkpoint(self):
        # Two peer checkpoint files: the first one's "ready" message has surely been sent by then.
        return sum(path.parts[-3] != str(self.seed)
                   for path in Path(self.run_dir).glob("members/*/checkpoints/*.pt")) >= 2

    def hyperparameters(self):
        return dict(self.hp)

    def set_hyperparameters(self, values):
        unknown = set(values) - set(self.hp)
        if unknown:
            raise KeyError(sorted(unknown))
        self.hp.update(values)

    def state_dict(self):
        return {"weights": self.weights.clone(), "env_steps": self.env_steps, "hyperparameters": dict(self.hp)}

    def load_state_dict(self, state, resume=True):
        self.weights = state["weights"].clone()
        self.hp = dict(state["hyperparameters"])
        if resume:
            self.env_steps = state["env_steps"]

    def drop_stale_experience(self):
        pass

    def close(self):
        pass


def make_fake_learner(config, seed, device=None, num_threads=0):
    return FakeLearner(config, seed, device, num_threads)


def fake_backend() -> LocalProcessBackend:
    """Member processes that build fake learners (for faults only a process shows: kills, hangs)."""
    return LocalProcessBackend(learner_factory=FAKE)


def threaded_backend() -> InProcessBackend:
    """Members as threads of the test process, with fake learners: no process start-up."""
    return InProcessBackend(make_fake_learner)


def fake_seed_is_member_id(monkeypatch):
    # Fake learners identify their member by seed (crash injection); make seeds = member ids.
    monkeypatch.setattr("pbt_rl.runtime.population.member_seed", lambda run_seed, member_id: member_id)


def fake_config(run_dir: Path, **sections):
    raw = {
        "env": {"id": "CartPole-v1", "num_envs": 8},
        "agent": {"device": "cpu"},
        "pbt": {"population_size": 4, "ready_after_steps": 400, "min_episodes": 1, "fitness_window": 3,
                "truncation_fraction": 0.25,
                "search_space": {"lr": {"kind": "log_uniform", "low": 1e-5, "high": 1e-1}}},
        "run": {"dir": str(run_dir), "total_env_steps": 4000, "checkpoint_keep": 2, "seed": 3},
        "logging": {"report": False, "console_interval_seconds": 0.5},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return from_dict(raw)



def check_lineage_consistent(run_dir: Path, population: int) -> list[dict]:
    """One row per exploit: per member, generations 1, 2, ... with no gap or duplicate."""
    rows = read_jsonl(run_dir / "lineage.jsonl")
    for member in range(population):
        generations = [r["generation"] for r in rows if r["member"] == member]
        assert generations == list(range(1, len(generations) + 1)), (member, generations)
    state = json.loads((run_dir / "state.json").read_text())
    for member, record in state["members"].items():
        assert record["generation"] == sum(1 for r in rows if r["member"] == int(member))
    return rows


def run_files(run_dir: Path) -> dict[Path, bytes]:
    """Every file of a run directory and its bytes, but the lock (whose content names its holder)."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def check_metrics_grow(run_dir: Path, population: int) -> None:
    for member in range(population):
        steps = [r["env_steps"] for r in read_jsonl(run_dir / f"members/{member}/metrics.jsonl")]
        assert steps and all(a < b for a, b in zip(steps, steps[1:])), (member, steps)



CONTROLLER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pbt_rl.config import load_config
from pbt_rl.runtime import {entry}
from pbt_rl.runtime.backend import LocalProcessBackend
if __name__ == "__main__":  # members are spawned: they re-import this file
{prelude}
    {entry}({argument}, console=False, backend=LocalProcessBackend(learner_factory={fake!r}))
"""


def start_controller(tmp_path: Path, config=None, *, resume_dir: Path | None = None, env: dict | None = None,
                     prelude: str = "") -> subprocess.Popen:
    """A controller in its own process (``train`` of ``config``, or ``resume`` of ``resume_dir``)
    with fake members; ``prelude`` is Python run first in that process (indented 4 spaces)."""
    script = tmp_path / f"controller-{len(list(tmp_path.glob('controller-*.py')))}.py"
    if resume_dir is None:
        config_path = tmp_path / "exp.yaml"
        config_path.write_text(dump_yaml(config))
        entry, argument = "train", f"load_config({str(config_path)!r})"
    else:
        entry, argument = "resume", repr(str(resume_dir))
    script.write_text(CONTROLLER_SCRIPT.format(tests=str(TESTS_DIR), entry=entry, argument=argument, fake=FAKE,
                                               prelude=textwrap.indent(textwrap.dedent(prelude), "    ")))
    return subprocess.Popen([sys.executable, str(script)], env={**os.environ, **(env or {})})


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, *, attempts: int = 2400, pause: float = 0.05) -> bool:
    """Poll ``condition`` up to ``attempts`` times (a count, generous on a loaded machine)."""
    for _ in range(attempts):
        if condition():
            return True
        time.sleep(pause)
    return condition()
