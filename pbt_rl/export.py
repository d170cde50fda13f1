"""``pbt-rl export``: one member of a run as a folder in the Hugging Face Hub model layout.

The folder's files and their format belong to :mod:`pbt_rl.policy` (which loads them back);
this module gathers what goes in them from the run directory, through its readers:

- the member (``"best"``: the run's one best-member rule, :func:`pbt_rl.lineage.resolve_member`);
- its weights and observation statistics from its newest *verified* checkpoint
  (:func:`pbt_rl.evaluate.load_latest_checkpoint`, loaded with ``torch.load(weights_only=True)``);
- the network's spaces from one env of the run's config (built and closed again);
- its discovered schedule (:func:`pbt_rl.lineage.schedule_of`) and final fitness.

Everything is checked and written into a hidden sibling of ``OUT_DIR`` first, then renamed into
place, so a bad input or a kill leaves no ``OUT_DIR`` behind (an existing empty one is replaced).
``push_to_hub`` uploads the finished folder with ``huggingface_hub`` (the ``hub`` extra),
imported only then.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pbt_rl import __version__
from pbt_rl.config import ConfigError, abbreviate, dump_yaml
from pbt_rl.envs import env_family
from pbt_rl.lineage import final_fitness, member_env_steps, resolve_member, schedule_of
from pbt_rl.policy import (
    CONFIG_FILE,
    MODEL_CARD_FILE,
    MODEL_PREFIX,
    NORMALIZER_PREFIX,
    POLICY_FILE,
    POLICY_FORMAT,
    SCHEDULE_FILE,
    WEIGHTS_FILE,
    encode_bounds,
)
from pbt_rl.runtime.store import RunStore, load_run


def check_out_dir(out_dir: Path) -> None:
    """ConfigError unless ``out_dir`` can be created: absent, or an empty directory, in a writable parent."""
    shown = abbreviate(str(out_dir))
    try:
        exists, is_dir = out_dir.exists(), out_dir.is_dir()
        not_empty = is_dir and any(out_dir.iterdir())
    except OSError as exc:
        raise ConfigError(f"output folder {shown}: {exc.strerror or exc}") from None
    if exists and not is_dir:
        raise ConfigError(f"output folder {shown} exists and is not a directory")
    if not_empty:
        raise ConfigError(f"output folder {shown} is not empty; choose a new folder")
    parent = out_dir.absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"output folder {shown}: its parent {abbreviate(str(parent))} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {shown}: its parent directory is not writable")


def export(run_dir: str | Path, out_dir: str | Path, member: str | int = "best", *, console: bool = True) -> dict:
    """Write ``member``'s policy, config, schedule and model card to the new folder ``out_dir``.

    Returns the policy.json content. Raises ConfigError (one line) for a run directory that is not
    one, an unknown member or one without a verified checkpoint, and an ``out_dir`` that exists
    and is not an empty directory; nothing is written then.
    """
    from pbt_rl.evaluate import load_latest_checkpoint

    out = Path(out_dir)
    check_out_dir(out)
    run = load_run(run_dir)
    store = RunStore(run.root)
    member_id = resolve_member(run, member)
    checkpoint, payload = load_latest_checkpoint(store, member_id)
    learner_state = payload["learner"]
    observation_space, model, tensors, normalization = _weights(run.config, learner_state)
    spec = {
        "format": POLICY_FORMAT,
        "pbt_rl_version": __version__,
        "env_id": run.config.env.id,
        "env_family": env_family(run.config.env.id),
        "algo": learner_state.get("algo", run.config.agent.algo),
        "member": member_id,
        "checkpoint": checkpoint,
        "checkpoint_env_steps": store.checkpoint_env_steps(checkpoint),
        "final_fitness": final_fitness(run, member_id),
        **_space_spec(observation_space, model),
        "network": {"torso": _torso_name(model), "hidden_sizes": list(run.config.agent.hidden_sizes),
                    "log_std_init": run.config.agent.log_std_init, "config_network": run.config.agent.network},
        "observation_normalization": normalization,
        "hyperparameters": dict(learner_state.get("hyperparameters", {})),
        "weights": {"file": WEIGHTS_FILE, "model_prefix": MODEL_PREFIX,
                    "normalizer_prefix": NORMALIZER_PREFIX if normalization["enabled"] else None},
    }
    schedule = {
        "member": member_id,
        "unit": "env steps on the ancestry timeline (env steps of training behind the weights)",
        "search_space": list(run.population.search_space),
        "member_env_steps": member_env_steps(run, member_id),
        "checkpoint_env_steps": spec["checkpoint_env_steps"],
        "schedule": [{"env_steps": steps, "hyperparameters": values} for steps, values in schedule_of(run, member_id)],
    }
    files = {
        WEIGHTS_FILE: _safetensors_bytes(tensors, {"format": "pt", "pbt_rl_version": __version__}),
        POLICY_FILE: (json.dumps(spec, indent=2) + "\n").encode(),
        CONFIG_FILE: dump_yaml(run.config).encode(),
        SCHEDULE_FILE: (json.dumps(schedule, indent=2) + "\n").encode(),
        MODEL_CARD_FILE: model_card(spec, schedule, run.config).encode(),
    }
    _write_folder(out, files)
    if console:
        print(f"member {member_id} @ {spec['checkpoint_env_steps']:,} env steps exported to {out}")
    return spec


def _weights(config, learner_state: dict) -> tuple[Any, Any, dict, dict]:
    """(observation space, the checkpoint's network rebuilt from one env's spaces, the tensors to
    save, policy.json's ``observation_normalization``)."""
    import torch

    from pbt_rl.agents.networks import build_actor_critic
    from pbt_rl.agents.normalizer import RunningMeanStd
    from pbt_rl.envs import make_env

    # One synchronous env, only for its (single-env) spaces.
    env = make_env(dataclasses.replace(config.env, num_envs=1, async_batch_size=0), 1, 0)
    try:
        observation_space, action_space = env.observation_space, env.action_space
    finally:
        env.close()
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten by the checkpoint's
        model = build_actor_critic(observation_space, action_space, config.agent)
    try:
        model.load_state_dict(learner_state["model"])
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"the checkpoint's weights do not fit the run's network ({str(exc).splitlines()[0]})") from None
    tensors = {MODEL_PREFIX + name: value.detach().cpu().contiguous().clone() for name, value in model.state_dict().items()}
    saved = learner_state.get("obs_normalizer")
    # The learner normalises with RunningMeanStd.normalize's default clip and its epsilon.
    statistics = RunningMeanStd(tuple(observation_space.shape))
    normalization = {"enabled": saved is not None, "epsilon": statistics.epsilon,
                     "clip": inspect.signature(RunningMeanStd.normalize).parameters["clip"].default}
    if saved is not None:
        statistics.load_state_dict(saved)
        tensors[NORMALIZER_PREFIX + "mean"] = torch.from_numpy(statistics.mean.copy())
        tensors[NORMALIZER_PREFIX + "var"] = torch.from_numpy(statistics.var.copy())
        tensors[NORMALIZER_PREFIX + "count"] = torch.tensor(statistics.count, dtype=torch.float64)
    return observation_space, model, tensors, normalization


def _space_spec(observation_space, model) -> dict:
    """policy.json's ``observation`` and ``action`` entries (:func:`pbt_rl.policy.spaces_from_spec` reads them)."""
    space = model.action_space
    if model.is_continuous:
        action = {"kind": "box", "shape": list(space.shape), "dtype": str(space.dtype),
                  "low": encode_bounds(space.low), "high": encode_bounds(space.high)}
    else:
        action = {"kind": "discrete", "n": int(space.n)}
    observation = {"shape": list(observation_space.shape), "dtype": str(observation_space.dtype)}
    return {"observation": observation, "action": action}


def _torso_name(model) -> str:
    from pbt_rl.agents.networks import ImpalaResNet, MLPTorso, NatureCNN

    names = {NatureCNN: "nature", ImpalaResNet: "impala", MLPTorso: "mlp"}
    return names[type(model.torso)]


def _safetensors_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _write_folder(out: Path, files: dict[str, bytes]) -> None:
    """``files`` (name -> bytes) as the new folder ``out``, built under a hidden sibling and renamed."""
    from pbt_rl.runtime.file_io import fsync_dir

    out = out.absolute()
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove_stale_partials(out)
    try:
        partial.mkdir()
        for name, data in files.items():
            with open(partial / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_dir(partial)
        os.rename(partial, out)  # replaces an empty directory; refuses a non-empty one
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"cannot write {abbreviate(str(out))}: {exc.strerror or exc}") from None
    fsync_dir(out.parent)


def _remove_stale_partials(out: Path) -> None:
    """Delete hidden partial folders of ``out`` left by an export that was killed (its process is gone)."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # another export to the same folder is running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(leftover, ignore_errors=True)


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(spec: dict, schedule: dict, config) -> str:
    """README.md of the exported folder: a Hugging Face model card (YAML header, then Markdown)."""
    env_id, algo = spec["env_id"], spec["algo"]
    fitness = spec["final_fitness"]
    lines = [
        "---",
        "library_name: pbt-rl",
        "tags:",
        "- reinforcement-learning",
        "- population-based-training",
        f"- {algo}",
        f"- {env_id}",
        "---",
        "",
        f"# {algo.upper()} on {env_id}, trained with Population Based Training (pbt-rl)",
        "",
        f"Member {spec['member']} of a population of {config.pbt.population_size} "
        f"(run `{config.run.name}`, seed {config.run.seed}), exported by pbt-rl {spec['pbt_rl_version']}.",
        "",
        "| | |",
        "|---|---|",
        f"| env | `{env_id}` |",
        f"| algorithm | {algo} |",
        f"| member | {spec['member']} |",
        f"| final fitness | {'n/a' if fitness is None else _format_value(fitness)} "
        f"(mean of the last {config.pbt.fitness_window} episodic returns) |",
        f"| env steps of the weights | {spec['checkpoint_env_steps']:,} (the member's own counter"
        f"{'; 4 frames per env step' if spec['env_family'] == 'atari' else ''}) |",
        f"| network | {spec['network']['torso']} {spec['network']['hidden_sizes'] if spec['network']['torso'] == 'mlp' else ''}".rstrip() + " |",
        f"| observation normalisation | {'on' if spec['observation_normalization']['enabled'] else 'off'} |",
        "",
        "## Discovered hyperparameter schedule",
        "",
        "From each env step on (the ancestry timeline: env steps of training behind the weights) the values "
        "were in force until the next row (`schedule.json`).",
        "",
    ]
    if schedule["member_env_steps"] > spec["checkpoint_env_steps"]:
        lines += [f"These weights are from the member's env step {spec['checkpoint_env_steps']:,} (its newest "
                  f"verified checkpoint); it trained on to env step {schedule['member_env_steps']:,}, and the "
                  "schedule below is its ancestry's up to there.", ""]
    rows = schedule["schedule"]
    names = list(schedule["search_space"])  # the evolved values; without a search space, those that changed
    if not names:
        every = sorted({name for row in rows for name in row["hyperparameters"]})
        names = [n for n in every if len({repr(row["hyperparameters"].get(n)) for row in rows}) > 1] or every
    lines += ["| from env step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {row['env_steps']:,} | " + " | ".join(_format_value(row["hyperparameters"].get(n, ""))
                                                             for n in names) + " |")
    lines += [
        "",
        "## How to load it",
        "",
        "With pbt-rl installed:",
        "",
        "```python",
        "import pbt_rl",
        "",
        'policy = pbt_rl.load_policy("path/to/this/folder")   # CPU',
        "actions = policy(observations)   # numpy batch [N, *observation shape] -> actions (the mode)",
        "```",
        "",
        "Without pbt-rl's learners: `model.safetensors` holds the actor-critic's `state_dict` under `model.` "
        "(and the observation statistics under `obs_normalizer.` when normalisation is on); `policy.json` "
        "describes the spaces and the network (`pbt_rl.agents.networks.build_actor_critic`). "
        "See pbt-rl's docs/python_api.md.",
        "",
        "Files: `model.safetensors`, `policy.json`, `config.yaml` (the resolved experiment config), "
        "`schedule.json`, this README.",
        "",
    ]
    return "\n".join(lines)


def check_hub_available() -> None:
    """ConfigError unless huggingface_hub can be imported (without importing it)."""
    import importlib.util

    if importlib.util.find_spec("huggingface_hub") is None:
        raise ConfigError("--push-to-hub needs the huggingface_hub package: pip install 'pbt-rl[hub]'")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the exported ``folder`` to the Hugging Face Hub model repository ``repo_id``.

    Creates the repository if needed (``private`` then); the token is huggingface_hub's own
    (``huggingface-cli login`` or ``HF_TOKEN``). Returns the repository's URL.
    """
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError("--push-to-hub needs the huggingface_hub package: pip install 'pbt-rl[hub]'") from None
    url = huggingface_hub.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                  commit_message="Upload a pbt-rl policy (pbt-rl export)")
    return str(url)
