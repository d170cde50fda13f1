"""Typed, immutable experiment configuration.

One experiment is one YAML file with the sections ``env``, ``agent``, ``pbt``, ``run`` and
``logging``. Each section is a frozen dataclass below; every field carries a one-line doc
(``metadata["doc"]``) that is also what ``pbt-rl config-help`` prints. Values are validated
in one place (:func:`validate`), and every failure is a :class:`ConfigError` whose message
names the key and what is allowed.

Units: budgets and intervals are *env steps* summed over a member's envs (one env step is
one agent decision in one env; on Atari it is 4 emulator frames).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pbt_rl.strict_yaml import MAX_YAML_DEPTH, DuplicateKeyError, NestingError, StrictLoader


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line (CLI exit code 2)."""


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with a doc line and validation checks (min, max, gt, lt, choices); agent
    fields PBT may change also carry ``tunable=True`` and, where they matter only with some
    setting, ``only={setting: value}`` (see :func:`tunable_agent_fields`)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples / mappings for immutable defaults")
    return field(default=default, metadata={"doc": doc, **checks})


# ----------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvConfig:
    """Which environment a member trains on and how it is batched."""

    id: str = _f("CartPole-v1", "Env id: an envpool id (Pong-v5, HalfCheetah-v5, CartPole-v1, ...) or any Gymnasium id.")
    num_envs: int = _f(8, "Envs stepped together by one member.", min=1)
    num_threads: int = _f(0, "envpool worker threads per member; 0 = share the machine's cores among members.", min=0)
    async_batch_size: int = _f(0, "0 = synchronous stepping; >0 = send/recv batches of this many envs (must divide num_envs): IMPALA takes whichever envs are ready, A2C steps fixed groups in turn.", min=0)
    episodic_life: bool = _f(False, "Atari: a life loss ends the learning episode (the reported game score still spans all lives).")
    reward_clip: bool = _f(True, "Atari: learn from sign(reward); the reported episodic return is always the raw score.")
    repeat_action_probability: float = _f(0.25, "Atari: sticky-action probability (Machado et al. 2018 protocol: 0.25).", min=0.0, max=1.0)
    noop_max: int = _f(1, "Atari: up to this many no-op actions at reset (30 = DQN-Nature protocol; 1 = none).", min=1)
    frame_skip: int = _f(4, "Atari: emulator frames per env step (max-pooled over the last two).", min=1)
    frame_stack: int = _f(4, "Atari: stacked grayscale frames in an observation.", min=1)
    image_size: int = _f(84, "Atari: observations are image_size x image_size grayscale.", min=16)
    max_episode_steps: int = _f(0, "Truncate episodes after this many env steps; 0 = the env's default (Atari 27000 = 108000 frames).", min=0)
    full_action_space: bool = _f(False, "Atari: use all 18 actions instead of the game's minimal set.")


@dataclass(frozen=True)
class AgentConfig:
    """The learner and its hyperparameters. Fields marked ``tunable`` can be evolved by PBT."""

    algo: str = _f("a2c", "Learner: 'a2c' (synchronous n-step) or 'impala' (decoupled actor/learner with V-trace).", choices=("a2c", "impala"))
    network: str = _f("auto", "'auto' (nature for pixels, mlp for vectors), 'nature', 'impala' (15-layer ResNet) or 'mlp'.", choices=("auto", "nature", "impala", "mlp"))
    hidden_sizes: tuple[int, ...] = _f((64, 64), "MLP hidden layer widths (vector observations).")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.")
    optimizer: str = _f("rmsprop", "'rmsprop' (the IMPALA/PBT papers' choice) or 'adam'.", choices=("rmsprop", "adam"))
    lr: float = _f(7e-4, "Learning rate.", gt=0.0, max=1.0, tunable=True)
    optimizer_eps: float = _f(1e-5, "Epsilon of RMSProp / Adam.", gt=0.0, max=1.0, tunable=True)
    rmsprop_alpha: float = _f(0.99, "RMSProp smoothing constant (decay).", gt=0.0, lt=1.0, tunable=True, only={'optimizer': 'rmsprop'})
    rmsprop_momentum: float = _f(0.0, "RMSProp momentum.", min=0.0, lt=1.0, tunable=True, only={'optimizer': 'rmsprop'})
    adam_beta1: float = _f(0.9, "Adam beta1.", min=0.0, lt=1.0, tunable=True, only={'optimizer': 'adam'})
    adam_beta2: float = _f(0.999, "Adam beta2.", min=0.0, lt=1.0, tunable=True, only={'optimizer': 'adam'})
    max_grad_norm: float = _f(0.5, "Clip the global gradient norm to this; 0 = no clipping.", min=0.0, tunable=True)
    entropy_cost: float = _f(0.01, "Weight of the entropy bonus in the loss.", min=0.0, tunable=True)
    value_cost: float = _f(0.5, "Weight of the value loss in the loss.", min=0.0, tunable=True)
    gamma: float = _f(0.99, "Discount per env step.", min=0.0, max=1.0, tunable=True)
    td_lambda: float = _f(1.0, "lambda of the returns / V-trace traces (1.0 = n-step returns).", min=0.0, max=1.0, tunable=True)
    unroll_length: int = _f(5, "Env steps per env in one unroll (A2C: n of the n-step return).", min=1, max=10000, tunable=True)
    vtrace_rho_clip: float = _f(1.0, "IMPALA: rho-bar, clip of the importance weights in the V-trace targets.", gt=0.0, tunable=True, only={'algo': 'impala'})
    vtrace_c_clip: float = _f(1.0, "IMPALA: c-bar, clip of the trace-cutting coefficients.", gt=0.0, tunable=True, only={'algo': 'impala'})
    vtrace_pg_rho_clip: float = _f(1.0, "IMPALA: clip of the importance weights in the policy gradient.", gt=0.0, tunable=True, only={'algo': 'impala'})
    learner_batch_unrolls: int = _f(1, "IMPALA: unrolls (each from one actor batch of envs) per learner update.", min=1, tunable=True, only={'algo': 'impala'})
    queue_size: int = _f(2, "IMPALA: bound of the actor-to-learner unroll queue (larger = more policy lag).", min=1, tunable=True, only={'algo': 'impala'})
    num_epochs: int = _f(1, "Passes (epochs) over each batch of experience, as in PPO / APPO; 1 = the classic single A2C / IMPALA update.", min=1, max=100, tunable=True)
    num_minibatches: int = _f(1, "Minibatches per pass, split along the env axis (each holds whole unrolls); more than the batch's envs = one env each.", min=1, tunable=True)
    ppo_clip: float = _f(0.0, "epsilon of PPO's clipped surrogate on the ratio pi/mu (acting policy); 0 = plain policy gradient.", min=0.0, lt=1.0, tunable=True)
    normalize_advantages: bool = _f(False, "Normalise advantages to mean 0, std 1 over the valid steps of each minibatch.")
    normalize_observations: str = _f("auto", "Running mean/std observation normalisation: 'auto' (on for MuJoCo), 'on', 'off'.", choices=("auto", "on", "off"))
    normalize_returns: bool = _f(False, "Scale rewards by a running std of discounted returns (common for MuJoCo).")
    log_std_init: float = _f(0.0, "Gaussian policy: initial log standard deviation.", min=-10.0, max=5.0)


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter of the PBT search space.

    ``name`` is a numeric field of the agent config (``lr``, ``entropy_cost``, ...).
    """

    name: str = _f("", "Agent field this parameter controls.")
    kind: str = _f("log_uniform", "'log_uniform', 'uniform', 'int', 'log_int' or 'categorical'.", choices=("log_uniform", "uniform", "int", "log_int", "categorical"))
    low: float | None = _f(None, "Lower bound (inclusive); not for categorical.")
    high: float | None = _f(None, "Upper bound (inclusive); not for categorical.")
    choices: tuple[Any, ...] = _f((), "Allowed values, in order (categorical only; perturb steps to a neighbour).")
    init: Any = _f(None, "Initial value for every member instead of sampling the prior (must lie inside the bounds).")
    perturb: str = _f("multiply", "How to perturb: 'multiply' by the factors, or 'one_minus' (multiply 1 - x, for gamma-like values).", choices=("multiply", "one_minus"))
    factors: tuple[float, ...] = _f((), "Perturbation factors for this parameter; empty = pbt.perturb_factors.")


@dataclass(frozen=True)
class PBTConfig:
    """Population Based Training: population, ready criterion, exploit and explore."""

    population_size: int = _f(1, "Members trained concurrently.", min=1, max=4096)
    mode: str = _f("async", "'async' (each member decides when ready, the paper's default) or 'sync' (generations).", choices=("async", "sync"))
    ready_after_steps: int = _f(50_000, "A member is ready every this many of its own env steps.", min=1)
    burn_in_steps: int = _f(0, "No member is ready before this many of its own env steps.", min=0)
    min_episodes: int = _f(1, "A member needs at least this many finished episodes to be scored.", min=1)
    fitness_window: int = _f(10, "Fitness = mean of the last k finished episodic returns (true game score).", min=1)
    exploit: str = _f("truncation", "'truncation', 'tournament' or 'ttest' (Welch's t-test on the last k returns).", choices=("truncation", "tournament", "ttest"))
    truncation_fraction: float = _f(0.2, "Truncation: the bottom fraction copies a member of the top fraction.", gt=0.0, max=0.5)
    ttest_alpha: float = _f(0.05, "t-test: copy only when the donor is better with p below this.", gt=0.0, lt=1.0)
    explore: str = _f("perturb_or_resample", "'perturb', 'resample' or 'perturb_or_resample' (the paper's combination).", choices=("perturb", "resample", "perturb_or_resample"))
    perturb_factors: tuple[float, ...] = _f((0.8, 1.2), "Multiplicative perturbation factors (one is picked uniformly).")
    resample_probability: float = _f(0.25, "perturb_or_resample: probability that a value is resampled from the prior.", min=0.0, max=1.0)
    margin_relative: float = _f(0.0, "Copy only if donor fitness exceeds the member's by this fraction of |member fitness|.", min=0.0)
    margin_absolute: float = _f(0.0, "Copy only if donor fitness exceeds the member's by at least this much.", min=0.0)
    search_space: tuple[ParamSpec, ...] = _f((), "Hyperparameters to evolve: a mapping name -> {kind, low, high, ...}.")


@dataclass(frozen=True)
class RunConfig:
    """Where and how long: budget, seed, run directory, resources."""

    name: str = _f("experiment", "Experiment name (W&B group, default run directory).")
    dir: str = _f("", "Run directory; empty = runs/<name>.")
    seed: int = _f(0, "Master seed; members, envs and the scheduler derive theirs from it.", min=0)
    total_env_steps: int = _f(1_000_000, "Budget per member, in env steps (Atari: x4 for frames).", min=1)
    max_wall_seconds: float = _f(0.0, "Stop the whole run after this many seconds; 0 = no limit.", min=0.0)
    checkpoint_keep: int = _f(3, "Checkpoints kept per member (ones a pending exploit needs are never deleted).", min=1)
    backend: str = _f("local", "Where members run: 'local' (processes on this machine).", choices=("local",))
    members_per_gpu: int = _f(0, "Members sharing one GPU; 0 = all members on one GPU.", min=0)
    total_threads: int = _f(0, "CPU threads for env stepping across the population; 0 = all cores.", min=0)
    torch_threads: int = _f(0, "torch intra-op threads per member; 0 = 1 on GPU, the member's share of env threads on CPU.", min=0)
    hang_timeout_factor: float = _f(10.0, "A member that works but sends nothing for max(hang_timeout_min_seconds, this x its longest gap between messages so far) is hung: it is killed and restarted like a crash (before its first message after a start it has this x hang_timeout_min_seconds); 0 = never.", min=0.0)
    hang_timeout_min_seconds: float = _f(60.0, "Shortest silence of a working member that counts as a hang (see hang_timeout_factor).", gt=0.0)
    gpu_wait: str = _f("auto", "How a member's threads wait for their GPU: 'auto' (CUDA's choice: spin while a process has fewer contexts than there are cores), 'spin' (busy-wait: lowest latency), 'yield' (spin, yielding the core to runnable threads) or 'block' (sleep until the GPU signals: frees the core, adds wake-up latency).", choices=("auto", "spin", "yield", "block"))


@dataclass(frozen=True)
class LoggingConfig:
    """Console, local files and Weights & Biases."""

    wandb: str = _f("disabled", "'online', 'offline' or 'disabled'; online falls back to offline when not logged in.", choices=("online", "offline", "disabled"))
    wandb_project: str = _f("pbt-rl", "W&B project.")
    wandb_entity: str = _f("", "W&B entity (team or user); empty = your default.")
    console_interval_seconds: float = _f(5.0, "Seconds between live progress lines.", gt=0.0)
    report: bool = _f(True, "Write the report plots at the end of train.")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one YAML file."""

    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    pbt: PBTConfig = field(default_factory=PBTConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


SECTIONS: dict[str, type] = {
    "env": EnvConfig,
    "agent": AgentConfig,
    "pbt": PBTConfig,
    "run": RunConfig,
    "logging": LoggingConfig,
}

def tunable_agent_fields() -> dict[str, type]:
    """Agent config fields PBT may evolve (``tunable=True`` in their metadata): name -> float or int.

    Each takes effect when a running learner is given a new value (the optimiser's param groups,
    the loss, the targets, the unroll buffers, the IMPALA queue bound read it at the next update
    or unroll). Fields fixed when the learner is built (network, ``log_std_init``, devices, ...)
    are not tunable; ``only`` in the metadata names the setting a field needs to matter
    (e.g. Adam's betas with ``optimizer: adam``), and a search space over it otherwise is refused.
    """
    hints = typing.get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(AgentConfig) if f.metadata.get("tunable")}


# ----------------------------------------------------------------------------------------
# Conversion of raw YAML values to field types
# ----------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is tuple:
        return "a list"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return tuple(value) if isinstance(value, list) else value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                as_float = math.nan
            if as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string; accept it as a number.
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(result):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return result
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be >= {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be <= {meta['max']}")
        if "gt" in meta and not value > meta["gt"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be > {meta['gt']}")
        if "lt" in meta and not value < meta["lt"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be < {meta['lt']}")


def check_agent_value(name: str, value: int | float) -> None:
    """The config's range rule for one agent field (what a learner checks a new PBT value with)."""
    field_ = next(f for f in dataclasses.fields(AgentConfig) if f.name == name)
    _check_range(value, field_.metadata, f"agent.{name}")


def _close_matches(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            allowed = sorted(fields)
            raise ConfigError(
                f"unknown key {full}{_close_matches(str(key), allowed)}; "
                f"{prefix or 'top level'} allows: {', '.join(allowed)}"
            )
        if cls is PBTConfig and key == "search_space":
            kwargs[key] = _build_search_space(value, full)
            continue
        converted = _convert(value, hints[key], full)
        _check_range(converted, fields[key].metadata, full)
        kwargs[key] = converted
    return cls(**kwargs)


def _build_search_space(raw: Any, prefix: str) -> tuple[ParamSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping name -> {{kind, low, high}}, got {raw!r}")
    specs = []
    for name, spec_raw in raw.items():
        key = f"{prefix}.{name}"
        if not isinstance(spec_raw, Mapping):
            raise ConfigError(f"{key}: expected a mapping like {{kind: log_uniform, low: 1e-4, high: 1e-2}}, got {spec_raw!r}")
        if "name" in spec_raw:
            raise ConfigError(f"{key}.name: the parameter name is the mapping key; remove 'name'")
        spec = _build_dataclass(ParamSpec, {**spec_raw}, key)
        specs.append(dataclasses.replace(spec, name=str(name)))
    return tuple(specs)


# ----------------------------------------------------------------------------------------
# Cross-field validation (one place)
# ----------------------------------------------------------------------------------------


# [0-9], not \d, which also matches other scripts' digits; no leading zeros, which torch.device rejects.
_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Check rules that involve more than one field; return the config unchanged."""
    env, agent, pbt = config.env, config.agent, config.pbt
    if env.async_batch_size and env.num_envs % env.async_batch_size:
        raise ConfigError(
            f"env.async_batch_size: {env.async_batch_size} must divide env.num_envs ({env.num_envs})"
        )
    if env.async_batch_size > env.num_envs:
        raise ConfigError(f"env.async_batch_size: {env.async_batch_size} must be <= env.num_envs ({env.num_envs})")
    if not agent.hidden_sizes or any(h < 1 for h in agent.hidden_sizes):
        raise ConfigError(f"agent.hidden_sizes: expected a non-empty list of positive integers, got {list(agent.hidden_sizes)}")
    if not _DEVICE.fullmatch(agent.device):
        raise ConfigError(
            f"agent.device: {agent.device!r} is not allowed; choose 'auto', 'cpu', 'cuda' or 'cuda:N' "
            f"with N a GPU index 0, 1, 2, ..."
        )
    if pbt.population_size > 1 and not pbt.search_space:
        raise ConfigError("pbt.search_space: empty; name at least one agent hyperparameter to evolve (or set pbt.population_size=1)")
    tunable = tunable_agent_fields()
    for spec in pbt.search_space:
        _validate_param(spec, tunable, agent)
    # Imported here: search_space imports this module.
    from pbt_rl.search_space import SearchSpace

    SearchSpace.from_config(pbt)  # the parameters' own rules, pbt.perturb_factors, each name once
    for spec in pbt.search_space:
        _check_inside_agent_range(spec, tunable[spec.name])
    return config


def _validate_param(spec: ParamSpec, tunable: dict[str, type], agent: AgentConfig) -> None:
    """A search-space parameter names an agent field PBT may change with these agent settings,
    with a kind of the field's type. Its own rules (bounds, choices, init, factors, ...) are the
    search space's (:mod:`pbt_rl.search_space`)."""
    # Imported here: search_space imports this module.
    from pbt_rl.search_space import INTEGER_KINDS

    key = f"pbt.search_space.{spec.name}"
    if spec.name not in tunable:
        raise ConfigError(
            f"{key}: not an agent hyperparameter PBT can change{_close_matches(spec.name, sorted(tunable))}; "
            f"allowed: {', '.join(sorted(tunable))}"
        )
    for setting, needed in _agent_field_metadata(spec.name).get("only", {}).items():
        if getattr(agent, setting) != needed:
            raise ConfigError(f"{key}: {spec.name} has no effect with agent.{setting}={getattr(agent, setting)} "
                              f"(only with {setting}: {needed}); remove it from the search space")
    if spec.kind == "categorical":  # its values take the field's type
        return
    if spec.kind in INTEGER_KINDS and tunable[spec.name] is not int:
        raise ConfigError(f"{key}.kind: {spec.name} is a real number; use uniform or log_uniform")
    if spec.kind not in INTEGER_KINDS and tunable[spec.name] is int:
        raise ConfigError(f"{key}.kind: {spec.name} is an integer; use int or log_int")


def _check_inside_agent_range(spec: ParamSpec, field_type: type) -> None:
    """The bounds (or choices) of a parameter that keeps the search space's rules lie inside the
    range its agent field allows (the field's min / max / gt / lt)."""
    key = f"pbt.search_space.{spec.name}"
    if spec.kind == "categorical":
        values = [(f"choices[{i}]", choice) for i, choice in enumerate(spec.choices)]
    else:
        values = [("low", spec.low), ("high", spec.high)]
    for where, value in values:
        _check_range(_convert(value, field_type, f"{key}.{where}"), _agent_field_metadata(spec.name), f"{key}.{where}")


def _agent_field_metadata(name: str) -> Mapping[str, Any]:
    return next(f for f in dataclasses.fields(AgentConfig) if f.name == name).metadata


# ----------------------------------------------------------------------------------------
# Loading, overrides, saving
# ----------------------------------------------------------------------------------------

def abbreviate(text: str, limit: int = 160) -> str:
    """``text`` cut in the middle when longer than ``limit``, so an error message stays readable."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value is YAML) into (path, value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. pbt.population_size=16)")
    key, raw_value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be section.key (sections: {', '.join(SECTIONS)})")
    try:
        value = yaml.load(raw_value, Loader=StrictLoader) if raw_value.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {key.strip()}: duplicate key {exc.key!r} in the value") from None
    except NestingError:
        raise ConfigError(f"override {key.strip()}: the value is nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
    except yaml.YAMLError:
        value = raw_value  # not YAML: the text itself, e.g. a run name
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw YAML mapping with ``section.key=value`` overrides applied."""
    import copy

    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in SECTIONS:
            raise ConfigError(
                f"override {text!r}: unknown section {path[0]!r}{_close_matches(path[0], list(SECTIONS))}; "
                f"sections: {', '.join(SECTIONS)}"
            )
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return result


def from_dict(raw: Any) -> ExperimentConfig:
    """Build and validate a config from a plain mapping (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(f"unknown section {key!r}{_close_matches(key, list(SECTIONS))}; sections: {', '.join(SECTIONS)}")
    sections = {name: _build_dataclass(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    return validate(ExperimentConfig(**sections))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; raise ConfigError for a missing, unreadable or non-YAML file, a key
    repeated in one mapping, or nesting deeper than :data:`MAX_YAML_DEPTH`."""
    path = Path(path)
    shown = abbreviate(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {shown}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc}") from None
    except OSError as exc:  # e.g. ENAMETOOLONG, EACCES, ELOOP; strerror leaves out the (long) path
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{shown}: {exc}") from None
    except NestingError as exc:
        raise ConfigError(f"{shown} is nested too deeply (more than {MAX_YAML_DEPTH} levels at line {exc.line})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{shown} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: expected a YAML mapping with sections {', '.join(SECTIONS)}")
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML experiment file, apply CLI overrides, validate."""
    return from_dict(apply_overrides(read_yaml(path), list(overrides)))


def to_dict(config: Any) -> Any:
    """Plain, YAML-safe representation of a config (search space as a mapping)."""
    if isinstance(config, ExperimentConfig):
        return {name: to_dict(getattr(config, name)) for name in SECTIONS}
    if isinstance(config, PBTConfig):
        out = {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name != "search_space"}
        out["search_space"] = {
            spec.name: {k: v for k, v in to_dict(spec).items() if k != "name"} for spec in config.search_space
        }
        return out
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_dict(v) for v in config]
    return config


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def field_docs() -> list[tuple[str, str, Any]]:
    """(key, doc, default) for every field, for help output."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            if f.metadata.get("tunable"):
                only = ", ".join(f"{k}: {v}" for k, v in f.metadata.get("only", {}).items())
                doc += f" (PBT can evolve it{' with ' + only if only else ''})"
            rows.append((f"{section}.{f.name}", doc, f.default))
    return rows
