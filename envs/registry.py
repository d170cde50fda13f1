"""Which env ids pbt-rl can build, which backend builds them, and helpful errors for typos.

An env id is resolved in this order:

1. an envpool id of a supported envpool family: ``atari`` (``envpool.atari``), ``mujoco`` (the
   Gymnasium-style MuJoCo tasks, ``envpool.mujoco.gym``) or ``classic`` (``envpool.classic_control``
   and the vector-observation Box2D tasks);
2. otherwise any id registered in Gymnasium: family ``gymnasium`` (stepped by a Gymnasium vector env);
3. otherwise :class:`UnknownEnvError`, with the closest known ids as suggestions.

The lookups import envpool and Gymnasium lazily so that importing :mod:`pbt_rl.envs` stays cheap.
"""

from __future__ import annotations

import difflib
import functools

from pbt_rl.config import ConfigError

ATARI = "atari"
MUJOCO = "mujoco"
CLASSIC = "classic"
GYMNASIUM = "gymnasium"
FAMILIES = (ATARI, MUJOCO, CLASSIC, GYMNASIUM)

# envpool module (its registry's import path) -> our family.
_ENVPOOL_MODULE_FAMILY = {
    "envpool.atari": ATARI,
    "envpool.mujoco.gym": MUJOCO,
    "envpool.classic_control": CLASSIC,
    "envpool.box2d": CLASSIC,
}
# Box2D tasks whose observation is an image, not a flat vector; they are left to Gymnasium.
_ENVPOOL_PIXEL_TASK_PREFIXES = ("CarRacing",)

_CURATED_IDS: dict[str, list[str]] = {
    ATARI: [
        "Pong-v5", "Breakout-v5", "SpaceInvaders-v5", "Seaquest-v5", "BeamRider-v5", "Qbert-v5",
        "Enduro-v5", "MsPacman-v5", "Asterix-v5", "Alien-v5", "Freeway-v5", "MontezumaRevenge-v5",
    ],
    MUJOCO: [
        "HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5", "Swimmer-v5",
        "InvertedPendulum-v5", "InvertedDoublePendulum-v5", "Reacher-v5",
    ],
    CLASSIC: [
        "CartPole-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0", "Pendulum-v1",
        "LunarLander-v3", "LunarLanderContinuous-v3", "BipedalWalker-v3",
    ],
    GYMNASIUM: ["Taxi-v4", "FrozenLake-v1", "CliffWalking-v1"],
}

GYMNASIUM_FALLBACK_NOTE = (
    "Any other id registered in Gymnasium (gymnasium.registry, including ids your own packages "
    "register) also works: it is stepped by a Gymnasium vector env (family 'gymnasium'). Box and "
    "Discrete observation spaces are supported (Discrete ones are one-hot encoded)."
)


class UnknownEnvError(ConfigError):
    """The env id is neither an envpool id nor registered in Gymnasium."""


@functools.lru_cache(maxsize=1)
def _envpool_modules() -> dict[str, str]:
    """envpool id -> the envpool module that implements it (e.g. ``envpool.atari``)."""
    try:
        from envpool.registration import registry
    except ImportError:  # envpool is Linux-only; Gymnasium still works elsewhere.
        return {}
    return {env_id: entry[0] for env_id, entry in registry.specs.items()}


def _gymnasium_ids() -> set[str]:
    """Ids registered in Gymnasium now (not cached: user code may register more at any time)."""
    import gymnasium

    return set(gymnasium.registry)


def _envpool_family(env_id: str) -> str | None:
    """Our family for an envpool id we step with envpool, or None."""
    module = _envpool_modules().get(env_id)
    family = _ENVPOOL_MODULE_FAMILY.get(module) if module else None
    if family == CLASSIC and env_id.startswith(_ENVPOOL_PIXEL_TASK_PREFIXES):
        return None
    return family


def check_env_id(env_id: str) -> None:
    """Raise :class:`UnknownEnvError` (with close matches) if ``env_id`` cannot be resolved.

    Also raises :class:`ConfigError` for an envpool-only id of a family pbt-rl does not step
    (e.g. Procgen, MiniGrid), naming the supported families.
    """
    env_family(env_id)


def env_family(env_id: str) -> str:
    """``"atari" | "mujoco" | "classic" | "gymnasium"``: how :func:`make_env` builds ``env_id``."""
    family = _envpool_family(env_id)
    if family is not None:
        return family
    gymnasium_ids = _gymnasium_ids()
    if env_id in gymnasium_ids:
        return GYMNASIUM
    envpool_module = _envpool_modules().get(env_id)
    if envpool_module is not None:
        raise ConfigError(
            f"env id {env_id!r} is an envpool {envpool_module.removeprefix('envpool.')} env, which "
            f"pbt-rl does not step; supported: envpool Atari, MuJoCo and classic-control ids, "
            f"or any Gymnasium id"
        )
    known = sorted(set(_envpool_modules()) | gymnasium_ids)
    close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
    if not close:
        # Case slips ("pong-v5") score low on the raw strings; compare case-folded as well.
        by_folded = {name.casefold(): name for name in known}
        close = [by_folded[m] for m in difflib.get_close_matches(env_id.casefold(), list(by_folded), n=3, cutoff=0.6)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownEnvError(
        f"unknown env id {env_id!r}{hint}; run `pbt-rl envs` for the curated list, "
        f"or use any envpool or Gymnasium id"
    )


def supported_envs() -> dict[str, list[str]]:
    """Family -> curated env ids known to work (for ``pbt-rl envs``).

    Only ids available in this installation are listed. See :data:`GYMNASIUM_FALLBACK_NOTE`
    for every other Gymnasium id.
    """
    available: dict[str, list[str]] = {}
    for family, ids in _CURATED_IDS.items():
        listed = []
        for env_id in ids:
            try:
                if env_family(env_id) == family:
                    listed.append(env_id)
            except ConfigError:
                continue
        available[family] = listed
    return available
