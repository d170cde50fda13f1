"""Config loading, overrides, validation messages and round trips."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest
import yaml

from pbt_rl.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_yaml,
    field_docs,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    tunable_agent_fields,
    validate,
)
from pbt_rl.strict_yaml import MAX_YAML_DEPTH

POPULATION = {
    "pbt": {
        "population_size": 4,
        "search_space": {
            "lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2},
            "unroll_length": {"kind": "int", "low": 5, "high": 50},
        },
    }
}


def write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_valid_and_frozen():
    config = from_dict({})
    assert isinstance(config, ExperimentConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.agent.lr = 1.0  # type: ignore[misc]


def test_every_field_has_a_doc_line():
    for key, doc, _default in field_docs():
        assert doc and "\n" not in doc, key


def test_load_yaml_with_sections_and_search_space(tmp_path):
    path = write(tmp_path, {"env": {"id": "Pong-v5", "num_envs": 16}, "agent": {"lr": "3e-4"}, **POPULATION})
    config = load_config(path)
    assert config.env.id == "Pong-v5" and config.env.num_envs == 16
    assert config.agent.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert [p.name for p in config.pbt.search_space] == ["lr", "unroll_length"]
    assert config.pbt.search_space[1].kind == "int"


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = write(tmp_path, POPULATION)
    config = load_config(path, ["pbt.population_size=16", "agent.lr=3e-4", "agent.hidden_sizes=[32,32]",
                                "pbt.search_space.lr.high=0.05", "env.episodic_life=true"])
    assert config.pbt.population_size == 16
    assert config.agent.lr == pytest.approx(3e-4)
    assert config.agent.hidden_sizes == (32, 32)
    assert config.pbt.search_space[0].high == pytest.approx(0.05)
    assert config.env.episodic_life is True


def test_overrides_do_not_mutate_the_input():
    raw = {"agent": {"lr": 0.1}}
    apply_overrides(raw, ["agent.lr=0.2"])
    assert raw == {"agent": {"lr": 0.1}}


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"agent": {"lrr": 0.1}}, "unknown key agent.lrr (did you mean lr?)"),
        ({"agents": {}}, "unknown section 'agents' (did you mean agent?)"),
        ({"agent": {"lr": "fast"}}, "agent.lr: expected a number, got 'fast'"),
        ({"agent": {"lr": -1.0}}, "agent.lr: -1.0 is out of range; must be > 0.0"),
        ({"agent": {"unroll_length": 2.5}}, "agent.unroll_length: expected an integer, got 2.5"),
        ({"agent": {"algo": "ppo"}}, "agent.algo: 'ppo' is not allowed; choose one of 'a2c', 'impala'"),
        ({"env": {"episodic_life": "yes please"}}, "env.episodic_life: expected true or false"),
        ({"env": {"num_envs": 0}}, "env.num_envs: 0 is out of range; must be >= 1"),
        ({"env": {"num_envs": 8, "async_batch_size": 3}}, "env.async_batch_size: 3 must divide env.num_envs (8)"),
        ({"agent": {"gamma": 1.5}}, "agent.gamma: 1.5 is out of range; must be <= 1.0"),
        ({"agent": {"device": "tpu"}}, "agent.device: 'tpu' is not allowed"),
        ({"agent": "fast"}, "agent: expected a mapping"),
        ({"pbt": {"population_size": 4}}, "pbt.search_space: empty"),
        ({"pbt": {"truncation_fraction": 0.7}}, "pbt.truncation_fraction: 0.7 is out of range; must be <= 0.5"),
        ({"pbt": {"truncation_fraction": 0.0}}, "pbt.truncation_fraction: 0.0 is out of range; must be > 0.0"),
        ({"pbt": {"perturb_factors": [0.8, 0.0]}}, "pbt.perturb_factors: every factor must be > 0"),
        ({"pbt": {"search_space": {"lr": {"kind": "log_uniform", "low": 1e-2, "high": 1e-4}}}},
         "pbt.search_space.lr: inverted bounds"),
        ({"pbt": {"search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2, "init": 0.5}}}},
         "pbt.search_space.lr.init: 0.5 is outside its bounds"),
        ({"pbt": {"search_space": {"learning_rate": {"low": 1e-4, "high": 1e-2}}}},
         "pbt.search_space.learning_rate: not an agent hyperparameter PBT can change"),
        ({"pbt": {"search_space": {"unroll_length": {"kind": "log_uniform", "low": 1, "high": 10}}}},
         "pbt.search_space.unroll_length.kind: unroll_length is an integer"),
        ({"pbt": {"search_space": {"lr": {"kind": "gaussian", "low": 1e-4, "high": 1e-2}}}},
         "pbt.search_space.lr.kind: 'gaussian' is not allowed"),
        ({"pbt": {"search_space": {"gamma": {"kind": "uniform", "low": 0.9, "high": 1.0, "perturb": "one_minus"}}}},
         "pbt.search_space.gamma.perturb: one_minus needs bounds inside [0, 1)"),
        ({"pbt": {"search_space": {"lr": {"kind": "log_uniform", "low": 0.0, "high": 1e-2}}}},
         "pbt.search_space.lr.low: log_uniform needs low > 0"),
        ({"pbt": {"search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 1e-2, "factors": [1.2, -1]}}}},
         "pbt.search_space.lr.factors: every factor must be > 0"),
        # How a parameter relates to its agent field: the name and the kind's type come first ...
        ({"pbt": {"search_space": {"learning_rate": {"kind": "uniform"}}}},
         "pbt.search_space.learning_rate: not an agent hyperparameter PBT can change"),
        ({"pbt": {"search_space": {"lr": {"kind": "int", "low": 1e-4, "high": 1e-2}}}},
         "pbt.search_space.lr.kind: lr is a real number; use uniform or log_uniform"),
        ({"pbt": {"search_space": {"unroll_length": {"kind": "categorical", "choices": [5, 7.5]}}}},
         "pbt.search_space.unroll_length.choices[1]: expected an integer, got 7.5"),
        # ... and bounds and choices lie inside the range the agent field allows.
        ({"pbt": {"search_space": {"lr": {"kind": "log_uniform", "low": 1e-4, "high": 2.0}}}},
         "pbt.search_space.lr.high: 2.0 is out of range; must be <= 1.0"),
        ({"pbt": {"search_space": {"lr": {"kind": "uniform", "low": 0.0, "high": 0.1}}}},
         "pbt.search_space.lr.low: 0.0 is out of range; must be > 0.0"),
        ({"pbt": {"search_space": {"unroll_length": {"kind": "int", "low": 0, "high": 10}}}},
         "pbt.search_space.unroll_length.low: 0 is out of range; must be >= 1"),
        ({"pbt": {"search_space": {"rmsprop_alpha": {"kind": "uniform", "low": 0.9, "high": 1.0}}}},
         "pbt.search_space.rmsprop_alpha.high: 1.0 is out of range; must be < 1.0"),
        ({"pbt": {"search_space": {"gamma": {"kind": "categorical", "choices": [0.99, 1.5]}}}},
         "pbt.search_space.gamma.choices[1]: 1.5 is out of range; must be <= 1.0"),
    ],
)
def test_bad_values_name_the_key(data, expected):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_what_is_allowed():
    with pytest.raises(ConfigError, match=r"agent allows: .*entropy_cost.*"):
        from_dict({"agent": {"entropy": 0.1}})


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pbt.population_size", "expected section.key=value"),
        ("population_size=4", "the key must be section.key"),
        ("trainer.lr=1", "unknown section 'trainer'"),
        ("pbt.population_size=many", "pbt.population_size: expected an integer, got 'many'"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    path = write(tmp_path, POPULATION)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, [override])


def test_on_and_off_stay_words_in_fields_that_choose_between_them(tmp_path):
    # YAML 1.1 reads on/off as booleans, on the command line and in a file alike.
    quickstart = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    config = load_config(quickstart, ["run.cuda_mps=off", "agent.normalize_observations=on"])
    assert (config.run.cuda_mps, config.agent.normalize_observations) == ("off", "on")
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  normalize_observations: off\nrun:\n  cuda_mps: on\n")
    config = load_config(path)
    assert (config.run.cuda_mps, config.agent.normalize_observations) == ("on", "off")
    with pytest.raises(ConfigError, match=r"^logging.report: expected true or false"):  # booleans stay booleans
        load_config(quickstart, ["logging.report=maybe"])


def test_parse_override_reads_yaml_values():
    assert parse_override("agent.hidden_sizes=[8, 8]") == (["agent", "hidden_sizes"], [8, 8])
    assert parse_override("run.name=a=b") == (["run", "name"], "a=b")


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "config file not found"),
        ("env: [unclosed", "is not valid YAML (line 1"),
        ("- just\n- a list\n", "expected a YAML mapping"),
    ],
)
def test_bad_files(tmp_path, content, expected):
    path = tmp_path / "exp.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(path)


def test_round_trip_through_yaml(tmp_path):
    config = load_config(write(tmp_path, POPULATION), ["agent.algo=impala", "env.id=Pong-v5"])
    again = from_dict(yaml.safe_load(dump_yaml(config)))
    assert again == config


# The agent fields PBT may evolve, with their types, and the setting each needs to matter.
TUNABLE = {
    "lr": float, "optimizer_eps": float, "rmsprop_alpha": float, "rmsprop_momentum": float,
    "adam_beta1": float, "adam_beta2": float, "max_grad_norm": float, "entropy_cost": float,
    "value_cost": float, "gamma": float, "td_lambda": float, "unroll_length": int,
    "vtrace_rho_clip": float, "vtrace_c_clip": float, "vtrace_pg_rho_clip": float,
    "learner_batch_unrolls": int, "queue_size": int, "num_epochs": int, "num_minibatches": int,
    "ppo_clip": float,
}
ONLY_WITH = {  # field: (setting, value it needs, another value)
    "rmsprop_alpha": ("optimizer", "rmsprop", "adam"),
    "rmsprop_momentum": ("optimizer", "rmsprop", "adam"),
    "adam_beta1": ("optimizer", "adam", "rmsprop"),
    "adam_beta2": ("optimizer", "adam", "rmsprop"),
    "vtrace_rho_clip": ("algo", "impala", "a2c"),
    "vtrace_c_clip": ("algo", "impala", "a2c"),
    "vtrace_pg_rho_clip": ("algo", "impala", "a2c"),
    "learner_batch_unrolls": ("algo", "impala", "a2c"),
    "queue_size": ("algo", "impala", "a2c"),
}


def one_parameter_space(name, **agent):
    """A config whose search space is ``name`` over a small range inside its field's range."""
    low, high = (1, 2) if TUNABLE.get(name) is int else (0.1, 0.2)
    kind = "int" if TUNABLE.get(name) is int else "uniform"
    return from_dict({"agent": agent, "pbt": {"population_size": 2,
                                              "search_space": {name: {"kind": kind, "low": low, "high": high}}}})


def test_pbt_may_evolve_exactly_the_fields_that_take_effect_in_a_running_learner():
    assert tunable_agent_fields() == TUNABLE
    # Fixed when the learner is built (changing them later would do nothing), or not numbers.
    for fixed in ("log_std_init", "algo", "hidden_sizes", "device", "network", "normalize_returns", "normalize_advantages"):
        with pytest.raises(ConfigError, match=f"pbt.search_space.{fixed}: not an agent hyperparameter PBT can change"):
            one_parameter_space(fixed)


@pytest.mark.parametrize("name", sorted(TUNABLE))
def test_a_tunable_field_is_refused_only_without_the_setting_it_needs(name):
    if name not in ONLY_WITH:
        assert one_parameter_space(name).pbt.search_space[0].name == name
        assert one_parameter_space(name, algo="impala", optimizer="adam").pbt.search_space[0].name == name
        return
    setting, needed, other = ONLY_WITH[name]
    assert one_parameter_space(name, **{setting: needed}).pbt.search_space[0].name == name
    with pytest.raises(ConfigError) as info:
        one_parameter_space(name, **{setting: other})
    assert str(info.value) == (f"pbt.search_space.{name}: {name} has no effect with agent.{setting}={other} "
                               f"(only with {setting}: {needed}); remove it from the search space")


def test_validate_refuses_a_parameter_declared_twice():
    # A YAML mapping cannot repeat a name (read_yaml refuses it); a config built in code can.
    config = from_dict(POPULATION)
    twice = dataclasses.replace(config.pbt, search_space=config.pbt.search_space + config.pbt.search_space[:1])
    with pytest.raises(ConfigError, match=r"^pbt.search_space.lr: declared twice$"):
        validate(dataclasses.replace(config, pbt=twice))


# ----------------------------------------------------------------------------------------
# agent.device
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:12"])
def test_device_forms_that_are_allowed(device):
    assert from_dict({"agent": {"device": device}}).agent.device == device


@pytest.mark.parametrize(
    "device",
    ["cuda:abc", "cuda:", "cuda:-1", "cuda:1x", "cuda:01", "cuda:+1", "cuda:1.0", "cuda :1", " cuda",
     "cuda\n", "CUDA", "cuda:\u0661", "cudax", "cpu:0", "gpu", ""],
)
def test_device_strings_are_validated_exactly(device):
    with pytest.raises(ConfigError) as info:
        from_dict({"agent": {"device": device}})
    message = str(info.value)
    assert message.startswith(f"agent.device: {device!r} is not allowed")
    assert "'auto', 'cpu', 'cuda' or 'cuda:N'" in message and "\n" not in message


# ----------------------------------------------------------------------------------------
# YAML: duplicate keys, nesting depth, unreadable paths
# ----------------------------------------------------------------------------------------

DUPLICATE_SECTION = """\
agent:
  lr: 0.001
  hidden_sizes: [32]
run:
  name: twice
agent:
  entropy_cost: 0.02
"""


def test_a_repeated_section_is_an_error_naming_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, DUPLICATE_SECTION)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: duplicate key 'agent' at line 6 (first at line 1)"


@pytest.mark.parametrize(
    "text, key, line, first_line",
    [
        ("agent:\n  lr: 0.001\n  gamma: 0.9\n  lr: 0.002\n", "lr", 4, 2),
        ("pbt:\n  search_space:\n    lr: {kind: log_uniform, low: 1.0e-4, high: 1.0e-2}\n"
         "    lr: {kind: uniform, low: 1.0e-4, high: 1.0e-2}\n", "lr", 4, 3),
        ("pbt:\n  search_space:\n    lr: {kind: log_uniform, low: 1.0e-4, high: 1.0e-2, low: 1.0e-3}\n", "low", 3, 3),
        ("agent: {hidden_sizes: [{a: 1, a: 2}]}\n", "a", 1, 1),
        ("run:\n  seed: 1\nenv: {}\nrun: {seed: 2}\n", "run", 4, 1),
        ("agent:\n  true: 1\n  yes: 2\n", True, 3, 2),  # equal once constructed, as safe_load sees them
    ],
)
def test_duplicate_keys_are_rejected_at_every_level(tmp_path, text, key, line, first_line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert str(info.value) == f"{path}: duplicate key {key!r} at line {line} (first at line {first_line})"


def test_merged_keys_may_still_be_overridden(tmp_path):
    """``<<: *anchor`` then an explicit key is an override, not a duplicate, also when the merged
    mapping is itself merged into a later mapping before it has been built."""
    text = (
        "defaults: &lr {kind: log_uniform, low: 1.0e-4, high: 1.0e-2}\n"
        "pbt:\n"
        "  population_size: 2\n"
        "  search_space:\n"
        "    lr: &narrow {<<: *lr, high: 1.0e-3}\n"
        "other: {<<: *narrow, low: 1.0e-5}\n"
    )
    assert read_yaml(write(tmp_path, text)) == yaml.safe_load(text)


def test_the_loader_reads_every_yaml_type_as_safe_load_does(tmp_path):
    text = (
        "a: 3e-4\nb: 1.0e-4\nc: 0x1f\nd: yes\ne: ~\nf: 2001-12-14\ng: !!binary aGVsbG8=\nh: 1_000\n"
        "i: .inf\nj: [1, 'x', {k: v}]\nk: !!set {p, q}\nl: !!omap [m: 1, n: 2]\nm: !!pairs [o: 1, o: 2]\n"
        "n: &anchor [1, 2]\no: *anchor\n"
    )
    assert read_yaml(write(tmp_path, text)) == yaml.safe_load(text)
    for path in sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml")):
        assert read_yaml(path) == yaml.safe_load(path.read_text()), path


def test_an_override_value_with_a_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, POPULATION)
    override = "pbt.search_space={lr: {kind: log_uniform, low: 1.0e-4, high: 1.0e-2}, lr: {kind: uniform, low: 0.1, high: 0.2}}"
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert str(info.value) == "override pbt.search_space: duplicate key 'lr' in the value"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 20_000,
        "[" * 20_000 + "]" * 20_000,
        "a: " + "{a: " * 20_000 + "1" + "}" * 20_000,
        "".join(" " * depth + "a:\n" for depth in range(600)),  # block mappings, one more space each
    ],
    ids=["unclosed-lists", "lists", "flow-mappings", "block-mappings"],
)
def test_deeply_nested_yaml_is_a_one_line_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path} is nested too deeply (more than {MAX_YAML_DEPTH} levels")
    assert "\n" not in message


def test_the_nesting_limit_is_exact(tmp_path):
    inside = MAX_YAML_DEPTH - 1  # the top-level mapping is the first level
    assert read_yaml(write(tmp_path, "a: " + "[" * inside + "]" * inside)) == {"a": yaml.safe_load("[" * inside + "]" * inside)}
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_yaml(write(tmp_path, "a: " + "[" * (inside + 1) + "]" * (inside + 1)))


def test_a_deeply_nested_override_value_is_a_one_line_error(tmp_path):
    path = write(tmp_path, POPULATION)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["agent.hidden_sizes=" + "[" * 20_000])
    assert str(info.value) == f"override agent.hidden_sizes: the value is nested too deeply (more than {MAX_YAML_DEPTH} levels)"


def test_a_path_too_long_for_the_os_is_a_short_one_line_error(tmp_path):
    path = tmp_path / ("x" * 5000 + ".yaml")
    with pytest.raises(OSError):
        path.exists()  # the failure this guards against: pathlib does not swallow ENAMETOOLONG
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("cannot read config file ") and message.endswith(f": {os.strerror(errno.ENAMETOOLONG)}")
    assert "xxx...xxx" in message and len(message) < 300 and "\n" not in message


def test_any_os_error_on_the_config_path_is_a_config_error(tmp_path):
    not_a_dir = write(tmp_path, "{}\n", name="file.yaml")
    with pytest.raises(ConfigError) as info:
        read_yaml(not_a_dir / "exp.yaml")
    assert str(info.value) == f"cannot read config file {not_a_dir / 'exp.yaml'}: {os.strerror(errno.ENOTDIR)}"
    with pytest.raises(ConfigError, match="config path is a directory, not a YAML file"):
        read_yaml(tmp_path)
    link = tmp_path / "loop.yaml"
    link.symlink_to(link)
    with pytest.raises(ConfigError) as info:
        read_yaml(link)
    assert str(info.value) == f"cannot read config file {link}: {os.strerror(errno.ELOOP)}"
