"""The learner state record: everything a member is, as one unit that a checkpoint holds and a PBT
exploit copies (in the spirit of moolib's ``LearnerState``).

:class:`LearnerState` holds the weights, the optimiser, the normalisers, the counters and the
learner's own random generators. Its :meth:`~LearnerState.state_dict` is made of CPU tensors and
plain Python values only (generator states are uint8 tensors), so ``torch.load(...,
weights_only=True)`` reads it back.

Random streams. A learner never draws from the process's generators and never seeds them:

- ``acting``: action sampling (:meth:`~pbt_rl.agents.networks.ActorCritic.act_packed`), on the
  device the policy acts on (IMPALA: only the actor thread draws from it);
- ``update``: minibatch permutations of the update, on the CPU (IMPALA: the learner thread).

:func:`seeded_build` makes both, and initialises the weights reproducibly from the seed.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from pbt_rl.agents.normalizer import RewardScaler, RunningMeanStd

UPDATE_STREAM = 1
"""Spawn key of the update generator's seed (:func:`stream_seed`)."""


def stream_seed(seed: int, stream: int) -> int:
    """A 64-bit seed for random stream ``stream`` of a learner seeded ``seed``, independent of
    ``seed`` itself and of the other streams (``numpy.random.SeedSequence`` spawn keys)."""
    return int(np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, dtype=np.uint64)[0])


_BUILD_LOCK = threading.Lock()


def seeded_build(seed: int, device: torch.device,
                 build: Callable[[], nn.Module]) -> tuple[nn.Module, torch.Generator, torch.Generator]:
    """``build()`` on the CPU with reproducible weights, and the learner's acting and update generators.

    ``build`` runs under :func:`torch.random.fork_rng` with the CPU generator seeded with
    ``seed``, so module initialisation (which draws from the process's generator) gives the same
    weights for the same seed, and the process's own CPU stream is restored afterwards. The
    acting generator gives the numbers ``torch.manual_seed(seed)`` gave the process before
    learners had generators of their own: on the CPU it continues the stream that initialised the
    weights, on CUDA it is a generator on ``device`` seeded with ``seed``. The update generator
    (CPU) is seeded with :func:`stream_seed` ``(seed, UPDATE_STREAM)``.

    Returns ``(model on the CPU, acting generator, update generator)``.
    """
    # One build at a time per process: members of one host build their learners in parallel
    # threads, and the process's generator is the one thing they would share.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = build()
        if device.type == "cpu":
            acting = torch.Generator()
            acting.set_state(torch.default_generator.get_state())
        else:
            acting = torch.Generator(device=device).manual_seed(seed)
    update = torch.Generator().manual_seed(stream_seed(seed, UPDATE_STREAM))
    return model, acting, update


def generator_state(generator: torch.Generator) -> dict[str, Any]:
    """``{"device": 'cpu' | 'cuda', "state": uint8 tensor}`` of a generator."""
    return {"device": generator.device.type, "state": generator.get_state()}


def load_generator_state(generator: torch.Generator, saved: dict[str, Any]) -> bool:
    """Restore a :func:`generator_state` into ``generator``; True if it was restored.

    A CUDA stream cannot continue on the CPU (nor the other way round): a state saved on another
    device type is left out, and ``generator`` keeps its own stream.
    """
    if saved["device"] != generator.device.type:
        return False
    generator.set_state(torch.as_tensor(saved["state"]).to("cpu", torch.uint8))
    return True


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor detached and moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return copy.deepcopy(obj)


@dataclass(eq=False)
class LearnerState:
    """Weights, optimiser, normalisers, counters and random generators of one learner.

    Units: ``env_steps`` counts env steps summed over the learner's envs; ``updates`` counts
    gradient steps. Objects are loaded in place (:meth:`load_state_dict`), never replaced, so
    references to the model or the optimiser stay valid.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    obs_normalizer: RunningMeanStd | None
    reward_scaler: RewardScaler | None
    acting_generator: torch.Generator
    update_generator: torch.Generator
    env_steps: int = 0
    updates: int = 0

    def state_dict(self) -> dict[str, Any]:
        """A copy made of CPU tensors and plain Python values (``torch.load(weights_only=True)`` reads it)."""
        return {
            "model": to_cpu(self.model.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "obs_normalizer": None if self.obs_normalizer is None else copy.deepcopy(self.obs_normalizer.state_dict()),
            "return_normalizer": None if self.reward_scaler is None else copy.deepcopy(self.reward_scaler.state_dict()),
            "env_steps": int(self.env_steps),
            "updates": int(self.updates),
            "rng": {"acting": generator_state(self.acting_generator), "update": generator_state(self.update_generator)},
        }

    def load_state_dict(self, state: dict[str, Any], *, resume: bool) -> None:
        """Take the weights, optimiser and normalisers of ``state``; with ``resume`` also its
        counters and random streams (a restart), without it keep this learner's own (an exploit)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.obs_normalizer is not None and state.get("obs_normalizer") is not None:
            self.obs_normalizer.load_state_dict(copy.deepcopy(state["obs_normalizer"]))
        if self.reward_scaler is not None and state.get("return_normalizer") is not None:
            self.reward_scaler.load_state_dict(copy.deepcopy(state["return_normalizer"]))
        if resume:
            self.env_steps = int(state["env_steps"])
            self.updates = int(state["updates"])
            load_generator_state(self.acting_generator, state["rng"]["acting"])
            load_generator_state(self.update_generator, state["rng"]["update"])
