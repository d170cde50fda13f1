"""The ``pbt-rl`` command line.

Each command parses its arguments, calls one function and turns known errors into one line
on stderr with a non-zero exit code: 2 for bad input (config, files, arguments), 1 for a run
that failed (no member finished, or an unexpected error), 3 for a run that ended with some
members abandoned, 130 when interrupted (docs/runtime.md, "Fault model"). Heavy modules (torch, envpool, wandb, matplotlib) are
imported inside the commands, so ``pbt-rl --help`` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from pbt_rl.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

OVERRIDES_HELP = "overrides as section.key=value, e.g. pbt.population_size=16 agent.lr=3e-4"


def _load(config_path: str, overrides: Sequence[str]):
    from pbt_rl.config import load_config

    config = load_config(config_path, overrides)
    from pbt_rl.envs import check_env_id

    check_env_id(config.env.id)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args.config, args.overrides)
    from pbt_rl.runtime import train

    return _run_exit_code(train(config, console=not args.quiet))


def cmd_resume(args: argparse.Namespace) -> int:
    from pbt_rl.runtime import resume

    return _run_exit_code(resume(_existing_run_dir(args.run_dir), console=not args.quiet))


def _run_exit_code(summary: dict) -> int:
    """0 finished or stopped at run.max_wall_seconds, 3 partial, 1 failed (pbt_rl/runtime/summary.py)."""
    from pbt_rl.runtime.summary import EXIT_CODES

    return EXIT_CODES[summary["status"]]


def cmd_envs(args: argparse.Namespace) -> int:
    from pbt_rl.envs import GYMNASIUM_FALLBACK_NOTE, supported_envs

    for family, ids in supported_envs().items():
        print(f"{family}:")
        for env_id in ids:
            print(f"  {env_id}")
    print(GYMNASIUM_FALLBACK_NOTE)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pbt_rl.config import dump_yaml, field_docs

    if args.config:
        print(dump_yaml(_load(args.config, args.overrides)), end="")
        return 0
    section = None
    for key, doc, default in field_docs():
        this_section = key.split(".", 1)[0]
        if this_section != section:
            print(f"\n{this_section}:")
            section = this_section
        print(f"  {key.split('.', 1)[1]}: {doc} [default: {default!r}]")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = _existing_run_dir(args.run_dir)
    from pbt_rl.report import write_report

    out = write_report(run_dir)
    print(f"report written to {out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    run_dir, member = _existing_run_dir(args.run_dir), _member_arg(args.member)
    from pbt_rl.replay import replay

    replay(run_dir, member=member, console=not args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    run_dir, member = _existing_run_dir(args.run_dir), _member_arg(args.member)
    from pbt_rl.evaluate import evaluate  # checks episodes, video and seed before any work

    evaluate(
        run_dir,
        member=member,
        episodes=args.episodes,
        video=Path(args.video) if args.video else None,
        seed=args.seed,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import math

    target = args.target
    # argparse's float() accepts inf and nan; either would only fail after the warm-up.
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise ConfigError(f"--seconds: must be a finite number > 0, got {args.seconds}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats: must be at least 1, got {args.repeats}")
    if args.repeats > 1 and (target != "population" or args.populations or args.gpus):
        raise ConfigError("--repeats: only for the population bench and its --variant/--backends runs")
    if target == "envs":
        given = [name for name, value in (("--variant", args.variant), ("--backends", args.backends),
                                          ("--populations", args.populations), ("--gpus", args.gpus)) if value]
        if given:
            raise ConfigError(f"{given[0]}: not with 'bench envs' (give overrides such as env.num_threads=2 instead)")
        from pbt_rl.bench_envs import bench_member_envs, format_envs_bench

        config = _load(args.config, args.overrides)
        print(format_envs_bench(bench_member_envs(config, seconds=args.seconds, say=lambda line: print(line, flush=True))))
        return 0
    if target == "agent":
        from pbt_rl.agents.bench import bench_agent, format_bench

        config = _load(args.config, args.overrides)
        print(format_bench(bench_agent(config, seconds=args.seconds)))
        return 0
    from pbt_rl.bench import bench_population, format_population_bench

    config = _load(args.config, args.overrides)
    backends = tuple(name.strip() for name in (args.backends or "").split(",") if name.strip())
    from pbt_rl.config import SECTIONS

    allowed = dataclasses.fields(SECTIONS["run"])
    choices = next(f for f in allowed if f.name == "backend").metadata["choices"]
    unknown = [name for name in backends if name not in choices]
    if unknown:
        raise ConfigError(f"--backends: {unknown[0]!r} is not a backend; choose from {', '.join(choices)}")
    if "ray" in backends:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--backends: ray needs Ray: pip install 'pbt-rl[ray]'")
    if backends and args.variant:
        raise ConfigError("--backends and --variant: choose one (--variant run.backend=ray does what --backends does)")
    from pbt_rl.bench import variant_configs

    variants = variant_configs(config, [[f"run.backend={name}"] for name in backends]
                               + [text.split() for text in args.variant or ()])
    if args.variant:  # the config as given first, then each variant
        variants = (("the config as given", config), *variants)
    if args.gpus:
        if variants or args.populations:
            raise ConfigError("--gpus: not with --populations, --backends or --variant (one table at a time)")
        from pbt_rl.bench_scaling import bench_gpu_scaling
        from pbt_rl.runtime.resources import cuda_device_count

        result = bench_gpu_scaling(config, _sizes("--gpus", args.gpus, "GPU counts such as 1,2,4"), seconds=args.seconds,
                                   visible=cuda_device_count(), say=lambda line: print(line, flush=True))
        print("json: " + json.dumps(result, default=float))
        return 0
    if args.populations:
        if backends:
            raise ConfigError("--populations: not with --backends (--variant run.backend=ray trains each size on Ray too)")
        from pbt_rl.bench_scaling import bench_scaling

        result = bench_scaling(config, _sizes("--populations", args.populations, "population sizes such as 8,16,32,64"),
                               seconds=args.seconds, say=lambda line: print(line, flush=True),
                               variants=tuple(text.split() for text in args.variant or ()))
        print("json: " + json.dumps(result, default=float))
        return 0
    result = bench_population(config, seconds=args.seconds, variants=variants, repeats=args.repeats,
                              say=lambda line: print(line, flush=True))
    print(format_population_bench(result))
    return 0


def _sizes(option: str, text: str, example: str) -> tuple[int, ...]:
    """A comma-separated list of counts >= 1 (``--populations``, ``--gpus``), or a one-line error."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option}: expected {example}, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise ConfigError(f"{option}: every count must be >= 1, got {text!r}")
    return sizes


def cmd_export(args: argparse.Namespace) -> int:
    run_dir, member = _existing_run_dir(args.run_dir), _member_arg(args.member)
    from pbt_rl.export import check_hub_available, check_out_dir, export, push_to_hub

    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)
    if args.push_to_hub is not None:
        if not args.push_to_hub.strip():
            raise ConfigError("--push-to-hub: expected a repository id such as user/cartpole-pbt")
        check_hub_available()
    export(run_dir, out_dir, member=member)
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out_dir, args.push_to_hub, private=args.private)}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from pbt_rl.experiment.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    from pbt_rl.envs import check_env_id

    for env_id in sorted({run.config.env.id for run in spec.runs}):
        check_env_id(env_id)
    if args.results_only:
        from pbt_rl.experiment.results import write_results

        print(f"results written to {write_results(spec)}")
        return 0
    from pbt_rl.experiment.runner import exit_code, run_experiment

    return exit_code(run_experiment(spec, console=not args.quiet))


def _existing_run_dir(path: str) -> Path:
    from pbt_rl.runtime.store import RunStore

    RunStore(path).require_run()
    return Path(path)


def _member_arg(text: str) -> str | int:
    if text == "best":
        return text
    try:
        member = int(text)
    except ValueError:
        raise ConfigError(f"--member: expected 'best' or a member id (0, 1, ...), got {text!r}") from None
    if member < 0:
        raise ConfigError(f"--member: expected 'best' or a member id >= 0, got {member}")
    return member


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (its default code too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"pbt-rl: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pbt-rl",
        description="Population Based Training for actor-critic RL agents (A2C, IMPALA/V-trace) on envpool.",
    )
    from pbt_rl import __version__

    parser.add_argument("--version", action="version", version=f"pbt-rl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    train = add("train", cmd_train, "Train a population from a YAML config (e.g. configs/quickstart.yaml).")
    train.add_argument("config", help="experiment YAML file")
    train.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    train.add_argument("-q", "--quiet", action="store_true", help="no live progress lines")

    resume = add("resume", cmd_resume, "Continue a run that stopped or was killed, from its run directory.")
    resume.add_argument("run_dir", help="the run directory (run.dir of the experiment)")
    resume.add_argument("-q", "--quiet", action="store_true", help="no live progress lines")

    add("envs", cmd_envs, "List the supported env ids by family.")

    config = add("config", cmd_config, "Show every config key with its doc, or print a resolved config.")
    config.add_argument("config", nargs="?", help="experiment YAML file to resolve and print")
    config.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)

    report = add("report", cmd_report, "Write lineage, schedule and return plots to RUN_DIR/report/.")
    report.add_argument("run_dir", help="the run directory")

    replay = add("replay", cmd_replay, "Train a fresh agent that follows a member's discovered schedule.")
    replay.add_argument("run_dir", help="the run directory")
    replay.add_argument("--member", default="best", help="'best' (default) or a member id")
    replay.add_argument("-q", "--quiet", action="store_true", help="no live progress lines")

    evaluate = add("eval", cmd_eval, "Evaluate a member's latest checkpoint: mean and std of the episodic return.")
    evaluate.add_argument("run_dir", help="the run directory")
    evaluate.add_argument("--member", default="best", help="'best' (default) or a member id")
    evaluate.add_argument("--episodes", type=int, default=10, help="episodes to run (default 10)")
    evaluate.add_argument("--video", default=None, help="write a video of the first episode to this path (.mp4 or .gif)")
    evaluate.add_argument("--seed", type=int, default=0, help="env seed (default 0)")

    export = add("export", cmd_export, "Write a member's policy as a Hugging Face Hub model folder (safetensors, config, schedule, model card).")
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("out_dir", help="the new folder to write (must not exist, or be empty)")
    export.add_argument("--member", default="best", help="'best' (default) or a member id")
    export.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="then upload the folder to this Hub model repository (needs pbt-rl[hub])")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")

    bench = add(
        "bench",
        cmd_bench,
        "Benchmark: 'bench CONFIG' compares raw envpool with population training; 'bench agent CONFIG' measures one "
        "agent; 'bench envs CONFIG' steps the population's envs as its members do, without learning, against raw envpool.",
    )
    bench.add_argument("target", nargs="?", default="population", choices=BENCH_TARGETS,
                       help="what to measure: the population training against raw envpool (default), one agent, or "
                            "the population's envs stepped as its members step them, without learning, against raw envpool")
    bench.add_argument("config", help="experiment YAML file")
    bench.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    bench.add_argument("--seconds", type=float, default=60.0, help="measured wall time after warm-up (default 60)")
    bench.add_argument("--backends", default="", help="population training on each of these run.backend values, "
                                                       "e.g. local,ray (raw envpool before and after each; default: the config's)")
    bench.add_argument("--variant", action="append", metavar="OVERRIDES",
                       help="train the population once more with these overrides (quoted, space-separated), "
                            "raw envpool measured at the same envs (and the variant's env.async_batch_size) before and "
                            "after it; repeatable, e.g. --variant run.cuda_mps=off")
    bench.add_argument("--repeats", type=int, default=1,
                       help="run the population (and each variant) this many times, in turn, and print each one's "
                            "median ratio and range: tells a variant's effect from the machine's drift (default 1)")
    bench.add_argument("--populations", default="", help="a scaling table: the config's total envs divided among "
                                                          "each of these population sizes, e.g. 8,16,32,64 (a member's async groups kept "
                                                          "while large enough to pay, else fewer, larger batches: docs/design.md, "
                                                          "'Batches per member'; raw envpool at the config's batching before and after "
                                                          "each; with --variant, each size also with each variant, right after it)")
    bench.add_argument("--gpus", default="", help="a GPU scaling table: the config as one GPU's population, run on "
                                                   "each of these numbers of GPUs, e.g. 1,2,4 (raw envpool at each size's envs, before and after it)")
    experiment = add("experiment", cmd_experiment,
                     "Train every arm x seed of an experiment spec (resumable), then write results.md and figures.")
    experiment.add_argument("spec", help="experiment spec YAML (e.g. configs/experiments/cartpole_arms.yaml)")
    experiment.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP + " (for every arm)")
    experiment.add_argument("--results-only", action="store_true", help="only (re)write the results from the runs there are")
    experiment.add_argument("-q", "--quiet", action="store_true", help="no live progress lines")
    return parser


BENCH_TARGETS = ("population", "agent", "envs")


def _normalise_bench_argv(argv: list[str]) -> list[str]:
    """Let ``pbt-rl bench CONFIG`` mean ``pbt-rl bench population CONFIG``."""
    if argv and argv[0] == "bench":
        rest = [a for a in argv[1:] if not a.startswith("-")]
        if rest and rest[0] not in BENCH_TARGETS:
            index = argv.index(rest[0])
            return argv[:index] + ["population"] + argv[index:]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = _normalise_bench_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"pbt-rl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # Output piped into e.g. `head`; nothing is wrong with the run.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("pbt-rl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place that turns failures into an exit code
        if os.environ.get("PBT_RL_DEBUG"):
            raise
        print(f"pbt-rl: failed: {type(exc).__name__}: {exc} (set PBT_RL_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
