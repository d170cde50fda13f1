"""pbt-rl: Population Based Training for actor-critic RL agents."""
__version__ = "0.1.0"

# The Python API (docs/python_api.md), imported on first use so that `import pbt_rl` stays light
# (no torch, no numpy): name -> the module that owns it.
_LAZY = {"load_policy": "pbt_rl.policy", "open_run": "pbt_rl.api", "as_frame": "pbt_rl.api"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pbt_rl' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion in notebooks lists the lazy names too
    return sorted({*globals(), *_LAZY})
