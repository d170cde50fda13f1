"""Actor-critic networks: observation torsos and policy/value heads (torch.nn).

Torsos map a batch of observations to features ``[B, output_dim]``:

- :class:`NatureCNN` (Mnih et al. 2015) and :class:`ImpalaResNet` (Espeholt et al. 2018, the
  15-layer "deep" network) take raw pixels ``[B, C, H, W]`` (uint8 or float in 0..255) and scale
  them by 1/255 *inside* the network, so the rollout can move uint8 (4x fewer bytes) to the device.
- :class:`MLPTorso` takes vectors ``[B, obs_dim]`` (already normalised by the learner if asked).

:class:`ActorCritic` puts a categorical head (``Discrete``) or a diagonal Gaussian head with a
state-independent learnable ``log_std`` (``Box``) and a scalar value head on a torso.

Box action bounds: actions are sampled from the *unclipped* Gaussian, the learner stores and
scores (log-prob, V-trace ratios) that unclipped sample, and only the copy sent to the env is
clipped to the bounds (:meth:`ActorCritic.env_actions`). This keeps log-probabilities exact and
cheap and entropies analytic; the cost is that the policy sees no gradient signal from the
clipping, which is the usual trade-off for PPO/A2C on MuJoCo. Tanh squashing was not chosen
because its log-prob correction is numerically fragile near the bounds and its entropy has no
closed form.

Initialisation is orthogonal with biases 0: gain sqrt(2) in the torsos (ReLU/tanh layers),
0.01 for the policy head (near-uniform / near-zero-mean initial policy), 1.0 for the value head.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from pbt_rl.config import AgentConfig

TORSO_GAIN = math.sqrt(2.0)
POLICY_HEAD_GAIN = 0.01
VALUE_HEAD_GAIN = 1.0


def orthogonal_init(layer: nn.Module, gain: float) -> nn.Module:
    """Orthogonal weights scaled by ``gain`` and zero biases for a Linear or Conv2d; returns it."""
    nn.init.orthogonal_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _pixels_to_unit_range(obs: Tensor) -> Tensor:
    """uint8 (or float) pixels in 0..255 -> float32 in [0, 1]."""
    return obs.float() / 255.0


class NatureCNN(nn.Module):
    """The DQN-Nature torso: conv 32 8x8/4, conv 64 4x4/2, conv 64 3x3/1, fc 512, ReLUs.

    Input ``[B, C, H, W]`` pixels 0..255 (``C`` stacked frames, 84x84 by default); output
    ``[B, 512]``.
    """

    def __init__(self, in_channels: int = 4, image_size: int = 84, output_dim: int = 512) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            orthogonal_init(nn.Conv2d(in_channels, 32, kernel_size=8, stride=4), TORSO_GAIN),
            nn.ReLU(),
            orthogonal_init(nn.Conv2d(32, 64, kernel_size=4, stride=2), TORSO_GAIN),
            nn.ReLU(),
            orthogonal_init(nn.Conv2d(64, 64, kernel_size=3, stride=1), TORSO_GAIN),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            conv_features = self.convs(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(orthogonal_init(nn.Linear(conv_features, output_dim), TORSO_GAIN), nn.ReLU())
        self.output_dim = output_dim

    def forward(self, obs: Tensor) -> Tensor:
        """``[B, C, H, W]`` pixels -> ``[B, output_dim]`` features."""
        return self.fc(self.convs(_pixels_to_unit_range(obs)))


class _ResidualBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), both convs 3x3 stride 1 with the block's channel count."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = orthogonal_init(nn.Conv2d(channels, channels, kernel_size=3, padding=1), TORSO_GAIN)
        self.conv1 = orthogonal_init(nn.Conv2d(channels, channels, kernel_size=3, padding=1), TORSO_GAIN)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


class _ImpalaSection(nn.Module):
    """conv 3x3/1 -> max-pool 3x3/2 (padding 1, halves H and W rounding up) -> 2 residual blocks."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = orthogonal_init(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1), TORSO_GAIN)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.blocks = nn.Sequential(_ResidualBlock(channels), _ResidualBlock(channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pool(self.conv(x)))


class ImpalaResNet(nn.Module):
    """The IMPALA "deep" torso: 3 sections (channels 16, 32, 32) of conv + max-pool + 2 residual
    blocks (15 conv layers), then ReLU, fc ``output_dim`` (256), ReLU.

    Input ``[B, C, H, W]`` pixels 0..255; for 84x84 the spatial size goes 84 -> 42 -> 21 -> 11.
    Output ``[B, output_dim]``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        image_size: int = 84,
        channels: tuple[int, ...] = (16, 32, 32),
        output_dim: int = 256,
    ) -> None:
        super().__init__()
        sections = []
        previous = in_channels
        for section_channels in channels:
            sections.append(_ImpalaSection(previous, section_channels))
            previous = section_channels
        self.sections = nn.Sequential(*sections, nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            conv_features = self.sections(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(orthogonal_init(nn.Linear(conv_features, output_dim), TORSO_GAIN), nn.ReLU())
        self.output_dim = output_dim

    def forward(self, obs: Tensor) -> Tensor:
        """``[B, C, H, W]`` pixels -> ``[B, output_dim]`` features."""
        return self.fc(self.sections(_pixels_to_unit_range(obs)))


class MLPTorso(nn.Module):
    """Fully connected tanh layers for vector observations: ``[B, obs_dim]`` -> ``[B, hidden_sizes[-1]]``.

    Inputs with more than one feature dimension are flattened first.
    """

    def __init__(self, obs_dim: int, hidden_sizes: tuple[int, ...] | list[int] = (64, 64)) -> None:
        super().__init__()
        if not hidden_sizes:
            raise ValueError("MLPTorso needs at least one hidden layer")
        layers: list[nn.Module] = [nn.Flatten()]
        previous = obs_dim
        for width in hidden_sizes:
            layers += [orthogonal_init(nn.Linear(previous, width), TORSO_GAIN), nn.Tanh()]
            previous = width
        self.layers = nn.Sequential(*layers)
        self.output_dim = previous

    def forward(self, obs: Tensor) -> Tensor:
        """``[B, obs_dim]`` -> ``[B, output_dim]``."""
        return self.layers(obs.float())


class ActorCritic(nn.Module):
    """A torso with a policy head and a value head.

    ``torso`` must have an ``output_dim`` attribute. For ``Discrete(A)`` the policy is
    categorical over ``A`` logits; for ``Box`` of shape ``(D,)`` (or any shape, flattened to
    ``D``) it is a diagonal Gaussian with a learnable state-independent ``log_std`` ``[D]``
    initialised to ``log_std_init``. Actions are ``int64 [N]`` (Discrete) or ``float32 [N, D]``
    (Box, unclipped; see the module docstring and :meth:`env_actions`).
    """

    def __init__(self, torso: nn.Module, action_space: gym.Space, log_std_init: float = 0.0) -> None:
        super().__init__()
        self.torso = torso
        self.action_space = action_space
        features = torso.output_dim
        if isinstance(action_space, gym.spaces.Discrete):
            self.is_continuous = False
            self.policy_head = orthogonal_init(nn.Linear(features, int(action_space.n)), POLICY_HEAD_GAIN)
            self.log_std = None
        elif isinstance(action_space, gym.spaces.Box):
            self.is_continuous = True
            self.action_dim = int(np.prod(action_space.shape))
            self.policy_head = orthogonal_init(nn.Linear(features, self.action_dim), POLICY_HEAD_GAIN)
            self.log_std = nn.Parameter(torch.full((self.action_dim,), float(log_std_init)))
            # The bounds in the space's dtype (they are values of it), so clipping needs no cast after;
            # infinite bounds make clipping a no-op on that side.
            self._action_low = np.asarray(action_space.low, dtype=action_space.dtype).reshape(-1)
            self._action_high = np.asarray(action_space.high, dtype=action_space.dtype).reshape(-1)
        else:
            raise ValueError(
                f"unsupported action space {action_space!r}: only Discrete and Box are supported"
            )
        self.value_head = orthogonal_init(nn.Linear(features, 1), VALUE_HEAD_GAIN)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``obs`` ``[N, ...]`` -> (distribution parameters, value ``[N]``).

        The distribution parameters are the logits ``[N, A]`` (Discrete) or the Gaussian means
        ``[N, D]`` (Box; the standard deviation is ``exp(self.log_std)``, the same for every
        state). Turn them into a distribution with :meth:`distribution`.
        """
        features = self.torso(obs)
        return self.policy_head(features), self.value_head(features).squeeze(-1)

    def distribution(self, dist_params: Tensor) -> Distribution:
        """Categorical over logits ``[N, A]`` or Normal with means ``[N, D]`` and ``exp(log_std)``.

        Not validated (``validate_args=False``): a check of the parameters, and of the actions
        :meth:`evaluate` scores, is a device-to-host wait each (two or three per gradient step on a GPU,
        where the learner's step is launch-bound). Non-finite parameters give a non-finite loss
        instead, which the learner's gradient step refuses (``TrainingDiverged``)."""
        if not self.is_continuous:
            return Categorical(logits=dist_params, validate_args=False)
        return Normal(dist_params, torch.exp(self.log_std).expand_as(dist_params), validate_args=False)

    def _log_prob(self, distribution: Distribution, actions: Tensor) -> Tensor:
        log_prob = distribution.log_prob(actions)
        return log_prob.sum(-1) if self.is_continuous else log_prob

    def _entropy(self, distribution: Distribution) -> Tensor:
        entropy = distribution.entropy()
        return entropy.sum(-1) if self.is_continuous else entropy

    def act_packed(self, obs: Tensor, deterministic: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
        """Sample actions for a batch of observations ``[N, ...]``, with one device-to-host copy
        needed and no other sync.

        Returns float64 ``[N, k + 1]`` rows ``(action..., log_prob)``: ``k = 1`` (the action index)
        for Discrete, ``k = D`` (unclipped) for Box; float64 holds both exactly. The actions follow
        :meth:`distribution` (categorical by the Gumbel-max trick, Gaussian by reparameterisation),
        with every random number drawn from ``generator`` (on the device of ``obs``; None = torch's
        default generator). ``deterministic`` takes the mode (argmax / mean) and draws nothing, for
        evaluation and replay; the log-prob is then that of the mode. Nothing is validated on the
        device: a check of the parameters would cost a sync per call, and a categorical sampler
        that asserts on NaN probabilities would kill the CUDA context. Non-finite parameters give
        non-finite entries in the rows instead (the log-probability or the Gaussian action), for
        the caller to check on the host. Autograd is not disabled here; rollouts call it under
        ``torch.no_grad()``.
        """
        dist_params, _value = self(obs)
        return self.sample_packed(dist_params, deterministic, generator)

    def draw_noise(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fill ``out`` ``[N, P]`` (float32, ``P`` = the policy head's outputs) with the random
        numbers that :meth:`sample_packed` turns into actions, drawn from ``generator`` in one
        kernel: uniforms (the Gumbel-max trick, Discrete) or standard normals (Box)."""
        if self.is_continuous:
            return out.normal_(generator=generator)  # randn_like's one kernel
        return out.uniform_(generator=generator)  # rand_like's kernel

    def sample_packed(self, dist_params: Tensor, deterministic: bool = False,
                      generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """:meth:`act_packed` after the forward pass: rows ``(action..., log_prob)`` sampled from
        the distribution parameters ``[N, ...]`` (:meth:`forward`'s first output) with ``generator``.

        ``noise``: the draws, made already by :meth:`draw_noise` (the forward pass draws nothing,
        so drawing them before it gives the same numbers): how a CUDA graph of the acting step
        (agents/graphed_acting.py) takes them as an input. A host that runs several members'
        forward passes as one (agents/acting_pool.py) samples each member's actions here, from
        that member's own generator.
        """
        if not deterministic and noise is None:
            noise = self.draw_noise(torch.empty_like(dist_params, dtype=torch.float32), generator)
        if self.is_continuous:
            log_std = self.log_std.expand_as(dist_params)
            if deterministic:
                noise = torch.zeros_like(dist_params)
            action = dist_params + torch.exp(log_std) * noise
            log_prob = (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            columns = action
        else:
            log_probs = torch.log_softmax(dist_params.float(), dim=-1)
            if deterministic:
                action = log_probs.argmax(-1)
            else:
                uniform = noise.clamp(min=torch.finfo(log_probs.dtype).tiny)
                action = (log_probs - torch.log(-torch.log(uniform))).argmax(-1)
            log_prob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
            columns = action.unsqueeze(-1)
        return torch.cat([columns.double(), log_prob.double().unsqueeze(-1)], dim=-1)

    def evaluate(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Score given actions: ``(log_prob [N], entropy [N], value [N])`` (Gaussian: summed over D).

        ``actions`` are the stored (unclipped) samples: ``int64 [N]`` or ``float [N, D]``.
        """
        dist_params, value = self(obs)
        distribution = self.distribution(dist_params)
        if not self.is_continuous:
            actions = actions.long()
        return self._log_prob(distribution, actions), self._entropy(distribution), value

    @property
    def sampled_action_layout(self) -> tuple[tuple[int, ...], np.dtype]:
        """One sampled action's shape and dtype as :meth:`unpack` gives it: ``((), int64)`` or
        ``((D,), float32)``."""
        if self.is_continuous:
            return (self.action_dim,), np.dtype(np.float32)
        return (), np.dtype(np.int64)

    def unpack(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`act_packed`'s rows on the host as ``(actions as sampled, env actions, log_probs)``:
        actions ``int64 [N]`` (Discrete) or ``float32 [N, D]`` (Box, unclipped), env actions as
        :meth:`env_actions` gives them, log-probabilities ``float32 [N]``."""
        if self.is_continuous:
            actions = packed[:, :-1].astype(np.float32)
        else:
            actions = packed[:, 0].astype(np.int64)
        return actions, self.env_actions(actions), packed[:, -1].astype(np.float32)

    def env_actions(self, actions: Tensor | np.ndarray) -> np.ndarray:
        """Actions (a tensor or a host array) as the env takes them (numpy): ``int64 [N]``, or
        ``[N, *shape]`` clipped to the Box bounds in the space's dtype."""
        actions_np = actions.detach().cpu().numpy() if isinstance(actions, Tensor) else np.asarray(actions)
        if not self.is_continuous:
            return actions_np.astype(np.int64)
        # np.maximum then np.minimum in place: np.clip's own dispatch costs more than both at an
        # acting step's batch size; NaN stays NaN either way.
        clipped = np.maximum(actions_np.reshape(len(actions_np), -1).astype(self.action_space.dtype, copy=False),
                             self._action_low)
        np.minimum(clipped, self._action_high, out=clipped)
        return clipped.reshape((len(actions_np), *self.action_space.shape))


def _is_image_space(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


def build_actor_critic(observation_space: gym.Space, action_space: gym.Space, agent_cfg: AgentConfig) -> ActorCritic:
    """The actor-critic ``agent_cfg.network`` names for these (single-env) spaces.

    ``'auto'`` picks ``'nature'`` for uint8 images ``[C, H, W]`` and ``'mlp'`` otherwise (the
    observation is flattened to ``prod(shape)`` inputs). Image torsos need square ``[C, H, H]``
    observations. Raises ValueError for a torso that does not fit the observation space.
    """
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"unsupported observation space {observation_space!r}: only Box is supported")
    network = agent_cfg.network
    if network == "auto":
        network = "nature" if _is_image_space(observation_space) else "mlp"
    if network in ("nature", "impala"):
        shape = observation_space.shape
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(
                f"agent.network={network!r} needs square image observations [C, H, H], got shape {shape}"
            )
        torso_class = NatureCNN if network == "nature" else ImpalaResNet
        torso: nn.Module = torso_class(in_channels=shape[0], image_size=shape[1])
    elif network == "mlp":
        torso = MLPTorso(int(np.prod(observation_space.shape)), agent_cfg.hidden_sizes)
    else:
        raise ValueError(f"unknown agent.network {agent_cfg.network!r}")
    return ActorCritic(torso, action_space, log_std_init=agent_cfg.log_std_init)
