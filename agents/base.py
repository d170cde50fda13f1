"""What every learner shares: device choice, hyperparameters, optimiser, normalisers, the
actor-critic loss, one guarded gradient step and the saved state.

A learner (:class:`Learner`) owns its batched env, its network and its optimiser. Subclasses
(:mod:`pbt_rl.agents.a2c`, :mod:`pbt_rl.agents.impala`) only decide how experience is gathered
and which targets (n-step / λ-returns or V-trace) the loss uses; everything else lives here.

Shapes: ``T`` env steps per env in an unroll, ``B`` envs in a batch, ``N = T * B`` samples.
Units: ``env_steps`` counts agent decisions summed over the member's envs (auto-reset steps
included: the env took them); ``updates`` counts gradient steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pbt_rl.config import AgentConfig, ConfigError, ExperimentConfig, tunable_agent_fields

STATE_FORMAT = 1
"""Version of the :meth:`Learner.state_dict` layout."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm was not finite; raised before the optimiser took that step.

    With several minibatch steps per update, the steps before the failing one have been applied.
    """


@dataclass
class TrainReport:
    """What one :meth:`Learner.train` call did.

    ``env_steps`` is the learner's total env step counter after the call (so it is
    ``>= until_env_steps``); everything else covers this call only: the episodes that finished
    during it, the mean losses of its updates, its number of updates and its throughput (env steps
    taken in this call / wall seconds of this call). ``extra`` holds learner-specific numbers
    (``env_steps_in_call``, ``updates_total``, ``grad_norm``, ``act_seconds``,
    ``update_seconds``, ``env_seconds`` (acting blocked on the env), ``inference_seconds``, ``batch_shape`` ``[T, B]`` of the last update, ``wall_seconds``,
    ``clip_fraction`` and ``approx_kl`` (averaged like the losses, see
    :func:`policy_ratio_stats`); IMPALA adds ``policy_lag`` and ``policy_lag_max``).
    """

    env_steps: int
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    updates: int = 0
    env_steps_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# Devices and host-to-device copies
# ----------------------------------------------------------------------------------------


def resolve_device(requested: str | None) -> torch.device:
    """``'auto'`` / None -> CUDA when available, else CPU; otherwise the named device."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"agent.device: {requested!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


_CU_CTX_SCHED = {"auto": 0x00, "spin": 0x01, "yield": 0x02, "block": 0x04}
"""CUDA driver context flags CU_CTX_SCHED_AUTO, _SPIN, _YIELD and _BLOCKING_SYNC."""


def set_gpu_wait(device: torch.device, mode: str, loader: Any = None) -> bool:
    """How this process's threads wait for ``device`` (``run.gpu_wait``); True if it was set.

    CUDA's default (``'auto'``) spins while a process has fewer contexts than the machine has
    cores, so every synchronising copy of a member busy-waits, on a core that env threads could
    use, for as long as the GPU is busy with the other members' work. ``'block'`` makes a
    waiting thread sleep until the GPU signals, ``'yield'`` spin but yield the core to other
    runnable threads. The flag is the primary context's CU_CTX_SCHED_* flag, set through the
    driver API (``cuDevicePrimaryCtxSetFlags_v2``, which also applies to an already active
    context). ``'auto'`` and CPU devices change nothing and return False, as does a missing
    driver library or call. ``loader`` (tests) stands in for ``ctypes.CDLL``.

    Measured on the H100 machine (README, Performance): for Pong A2C, 'block' lowered the
    population's rate (0.76 of raw envpool, against 0.82 spinning in the same lease): the
    wake-up latency on busy cores cost more than the freed core time.
    """
    if device.type != "cuda" or mode == "auto":
        return False
    import ctypes

    try:
        driver = (loader or ctypes.CDLL)("libcuda.so.1")
        set_flags = getattr(driver, "cuDevicePrimaryCtxSetFlags_v2")
    except (OSError, AttributeError):
        return False
    handle = ctypes.c_int()
    ordinal = device.index if device.index is not None else 0
    if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(handle), ordinal) != 0:
        return False
    return set_flags(handle, ctypes.c_uint(_CU_CTX_SCHED[mode])) == 0


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array as a tensor on ``device``, keeping its dtype (uint8 frames stay uint8).

    For CUDA the copy goes through pinned memory and does not block the host.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor detached and moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return copy.deepcopy(obj)


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = torch.as_tensor(state["keys"]).numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]))


# ----------------------------------------------------------------------------------------
# Hyperparameters
# ----------------------------------------------------------------------------------------


def coerce_hyperparameters(values: dict[str, Any]) -> dict[str, int | float]:
    """Check names, types and ranges of new hyperparameter values.

    Raises:
        KeyError: a name that is not a numeric agent-config field.
        ValueError: a value of the wrong type or outside the field's range.
    """
    tunable = tunable_agent_fields()
    unknown = sorted(set(values) - set(tunable))
    if unknown:
        raise KeyError(f"unknown hyperparameter(s) {unknown}; allowed: {', '.join(sorted(tunable))}")
    metadata = {f.name: f.metadata for f in dataclasses.fields(AgentConfig)}
    converted: dict[str, int | float] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"hyperparameter {name}: expected a number, got {value!r}")
        if tunable[name] is int:
            if not float(value).is_integer():
                raise ValueError(f"hyperparameter {name}: expected an integer, got {value!r}")
            number: int | float = int(value)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"hyperparameter {name}: expected a finite number, got {value!r}")
        meta = metadata[name]
        if ("min" in meta and number < meta["min"]) or ("max" in meta and number > meta["max"]) \
                or ("gt" in meta and not number > meta["gt"]) or ("lt" in meta and not number < meta["lt"]):
            bounds = ", ".join(f"{k} {meta[k]}" for k in ("min", "gt", "max", "lt") if k in meta)
            raise ValueError(f"hyperparameter {name}: {number!r} is out of range ({bounds})")
        converted[name] = number
    return converted


def build_optimizer(params: Any, agent: AgentConfig) -> torch.optim.Optimizer:
    """RMSProp (the IMPALA / PBT papers' optimiser) or Adam, from the agent config."""
    if agent.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=agent.lr, alpha=agent.rmsprop_alpha, eps=agent.optimizer_eps, momentum=agent.rmsprop_momentum
        )
    if agent.optimizer == "adam":
        params = list(params)
        # On CUDA the fused kernel: one launch per step instead of a dozen, for learners that
        # share one GPU with the whole population.
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.Adam(params, lr=agent.lr, betas=(agent.adam_beta1, agent.adam_beta2), eps=agent.optimizer_eps,
                                fused=fused or None)
    raise ConfigError(f"agent.optimizer: {agent.optimizer!r} is not allowed; choose 'rmsprop' or 'adam'")


def apply_optimizer_hyperparameters(optimizer: torch.optim.Optimizer, agent: AgentConfig) -> None:
    """Write lr, eps and the optimiser's own constants into its param groups, in place.

    The optimiser's accumulated statistics (square averages, moments) are kept. Turning RMSProp
    momentum on after a start with momentum 0 also creates the (zero) momentum buffers that
    torch only allocates at the first step.
    """
    for group in optimizer.param_groups:
        group["lr"] = agent.lr
        group["eps"] = agent.optimizer_eps
        if isinstance(optimizer, torch.optim.RMSprop):
            group["alpha"] = agent.rmsprop_alpha
            group["momentum"] = agent.rmsprop_momentum
            if agent.rmsprop_momentum > 0:
                for param in group["params"]:
                    state = optimizer.state.get(param)
                    if state and "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif isinstance(optimizer, torch.optim.Adam):
            group["betas"] = (agent.adam_beta1, agent.adam_beta2)


def uses_observation_normalization(agent: AgentConfig, env_family: str) -> bool:
    """'on', or 'auto' for MuJoCo envs (vector observations of very different scales)."""
    return agent.normalize_observations == "on" or (agent.normalize_observations == "auto" and env_family == "mujoco")


# ----------------------------------------------------------------------------------------
# Reward scaling
# ----------------------------------------------------------------------------------------


class RewardScaler:
    """Divides rewards by a running standard deviation of each env's discounted return.

    The discounted return ``R <- gamma * R + r`` is tracked per env id and restarted at the end
    of every learning episode (terminated or truncated); auto-reset steps (reward 0) are not
    counted. Only the scale changes, never the sign or the mean, so the optimal policy is the same.
    """

    def __init__(self, num_envs: int) -> None:
        from pbt_rl.agents.normalizer import RunningMeanStd

        # Shape (1,) rather than (): RunningMeanStd's 0-d statistics decay to numpy scalars.
        self.statistics = RunningMeanStd((1,))
        self.discounted_returns = np.zeros(num_envs, dtype=np.float64)  # [num_envs]

    def __call__(self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                 is_first: np.ndarray, env_ids: np.ndarray, gamma: float) -> np.ndarray:
        """Scaled rewards float32 ``[B]`` (clipped to +-10) for one batch; updates the statistics."""
        counted = ~np.asarray(is_first, dtype=bool)
        ids = np.asarray(env_ids, dtype=np.int64)[counted]
        self.discounted_returns[ids] = gamma * self.discounted_returns[ids] + rewards[counted]
        self.statistics.update(self.discounted_returns[ids, None])
        ended = ids[(np.asarray(terminated) | np.asarray(truncated))[counted]]
        self.discounted_returns[ended] = 0.0
        return self.statistics.scale(rewards)

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": self.statistics.state_dict(), "discounted_returns": torch.from_numpy(self.discounted_returns.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics.load_state_dict(state["statistics"])
        returns = torch.as_tensor(state["discounted_returns"]).cpu().numpy().astype(np.float64)
        if returns.shape == self.discounted_returns.shape:
            self.discounted_returns[:] = returns


# ----------------------------------------------------------------------------------------
# Unrolls and the loss
# ----------------------------------------------------------------------------------------


@dataclass
class Unroll:
    """``T`` consecutive env steps of ``B`` envs, as host (numpy) arrays.

    ``obs[t]`` is the (normalised) observation action ``actions[t]`` was chosen on; ``obs[T]``
    is the bootstrap observation after the last step. ``valid[t]`` is False for auto-reset
    steps (their action was ignored); those are left out of every loss term.
    """

    obs: np.ndarray  # [T + 1, B, *obs_shape] uint8 or float32
    actions: np.ndarray  # [T, B, *action_shape] as sampled (before clipping to the bounds)
    behaviour_log_probs: np.ndarray  # [T, B] float32 log mu(a_t | x_t) of the acting policy
    rewards: np.ndarray  # [T, B] float32 reward to learn from (scaled when normalize_returns)
    terminated: np.ndarray  # [T, B] bool
    truncated: np.ndarray  # [T, B] bool
    valid: np.ndarray  # [T, B] bool, not is_first
    policy_updates: np.ndarray  # [T, B] int64 learner update count of the weights that acted
    policy_version: int = 0  # IMPALA: experience from an older version is dropped

    @property
    def length(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_envs(self) -> int:
        return int(self.rewards.shape[1])

    @classmethod
    def empty(cls, length: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
              action_shape: tuple[int, ...], action_dtype: np.dtype) -> "Unroll":
        return cls(
            obs=np.zeros((length + 1, num_envs, *obs_shape), dtype=obs_dtype),
            actions=np.zeros((length, num_envs, *action_shape), dtype=action_dtype),
            behaviour_log_probs=np.zeros((length, num_envs), dtype=np.float32),
            rewards=np.zeros((length, num_envs), dtype=np.float32),
            terminated=np.zeros((length, num_envs), dtype=bool),
            truncated=np.zeros((length, num_envs), dtype=bool),
            valid=np.zeros((length, num_envs), dtype=bool),
            policy_updates=np.zeros((length, num_envs), dtype=np.int64),
        )

    @classmethod
    def concatenate(cls, unrolls: list["Unroll"]) -> "Unroll":
        """Unrolls of equal length side by side: ``[T, B1 + B2 + ...]``."""
        if len(unrolls) == 1:
            return unrolls[0]
        names = [f.name for f in dataclasses.fields(cls) if f.name != "policy_version"]
        return cls(**{name: np.concatenate([getattr(u, name) for u in unrolls], axis=1) for name in names},
                   policy_version=min(u.policy_version for u in unrolls))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is 1 (0 when none is).

    Masked-out entries are selected away, not multiplied by 0, so that whatever they hold
    (an auto-reset step's meaningless numbers, even inf) cannot reach the result.
    """
    return torch.where(mask > 0, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1.0)


def normalized_advantages(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(A - mean) / (std + eps)`` ``[T, B]``, mean and (population) std over the valid steps only."""
    centred = advantages - masked_mean(advantages, mask)
    return centred / (masked_mean(centred**2, mask).sqrt() + eps)


def policy_log_ratio(log_probs: Tensor, behaviour_log_probs: Tensor, mask: Tensor) -> Tensor:
    """``log pi(a|x) - log mu(a|x)`` ``[T, B]``; 0 (ratio 1) at masked-out steps.

    An auto-reset step's action was ignored by the env, so its behaviour log-prob means nothing;
    ``torch.where`` keeps it (even -inf) out of the result and out of the gradient.
    """
    return torch.where(mask > 0, log_probs - behaviour_log_probs, torch.zeros_like(log_probs))


@torch.no_grad()
def policy_ratio_stats(log_probs: Tensor, behaviour_log_probs: Tensor, mask: Tensor,
                       ppo_clip: float) -> dict[str, Tensor]:
    """How far the policy moved from the one that acted, over the valid steps (0-d tensors).

    ``clip_fraction``: fraction of steps with ``|pi/mu - 1| > ppo_clip`` (0 when ``ppo_clip`` is
    0: nothing is clipped). ``approx_kl``: mean of ``(pi/mu - 1) - log(pi/mu)``, a non-negative,
    unbiased estimate of ``KL(mu || pi)`` from the actions ``mu`` took.
    """
    log_ratio = policy_log_ratio(log_probs, behaviour_log_probs, mask)
    ratio = torch.exp(log_ratio)
    if ppo_clip > 0:
        clip_fraction = masked_mean(((ratio - 1.0).abs() > ppo_clip).float(), mask)
    else:
        clip_fraction = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    return {"clip_fraction": clip_fraction, "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask)}


def actor_critic_loss(
    log_probs: Tensor,
    entropy: Tensor,
    values: Tensor,
    advantages: Tensor,
    value_targets: Tensor,
    mask: Tensor,
    agent: AgentConfig,
    *,
    behaviour_log_probs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``policy_loss + value_cost * value_loss - entropy_cost * entropy``, all ``[T, B]`` inputs.

    ``policy_loss = -mean(A * log pi(a|x))``, or with ``agent.ppo_clip = eps > 0`` PPO's clipped
    surrogate ``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with ``r = pi(a|x) / mu(a|x)``
    against ``behaviour_log_probs`` ``log mu(a|x)`` (required then; ``r = 1`` at masked-out steps).
    ``value_loss = mean((target - V(x))^2)`` and ``entropy = mean(H(pi(.|x)))``; means are over the
    valid (``mask`` = 1) steps only. ``advantages`` and ``value_targets`` are used as constants;
    with ``agent.normalize_advantages`` the advantages are first normalised over the valid steps
    (:func:`normalized_advantages`). Returns the loss and its parts (detached) for reporting.
    """
    advantages = advantages.detach()
    if agent.normalize_advantages:
        advantages = normalized_advantages(advantages, mask)
    if agent.ppo_clip > 0:
        if behaviour_log_probs is None:
            raise ValueError("actor_critic_loss: ppo_clip > 0 needs behaviour_log_probs (log mu of the acting policy)")
        ratio = torch.exp(policy_log_ratio(log_probs, behaviour_log_probs.detach(), mask))
        clipped_ratio = torch.clamp(ratio, 1.0 - agent.ppo_clip, 1.0 + agent.ppo_clip)
        policy_loss = -masked_mean(torch.min(ratio * advantages, clipped_ratio * advantages), mask)
    else:
        policy_loss = -masked_mean(advantages * log_probs, mask)
    value_loss = masked_mean((value_targets.detach() - values) ** 2, mask)
    mean_entropy = masked_mean(entropy, mask)
    total = policy_loss + agent.value_cost * value_loss - agent.entropy_cost * mean_entropy
    parts = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "entropy": mean_entropy.detach(),
        "total_loss": total.detach(),
    }
    return total, parts


# ----------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------


class Learner:
    """Shared machinery of the actor-critic learners; see docs/design.md "Learner contract".

    Subclasses implement :meth:`train` and :meth:`_targets` (advantages and value targets of an
    unroll batch) and may extend :meth:`state_dict` through :meth:`_extra_state`.
    """

    algo = "base"

    def __init__(self, config: ExperimentConfig, seed: int, device: str | None = None,
                 num_threads: int | None = None, fixed_env_groups: bool = False) -> None:
        from pbt_rl.agents.networks import build_actor_critic
        from pbt_rl.agents.normalizer import RunningMeanStd
        from pbt_rl.envs import make_env

        self.config = config
        self.agent_cfg: AgentConfig = config.agent
        self.seed = int(seed)
        self.device = resolve_device(device if device is not None else config.agent.device)
        env_threads = config.env.num_threads or (num_threads or 0)
        if config.run.torch_threads:
            torch.set_num_threads(config.run.torch_threads)
        elif num_threads:
            # The runtime gives each member a share of the cores; torch must not take them from
            # the env threads. On CUDA torch's CPU threads only launch kernels: one is enough.
            torch.set_num_threads(max(1, int(num_threads)) if self.device.type == "cpu" else 1)
        if self.device.type == "cuda":
            set_gpu_wait(self.device, config.run.gpu_wait)
            # Fixed input shapes: let cuDNN pick its fastest conv algorithms; TF32 matmuls and
            # convs are ample precision for policy-gradient training and much faster on Ampere+.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)

        self.env = make_env(config.env, config.env.num_envs, self.seed, num_threads=env_threads,
                            fixed_groups=fixed_env_groups)
        self.model = build_actor_critic(self.env.observation_space, self.env.action_space, self.agent_cfg).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), self.agent_cfg)
        self.obs_normalizer = (
            RunningMeanStd(tuple(self.env.observation_space.shape))
            if uses_observation_normalization(self.agent_cfg, self.env.family) else None
        )
        self.reward_scaler = RewardScaler(self.env.num_envs) if self.agent_cfg.normalize_returns else None
        self._env_steps = 0
        self.updates = 0
        self._closed = False

    # -- counters -----------------------------------------------------------------------------

    @property
    def env_steps(self) -> int:
        """Env steps taken so far, summed over this member's envs."""
        return self._env_steps

    @env_steps.setter
    def env_steps(self, value: int) -> None:
        self._env_steps = int(value)

    # -- hyperparameters ----------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, int | float]:
        """Every numeric agent-config field and its current value."""
        return {name: getattr(self.agent_cfg, name) for name in tunable_agent_fields()}

    def set_hyperparameters(self, values: dict[str, Any]) -> None:
        """Change hyperparameters; they take effect at the next update (and the next unroll).

        Raises:
            KeyError: an unknown name (nothing is changed).
            ValueError: a value of the wrong type or out of range (nothing is changed).
        """
        converted = coerce_hyperparameters(dict(values))
        self.agent_cfg = dataclasses.replace(self.agent_cfg, **converted)
        apply_optimizer_hyperparameters(self.optimizer, self.agent_cfg)
        self._hyperparameters_changed(set(converted))

    def _hyperparameters_changed(self, names: set[str]) -> None:
        """Hook for subclasses (e.g. to resize buffers); ``self.agent_cfg`` is already updated."""

    # -- acting -------------------------------------------------------------------------------

    def _prepare_obs(self, raw_obs: np.ndarray, update_statistics: bool) -> np.ndarray:
        """Observations as the network takes them: normalised float32 when normalisation is on."""
        if self.obs_normalizer is None:
            return raw_obs
        if update_statistics:
            self.obs_normalizer.update(raw_obs)
        return np.asarray(self.obs_normalizer.normalize(raw_obs), dtype=np.float32)

    def _scale_rewards(self, batch: Any) -> np.ndarray:
        """The learning rewards of a StepBatch, divided by the return scale when that is on."""
        rewards = np.asarray(batch.reward, dtype=np.float32)
        if self.reward_scaler is None:
            return rewards
        return self.reward_scaler(rewards, batch.terminated, batch.truncated, batch.is_first, batch.env_ids,
                                  self.agent_cfg.gamma)

    def _policy_step(self, model: torch.nn.Module, obs: np.ndarray,
                     deterministic: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample actions for prepared observations ``[B, ...]`` with ``model`` (or take the mode).

        Returns host arrays ``(actions as sampled, env actions (clipped to the bounds), log_probs)``.
        One device-to-host copy per call (:meth:`ActorCritic.act_packed`): with several members
        time-slicing one GPU every extra sync can wait for another process's kernels.

        Raises:
            TrainingDiverged: non-finite actions or log-probabilities from non-finite weights.
        """
        with torch.no_grad():
            packed = model.act_packed(to_device(obs, self.device), deterministic=deterministic).cpu().numpy()
        log_probs = packed[:, -1].astype(np.float32)
        if not np.isfinite(packed).all():
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingDiverged("non-finite policy weights while acting")
            raise ValueError("non-finite actions or log-probabilities from finite weights: check the observations")
        if model.is_continuous:
            actions = packed[:, :-1].astype(np.float32)
        else:
            actions = packed[:, 0].astype(np.int64)
        return actions, model.env_actions(actions), log_probs

    def act(self, raw_obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Env actions ``[B, ...]`` of the current policy for raw observations ``[B, ...]``.

        Samples (advancing the torch RNG), or takes the mode when ``deterministic``; the
        observation statistics are used but not updated.
        """
        obs = self._prepare_obs(np.asarray(raw_obs), update_statistics=False)
        _, env_actions, _ = self._policy_step(self.model, obs, deterministic)
        return env_actions

    # -- learning -----------------------------------------------------------------------------

    def _batch_tensors(self, unroll: Unroll) -> dict[str, Tensor]:
        names = ("obs", "actions", "behaviour_log_probs", "rewards", "terminated", "truncated", "valid")
        return {name: to_device(getattr(unroll, name), self.device) for name in names}

    def _targets(self, batch: dict[str, Tensor], log_probs: Tensor, values: Tensor,
                 bootstrap_value: Tensor) -> tuple[Tensor, Tensor]:
        """``(advantages, value_targets)`` ``[T, B]`` for one batch; learner specific."""
        raise NotImplementedError

    def _update(self, unroll: Unroll) -> dict[str, float]:
        """Learn from ``unroll`` ``[T, B]``: ``num_epochs`` passes of ``num_minibatches`` gradient steps.

        Each pass splits a random permutation of the ``B`` env columns (global torch RNG, on the
        CPU) into ``min(num_minibatches, B)`` minibatches of whole unrolls; with one minibatch
        there is no permutation (and no RNG draw). Every minibatch takes one gradient step with
        its targets recomputed from the current weights (:meth:`_minibatch_step`), so
        ``num_epochs = num_minibatches = 1`` is the classic single A2C / IMPALA update.

        Returns the mean over the gradient steps of the loss parts, ``grad_norm``,
        ``clip_fraction`` and ``approx_kl`` (see :func:`policy_ratio_stats`).

        Raises:
            TrainingDiverged: non-finite loss or gradient norm. The failing step has changed no
                parameter or optimiser state; the steps of earlier minibatches of this call have
                been applied (and counted in ``updates``).
        """
        agent = self.agent_cfg
        batch = self._batch_tensors(unroll)
        num_envs = unroll.num_envs
        num_minibatches = min(agent.num_minibatches, num_envs)
        names: list[str] = []
        totals: Tensor | None = None  # summed on the device: one host copy at the end, not per step
        steps = 0
        for _epoch in range(agent.num_epochs):
            if num_minibatches == 1:
                minibatches = [batch]
            else:
                order = torch.randperm(num_envs).to(self.device)
                minibatches = [{name: tensor.index_select(1, columns) for name, tensor in batch.items()}
                               for columns in torch.tensor_split(order, num_minibatches)]
            for minibatch in minibatches:
                parts, grad_norm = self._minibatch_step(minibatch)
                parts = {**parts, "grad_norm": grad_norm}
                names = list(parts)
                stacked = torch.stack([parts[name].float() for name in names])
                totals = stacked if totals is None else totals + stacked
                steps += 1
        return dict(zip(names, (totals / steps).tolist()))

    def _learn(self, unroll: Unroll, stats: "CallStats") -> None:
        """:meth:`_update` on ``unroll``, accounted in ``stats`` with its number of gradient steps."""
        updates_before = self.updates
        losses = self._update(unroll)
        stats.add_update(losses, unroll, self.updates - updates_before)

    def _minibatch_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """One gradient step on a (mini)batch of whole unrolls, as device tensors ``[T, b, ...]``.

        Returns the loss parts and :func:`policy_ratio_stats` and the gradient norm (0-d tensors).
        """
        obs = batch["obs"]  # [T + 1, b, ...]
        length, num_envs = batch["rewards"].shape
        # One forward pass over the T + 1 observations: the last row gives the bootstrap value
        # (its action is a placeholder: the value does not depend on it).
        actions = torch.cat([batch["actions"], batch["actions"][-1:]], dim=0)
        log_probs, entropy, values = self.model.evaluate(obs.flatten(0, 1), actions.flatten(0, 1))
        log_probs = log_probs.view(length + 1, num_envs)[:length]
        entropy = entropy.view(length + 1, num_envs)[:length]
        values = values.view(length + 1, num_envs)
        bootstrap_value = values[length].detach()
        values = values[:length]
        advantages, value_targets = self._targets(batch, log_probs, values, bootstrap_value)
        mask = batch["valid"].float()
        behaviour_log_probs = batch["behaviour_log_probs"]
        loss, parts = actor_critic_loss(log_probs, entropy, values, advantages, value_targets, mask, self.agent_cfg,
                                        behaviour_log_probs=behaviour_log_probs)
        parts.update(policy_ratio_stats(log_probs, behaviour_log_probs, mask, self.agent_cfg.ppo_clip))
        grad_norm = self._gradient_step(loss)
        self.updates += 1
        return parts, grad_norm

    def _gradient_step(self, loss: Tensor) -> Tensor:
        """Backward, clip, check and step; returns the gradient norm before clipping (0-d tensor).

        The loss and the gradient norm are checked together, in the step's one wait for the
        device, before the optimiser moves: a non-finite one raises :class:`TrainingDiverged`
        with parameters and optimiser state untouched.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.agent_cfg.max_grad_norm if self.agent_cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        if not torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all().item():
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss.item()) else "gradient norm"
            raise TrainingDiverged(f"non-finite {what} (loss {loss.item()}, gradient norm {grad_norm.item()}) "
                                   f"at update {self.updates}")
        self.optimizer.step()
        return grad_norm

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything this member is: a copy made of CPU tensors and plain Python values, so that
        ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        state = {
            "format": STATE_FORMAT,
            "algo": self.algo,
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "obs_normalizer": None if self.obs_normalizer is None else copy.deepcopy(self.obs_normalizer.state_dict()),
            "return_normalizer": None if self.reward_scaler is None else copy.deepcopy(self.reward_scaler.state_dict()),
            "env_steps": self.env_steps,
            "updates": self.updates,
            "hyperparameters": self.hyperparameters(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": _numpy_rng_state(),
            },
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any], *, resume: bool = True) -> None:
        """Become the member saved in ``state``.

        ``resume=True`` (a restart) also restores the counters and the RNG states.
        ``resume=False`` (a PBT exploit) takes the weights, optimiser, normalisers and
        hyperparameters but keeps this learner's own ``env_steps``, ``updates`` and RNG streams.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"learner state format {state.get('format')!r} is not {STATE_FORMAT}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.agent_cfg = dataclasses.replace(self.agent_cfg, **coerce_hyperparameters(state["hyperparameters"]))
        apply_optimizer_hyperparameters(self.optimizer, self.agent_cfg)
        if self.obs_normalizer is not None and state.get("obs_normalizer") is not None:
            self.obs_normalizer.load_state_dict(copy.deepcopy(state["obs_normalizer"]))
        if self.reward_scaler is not None and state.get("return_normalizer") is not None:
            self.reward_scaler.load_state_dict(copy.deepcopy(state["return_normalizer"]))
        if resume:
            self.env_steps = int(state["env_steps"])
            self.updates = int(state["updates"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            _set_numpy_rng_state(rng["numpy"])
        self._hyperparameters_changed(set(state["hyperparameters"]))
        self._state_loaded()

    def _extra_state(self) -> dict[str, Any]:
        """Hook: more entries for :meth:`state_dict`."""
        return {}

    def _state_loaded(self) -> None:
        """Hook: called at the end of :meth:`load_state_dict`."""

    def drop_stale_experience(self) -> None:
        """Forget experience gathered by an older policy (no-op unless the learner queues it)."""

    def close(self) -> None:
        """Release the env. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self.env.close()

    def __enter__(self) -> "Learner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CallStats:
    """Accumulates what one ``train`` call did, and turns it into a :class:`TrainReport`."""

    def __init__(self, env_steps_at_start: int) -> None:
        self.started = time.perf_counter()
        self.env_steps_at_start = env_steps_at_start
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.loss_sums: dict[str, float] = {}
        self.batches = 0  # _update calls (one per batch of unrolls)
        self.updates = 0  # gradient steps
        self.batch_shape: list[int] = []
        self.act_seconds = 0.0
        self.update_seconds = 0.0
        self.env_seconds = 0.0  # acting blocked on the env (step / recv)
        self.inference_seconds = 0.0  # acting in the policy (observations in, actions out)

    def add_episodes(self, returns: np.ndarray, lengths: np.ndarray) -> None:
        self.episode_returns.extend(float(r) for r in returns)
        self.episode_lengths.extend(int(n) for n in lengths)

    def add_update(self, stats: dict[str, float], unroll: Unroll, gradient_steps: int = 1) -> None:
        """Account one batch's update (``gradient_steps`` steps with epochs and minibatches)."""
        for name, value in stats.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
        self.batches += 1
        self.updates += gradient_steps
        self.batch_shape = [unroll.length, unroll.num_envs]

    def report(self, env_steps: int, updates_total: int, **extra: Any) -> TrainReport:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        means = {name: total / self.batches for name, total in self.loss_sums.items()} if self.batches else {}
        grad_norm = means.pop("grad_norm", float("nan"))
        # Diagnostics of the policy ratio, not loss terms: reported beside grad_norm.
        ratio_stats = {name: means.pop(name, float("nan")) for name in ("clip_fraction", "approx_kl")}
        steps = env_steps - self.env_steps_at_start
        return TrainReport(
            env_steps=env_steps,
            episode_returns=self.episode_returns,
            episode_lengths=self.episode_lengths,
            losses=means,
            updates=self.updates,
            env_steps_per_second=steps / seconds,
            extra={
                "env_steps_in_call": steps,
                "updates_total": updates_total,
                "grad_norm": grad_norm,
                **ratio_stats,
                "act_seconds": self.act_seconds,
                "update_seconds": self.update_seconds,
                "env_seconds": self.env_seconds,
                "inference_seconds": self.inference_seconds,
                "batch_shape": self.batch_shape,
                "wall_seconds": seconds,
                **extra,
            },
        )
