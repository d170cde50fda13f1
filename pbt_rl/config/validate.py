"""Rules that involve more than one config field (one place; each field's own checks are in
:mod:`pbt_rl.config.convert`, a search-space parameter's own rules in :mod:`pbt_rl.search_space`)."""

from __future__ import annotations

import re

from pbt_rl.config.convert import check_range, close_matches, convert
from pbt_rl.config.schema import AgentConfig, ConfigError, ExperimentConfig, ParamSpec, agent_field_metadata, tunable_agent_fields


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
    run = config.run
    if run.gpus > 0 and agent.device not in ("auto", "cuda"):
        raise ConfigError(f"run.gpus: {run.gpus} GPUs asked for, but agent.device is {agent.device!r}; "
                          f"use agent.device: auto (or cuda) to spread members over GPUs")
    if run.members_per_host > 1 and run.members_per_gpu and run.members_per_gpu % run.members_per_host:
        raise ConfigError(f"run.members_per_host: {run.members_per_host} must divide run.members_per_gpu "
                          f"({run.members_per_gpu}): the members of a host share its GPU")
    if pbt.search == "none" and pbt.exploit != "none":
        raise ConfigError(f"pbt.search: none (hand-tuned, no search) needs pbt.exploit: none, got pbt.exploit: {pbt.exploit}")
    if pbt.population_size > 1 and not pbt.search_space and pbt.search != "none":
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
            f"{key}: not an agent hyperparameter PBT can change{close_matches(spec.name, sorted(tunable))}; "
            f"allowed: {', '.join(sorted(tunable))}"
        )
    for setting, needed in agent_field_metadata(spec.name).get("only", {}).items():
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
        check_range(convert(value, field_type, f"{key}.{where}"), agent_field_metadata(spec.name), f"{key}.{where}")
