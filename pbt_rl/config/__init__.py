"""Typed, immutable experiment configuration.

One experiment is one YAML file with the sections ``env``, ``agent``, ``pbt``, ``run`` and
``logging``. The package's rooms: :mod:`~pbt_rl.config.schema` (the sections, their fields,
docs and defaults), :mod:`~pbt_rl.config.convert` (YAML values to field types, each field's
checks), :mod:`~pbt_rl.config.validate` (rules across fields) and :mod:`~pbt_rl.config.load`
(files, overrides, writing back). Every failure is a :class:`ConfigError` whose message names
the key and what is allowed. Import from here.
"""

from pbt_rl.config.convert import check_agent_value
from pbt_rl.config.load import abbreviate, apply_overrides, dump_yaml, from_dict, load_config, parse_override, read_yaml, to_dict
from pbt_rl.config.schema import (
    SECTIONS,
    AgentConfig,
    ConfigError,
    EnvConfig,
    ExperimentConfig,
    LoggingConfig,
    ParamSpec,
    PBTConfig,
    RunConfig,
    field_docs,
    tunable_agent_fields,
)
from pbt_rl.config.validate import validate

__all__ = [
    "SECTIONS", "AgentConfig", "ConfigError", "EnvConfig", "ExperimentConfig", "LoggingConfig", "ParamSpec",
    "PBTConfig", "RunConfig", "abbreviate", "apply_overrides", "check_agent_value", "dump_yaml", "field_docs",
    "from_dict", "load_config", "parse_override", "read_yaml", "to_dict", "tunable_agent_fields", "validate",
]
