"""An exported policy (``pbt-rl export``) and its loader: :func:`load_policy` maps observations to actions.

This module owns the exported folder's format; :mod:`pbt_rl.export` writes it with the names and
encoders below. The folder (docs/ecosystem.md, "Exporting a model"):

- ``model.safetensors``: the actor-critic's ``state_dict`` under ``model.`` (the torso, the policy
  and value heads, and ``log_std`` for Box actions) and, when the member normalised its
  observations, the running statistics ``obs_normalizer.mean`` / ``.var`` (float64, the shape of
  one observation) and ``obs_normalizer.count`` (float64, 0-d);
- ``policy.json``: what rebuilds the network without an env (:data:`POLICY_FORMAT`): the
  observation's shape and dtype, the action space (``discrete`` with ``n``, or ``box`` with shape,
  dtype and bounds, an infinite bound written as ``"inf"`` / ``"-inf"``), the network settings for
  :func:`pbt_rl.agents.networks.build_actor_critic`, and the observation normalisation (``clip``,
  ``epsilon``);
- ``config.yaml``, ``schedule.json`` and ``README.md`` (the model card) for people.

Observations are what pbt-rl's env delivers (docs/envs.md): float32 vectors (Discrete Gymnasium
observations one-hot encoded) or uint8 ``[C, H, W]`` frame stacks on Atari. Actions are what the
env takes: ``int64 [N]`` or ``[N, *shape]`` clipped to the Box bounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pbt_rl.config import AgentConfig, ConfigError, abbreviate

POLICY_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
POLICY_FILE = "policy.json"
CONFIG_FILE = "config.yaml"
SCHEDULE_FILE = "schedule.json"
MODEL_CARD_FILE = "README.md"
MODEL_PREFIX = "model."
NORMALIZER_PREFIX = "obs_normalizer."


def encode_bounds(values: Any) -> list:
    """Box bounds as JSON: a flat list of numbers, ``"inf"`` / ``"-inf"`` where unbounded."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return [float(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") for v in flat]


def decode_bounds(values: list, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`encode_bounds`, as float64 ``shape``."""
    return np.array([float(v) for v in values], dtype=np.float64).reshape(shape)


def spaces_from_spec(spec: dict):
    """``(observation_space, action_space)`` (Gymnasium spaces) described by a policy.json."""
    import gymnasium as gym

    observation = spec["observation"]
    shape = tuple(int(n) for n in observation["shape"])
    dtype = np.dtype(observation["dtype"])
    if dtype == np.uint8:
        observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
    else:
        observation_space = gym.spaces.Box(-np.inf, np.inf, shape, dtype)
    action = spec["action"]
    if action["kind"] == "discrete":
        action_space = gym.spaces.Discrete(int(action["n"]))
    else:
        action_shape = tuple(int(n) for n in action["shape"])
        action_dtype = np.dtype(action["dtype"])
        action_space = gym.spaces.Box(decode_bounds(action["low"], action_shape).astype(action_dtype),
                                      decode_bounds(action["high"], action_shape).astype(action_dtype),
                                      action_shape, action_dtype)
    return observation_space, action_space


def agent_config_from_spec(spec: dict) -> AgentConfig:
    """The agent settings :func:`~pbt_rl.agents.networks.build_actor_critic` reads."""
    network = spec["network"]
    return AgentConfig(network=network["torso"], hidden_sizes=tuple(int(n) for n in network["hidden_sizes"]),
                       log_std_init=float(network["log_std_init"]), device="cpu")


def read_spec(folder: Path) -> dict:
    """policy.json of an exported folder; ConfigError (one line) when the folder is not one."""
    shown = abbreviate(str(folder))
    path = folder / POLICY_FILE
    if not folder.is_dir():
        raise ConfigError(f"exported policy not found: {shown} is not a directory")
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{shown} is not an exported pbt-rl policy (needs {POLICY_FILE} and {WEIGHTS_FILE}; "
                          f"see `pbt-rl export`)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {abbreviate(str(path))}: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format") != POLICY_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else None
        raise ConfigError(f"{abbreviate(str(path))}: policy format {found!r} is not {POLICY_FORMAT}")
    return spec


class Policy:
    """Observations ``[N, *observation_shape]`` -> env actions, with the member's weights and its
    observation normalisation. Build it with :func:`load_policy`.

    Attributes: ``spec`` (policy.json), ``model`` (the :class:`~pbt_rl.agents.networks.ActorCritic`,
    in eval mode), ``observation_space`` and ``action_space`` (Gymnasium spaces), ``device``.
    """

    def __init__(self, spec: dict, model, obs_normalizer, device, seed: int) -> None:
        import torch

        self.spec = spec
        self.model = model
        self.obs_normalizer = obs_normalizer  # a RunningMeanStd, or None
        self.device = device
        self.observation_space, self.action_space = spaces_from_spec(spec)
        self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """Observations as the network takes them: normalised float32 when the member normalised."""
        if self.obs_normalizer is None:
            return obs
        settings = self.spec["observation_normalization"]
        return np.asarray(self.obs_normalizer.normalize(obs, clip=settings["clip"]), dtype=np.float32)

    def __call__(self, obs: np.ndarray, deterministic: bool = True, *, generator=None,
                 seed: int | None = None) -> np.ndarray:
        """Env actions for a batch of observations ``[N, *observation_shape]``.

        ``deterministic`` (default) takes the mode: the argmax of the logits, or the Gaussian
        mean clipped to the bounds. ``deterministic=False`` samples, drawing from ``generator``
        (a ``torch.Generator`` on :attr:`device`), else from a fresh one seeded with ``seed``,
        else from the policy's own generator (seeded by :func:`load_policy`).
        """
        import torch

        from pbt_rl.agents.device import to_device

        obs = np.asarray(obs)
        expected = self.observation_space.shape
        if obs.shape[1:] != expected:
            raise ValueError(f"observations must be a batch [N, *{expected}], got shape {obs.shape}")
        if generator is None:
            generator = self.generator if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        prepared = self.normalize(obs)
        with torch.no_grad():
            packed = self.model.act_packed(to_device(prepared, self.device), deterministic=deterministic,
                                           generator=generator).cpu().numpy()
        return self.model.unpack(packed)[1]  # the learner's own conversion (Learner.policy_step)

    def __repr__(self) -> str:
        return (f"Policy({self.spec.get('env_id')!r}, algo={self.spec.get('algo')!r}, member={self.spec.get('member')}, "
                f"env_steps={self.spec.get('checkpoint_env_steps')}, device={self.device})")


def load_policy(path: str | Path, device: str = "cpu", seed: int = 0) -> Policy:
    """The policy that ``pbt-rl export`` wrote to the folder ``path``, on ``device`` (CPU by default).

    ``policy(obs)`` maps a numpy batch of observations to actions (see :class:`Policy`); ``seed``
    seeds the policy's own generator for sampled actions. ConfigError (one line) when ``path`` is
    not an exported policy of this format.
    """
    import torch
    from safetensors.torch import load_file

    from pbt_rl.agents.device import resolve_device
    from pbt_rl.agents.networks import build_actor_critic
    from pbt_rl.agents.normalizer import RunningMeanStd

    folder = Path(path)
    spec = read_spec(folder)
    target = resolve_device(device)
    tensors = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    observation_space, action_space = spaces_from_spec(spec)
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten; leave the process's stream alone
        model = build_actor_critic(observation_space, action_space, agent_config_from_spec(spec))
    model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)})
    model = model.to(target).eval()
    normalizer = None
    settings = spec["observation_normalization"]
    if settings["enabled"]:
        normalizer = RunningMeanStd(observation_space.shape, epsilon=float(settings["epsilon"]))
        normalizer.load_state_dict({"mean": tensors[NORMALIZER_PREFIX + "mean"], "var": tensors[NORMALIZER_PREFIX + "var"],
                                    "count": float(tensors[NORMALIZER_PREFIX + "count"])})
    return Policy(spec, model, normalizer, target, seed)
