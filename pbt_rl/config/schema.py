"""The experiment configuration's schema: one frozen dataclass per YAML section.

Every field carries a one-line doc (``metadata["doc"]``, what ``pbt-rl config-help`` prints) and
its checks (min, max, gt, lt, choices); agent fields PBT may change carry ``tunable=True``. This
module owns the fields and their defaults; :mod:`pbt_rl.config.convert` applies the per-field
checks, :mod:`pbt_rl.config.validate` the rules across fields, :mod:`pbt_rl.config.load` reads,
overrides and writes YAML.

Units: budgets and intervals are *env steps* summed over a member's envs (one env step is
one agent decision in one env; on Atari it is 4 emulator frames).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
    cuda_graphs: bool = _f(True, "On CUDA, replay each gradient step as a CUDA graph (one launch instead of hundreds), checked for non-finite values once per update; false = eager steps. No effect on the CPU.")
    graphed_acting: bool = _f(True, "With cuda_graphs on a GPU, also replay each sampling acting step (forward pass and sampling, the random numbers drawn eagerly: the same actions) as a CUDA graph; false = eager acting steps. Measured on the H100 machine: 1.09-1.19x the population's env steps/s (Pong A2C and HalfCheetah at 8 members, Pong IMPALA at 64; README, Performance).")
    optimizer: str = _f("rmsprop", "'rmsprop' (the IMPALA/PBT papers' choice) or 'adam'.", choices=("rmsprop", "adam"))
    trajectories_on_device: bool = _f(False, "IMPALA on a GPU: keep the actor's observation rings on the device (a batch's observations written there from the policy step's copy, unrolls gathered there), so that frames are copied once on the host instead of three times; false = rings in host memory. Off: on the GPU machine it measured no faster at 8 members and slower at 64 (docs/design.md). No effect on the CPU.")
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
    exploit: str = _f("truncation", "'truncation', 'tournament', 'ttest' (Welch's t-test on the last k returns) or 'none' (never copy: random search over the priors, or with pbt.search: none hand-tuning).", choices=("truncation", "tournament", "ttest", "none"))
    truncation_fraction: float = _f(0.2, "Truncation: the bottom fraction copies a member of the top fraction.", gt=0.0, max=0.5)
    ttest_alpha: float = _f(0.05, "t-test: copy only when the donor is better with p below this.", gt=0.0, lt=1.0)
    explore: str = _f("perturb_or_resample", "'perturb', 'resample', 'perturb_or_resample' (the paper's combination) or 'pb2' (numeric values chosen by PB2's GP bandit; needs the pb2 extra: scikit-learn).", choices=("perturb", "resample", "perturb_or_resample", "pb2"))
    perturb_factors: tuple[float, ...] = _f((0.8, 1.2), "Multiplicative perturbation factors (one is picked uniformly).")
    resample_probability: float = _f(0.25, "perturb_or_resample: probability that a value is resampled from the prior.", min=0.0, max=1.0)
    margin_relative: float = _f(0.0, "Copy only if donor fitness exceeds the member's by this fraction of |member fitness|.", min=0.0)
    margin_absolute: float = _f(0.0, "Copy only if donor fitness exceeds the member's by at least this much.", min=0.0)
    search_space: tuple[ParamSpec, ...] = _f((), "Hyperparameters to evolve: a mapping name -> {kind, low, high, ...}.")
    search: str = _f("space", "'space' (members start from draws of the search space's priors) or 'none' (hand-tuned: every member starts from the agent config's values; needs pbt.exploit: none).", choices=("space", "none"))


@dataclass(frozen=True)
class RunConfig:
    """Where and how long: budget, seed, run directory, resources."""

    name: str = _f("experiment", "Experiment name (W&B group, default run directory).")
    dir: str = _f("", "Run directory; empty = runs/<name>.")
    seed: int = _f(0, "Master seed; members, envs and the scheduler derive theirs from it.", min=0)
    total_env_steps: int = _f(1_000_000, "Budget per member, in env steps (Atari: x4 for frames).", min=1)
    max_wall_seconds: float = _f(0.0, "Stop the whole run after this many seconds; 0 = no limit.", min=0.0)
    checkpoint_keep: int = _f(3, "Checkpoints kept per member (ones a pending exploit needs are never deleted).", min=1)
    backend: str = _f("local", "Where members run: 'local' (processes on this machine) or 'ray' (Ray actors on a cluster, docs/cluster.md).", choices=("local", "ray"))
    ray_address: str = _f("", "run.backend=ray: the cluster to join, host:port of its head (or 'auto'); empty = the RAY_ADDRESS environment variable, else a Ray instance started on this machine for the run.")
    ray_cpus_per_member: float = _f(1.0, "run.backend=ray: CPUs Ray reserves per member (also its env threads when env.num_threads is 0).", gt=0.0)
    ray_gpus_per_member: float = _f(0.0, "run.backend=ray: GPUs Ray reserves per member, a fraction to share one (0.125 = 8 members per GPU) or a whole number; 0 = members on CPU.", min=0.0)
    ray_placement: str = _f("spread", "run.backend=ray: 'spread' members over the nodes or 'pack' them onto as few nodes as possible (one Ray placement group).", choices=("spread", "pack"))
    gpus: int = _f(0, "run.backend=local: GPUs the population uses, the first N that CUDA makes visible; 0 = all of them.", min=0)
    members_per_gpu: int = _f(0, "Members sharing one GPU (members 0..k-1 on the first, and so on); 0 = auto: the member hosts spread evenly over run.gpus.", min=0)
    members_per_host: int = _f(0, "Members sharing one host process or Ray actor (one torch import, one CUDA context; each member a thread with its own learner, envs and generators; run.host_sharing); 0 = auto: one host per core (run.total_threads), at least 4 (Ray: 1), 1 = a process per member.", min=0)
    host_sharing: str = _f("turns", "How the members of a host share it: 'turns' (one member's training call at a time: no interpreter-lock handoffs, measured best on the CPU), 'batched' (all train at once, their policies acting in one batched forward pass per step: fewer, larger GPU launches) or 'free' (all train at once, each acting alone).", choices=("turns", "batched", "free"))
    total_threads: int = _f(0, "CPU threads for env stepping across the population; 0 = all cores.", min=0)
    torch_threads: int = _f(0, "torch intra-op threads per member; 0 = 1 on GPU, the member's share of env threads on CPU.", min=0)
    hang_timeout_factor: float = _f(10.0, "A member that works but sends nothing for max(hang_timeout_min_seconds, this x its longest gap between messages so far) is hung: it is killed and restarted like a crash (before its first message after a start it has this x hang_timeout_min_seconds); 0 = never.", min=0.0)
    hang_timeout_min_seconds: float = _f(60.0, "Shortest silence of a working member that counts as a hang (see hang_timeout_factor).", gt=0.0)
    cuda_mps: str = _f("auto", "run.backend=local: CUDA MPS lets the host processes on one GPU run their kernels at once instead of time-slicing it: 'auto' (a private MPS daemon for the run when 2+ hosts share a GPU and nvidia-cuda-mps-control is on the PATH, unless one is in use already), 'on' (a private daemon whenever hosts are on a GPU; no nvidia-cuda-mps-control is an error) or 'off'.", choices=("auto", "on", "off"))
    gpu_wait: str = _f("auto", "How a member's threads wait for their GPU: 'auto' (CUDA's choice: spin while a process has fewer contexts than there are cores), 'spin' (busy-wait: lowest latency), 'yield' (spin, yielding the core to runnable threads) or 'block' (sleep until the GPU signals: frees the core, adds wake-up latency). A graphed update always ends sleeping between checks.", choices=("auto", "spin", "yield", "block"))


@dataclass(frozen=True)
class LoggingConfig:
    """Console, local files and Weights & Biases."""

    wandb: str = _f("disabled", "'online', 'offline' or 'disabled'; online falls back to offline when not logged in.", choices=("online", "offline", "disabled"))
    wandb_project: str = _f("pbt-rl", "W&B project.")
    wandb_entity: str = _f("", "W&B entity (team or user); empty = your default.")
    wandb_group: str = _f("", "W&B group of the run's W&B runs; empty = run.name (pbt-rl experiment sets the experiment's name).")
    wandb_job_type: str = _f("", "W&B job type of the member runs; empty = pbt-member (pbt-rl experiment sets the arm's name).")
    console_interval_seconds: float = _f(5.0, "Seconds between live progress lines.", gt=0.0)
    tensorboard: bool = _f(False, "Write TensorBoard event files under <run.dir>/tensorboard/ (member_<id>/ and population/; global step = env steps); needs the tensorboard extra.")
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



def agent_field_metadata(name: str) -> Mapping[str, Any]:
    """The metadata (doc, checks, tunable, only) of one agent field."""
    return next(f for f in dataclasses.fields(AgentConfig) if f.name == name).metadata


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
