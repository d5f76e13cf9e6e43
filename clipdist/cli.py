"""What every entry point does first: read the command line as any Hydra app does, then the
launch environment and the validated config, or say in one line what is wrong and exit with
status 2 (before any process group exists, so that a bad key does not cost a rendezvous).

Hydra's own flags keep their meaning: ``--help``, ``--hydra-help``, ``--cfg job|hydra|all``
(resolved), ``--info``, ``--shell-completion`` and ``-m/--multirun`` are handed to Hydra's main
once the overrides are known to compose; ``--config-dir`` and ``--config-name`` also apply to
plain runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from clipdist.config import CONF_DIR, Config, ConfigError, describe_config_error, load_config, register_configs, validate
from clipdist.distributed import DistEnv, DistEnvError
from clipdist.faults import die_with_launcher
from clipdist.log import setup_console_logging

# Flags after which Hydra's main prints something and exits, without running the job.
HYDRA_OUTPUT_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")

# A multirun point: Hydra's job config in, the job's return value out.
MultirunTask = Callable[[Any], Any]


def start(
    argv: Optional[Sequence[str]],
    *,
    training: bool = True,
    check: Callable[[Config], None] = lambda cfg: None,
    multirun_task: Optional[MultirunTask] = None,
) -> Tuple[DistEnv, Config, Dict[str, Any]] | int:
    """(launch environment, config, resolved config as a dict) for a run; or an exit status:
    2 after printing the one-line error, 0 after Hydra answered a flag or ran a multirun.
    ``check`` adds an entry point's own ConfigError checks."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    orphaned = die_with_launcher()  # first: a rank must not outlive torchrun or srun
    if orphaned:
        return refuse("launch environment", f"{orphaned}; exiting")
    command = parse_command_line(arguments)
    try:
        if command.multirun or any(getattr(command, flag) for flag in HYDRA_OUTPUT_FLAGS):
            return hand_to_hydra(arguments, command, multirun_task)
        env = DistEnv.from_environ()
    except DistEnvError as error:
        return refuse("launch environment", error)
    except ConfigError as error:
        return refuse("config error", error)
    setup_console_logging(env.rank)
    try:
        cfg, resolved = compose(command, command.overrides)
        validate(cfg, env.world_size, training=training)
        check(cfg)
    except ConfigError as error:
        return refuse("config error", error)
    return env, cfg, resolved


def parse_command_line(arguments: Sequence[str]) -> argparse.Namespace:
    """Hydra's own argument parser: the same flags, abbreviations and usage errors (exit 2)."""
    import hydra
    from hydra._internal.utils import get_args_parser

    import clipdist

    parser = get_args_parser()
    version = next(action for action in parser._actions if action.dest == "version")
    version.version = f"clipdist {clipdist.__version__} (Hydra {hydra.__version__})"
    return parser.parse_args(list(arguments))


def compose(command: argparse.Namespace, overrides: Sequence[str]) -> Tuple[Config, Dict[str, Any]]:
    if command.config_path is not None:
        raise ConfigError("--config-path: clipdist's config tree is built in; add yours with --config-dir DIR (or hydra.searchpath)")
    return load_config(overrides, extra_config_dir=command.config_dir, config_name=command.config_name or "config")


def hand_to_hydra(arguments: List[str], command: argparse.Namespace, multirun_task: Optional[MultirunTask]) -> int:
    """Run Hydra's main on the command line, after checking in one line that it composes (for a
    multirun: its first point). ``--cfg`` prints the resolved config, what a launch will use."""
    if command.multirun and multirun_task is None:
        raise ConfigError("-m/--multirun: this entry point runs once; sweeps are `python -m clipdist.train -m ...`")
    if not (command.help or command.hydra_help or command.shell_completion):
        compose(command, first_sweep_point(command.overrides) if command.multirun else command.overrides)
    if command.cfg and not command.resolve:
        arguments = [*arguments, "--resolve"]
    run_hydra_main(arguments, multirun_task or (lambda job_config: None), config_name=command.config_name or "config")
    return 0


def first_sweep_point(overrides: Sequence[str]) -> List[str]:
    """The overrides of a sweep's first job (``optim.lr=1e-3,3e-4`` -> ``optim.lr=1e-3``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:  # Hydra's grammar errors: the same one line as for a run
        raise ConfigError(describe_config_error(error)) from error
    point = []
    for override in parsed:
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()))
            point.append(f"{override.get_key_element()}={value}")
        else:
            point.append(override.input_line)
    return point


def run_hydra_main(arguments: Sequence[str], task: MultirunTask, config_name: str) -> None:
    import hydra

    register_configs()
    main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [saved[0], *arguments]  # Hydra's main reads its flags from sys.argv
    try:
        main()
    finally:
        sys.argv = saved


def refuse(kind: str, error: Exception | str) -> int:
    """Print a mistake as one line on stderr and return its exit status, 2. ``kind``: "config
    error" for a value (a bad key, a train.resume that names no checkpoint), "data error" for
    shards that cannot be used, "launch environment" for torchrun's or Slurm's variables."""
    print(f"clipdist: {kind}: {error}", file=sys.stderr)
    return 2
