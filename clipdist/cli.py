"""What every entry point does first: read the launch environment and the validated config, or
say in one line what is wrong and exit with status 2 (before any process group exists, so that a
bad key does not cost a rendezvous)."""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from clipdist.config import Config, ConfigError, load_config, validate
from clipdist.distributed import DistEnv, DistEnvError
from clipdist.faults import die_with_launcher
from clipdist.log import setup_console_logging


def start(
    argv: Optional[Sequence[str]], *, training: bool = True, check: Callable[[Config], None] = lambda cfg: None
) -> Tuple[DistEnv, Config, Dict[str, Any]] | int:
    """(launch environment, config, resolved config as a dict), or the exit status 2 after
    printing the one-line error. ``check`` adds an entry point's own ConfigError checks."""
    overrides = sys.argv[1:] if argv is None else list(argv)
    orphaned = die_with_launcher()  # first: a rank must not outlive torchrun or srun
    if orphaned:
        print(f"clipdist: launch environment: {orphaned}; exiting", file=sys.stderr)
        return 2
    try:
        env = DistEnv.from_environ()
    except DistEnvError as error:
        print(f"clipdist: launch environment: {error}", file=sys.stderr)
        return 2
    setup_console_logging(env.rank)
    try:
        cfg, resolved = load_config(overrides)
        validate(cfg, env.world_size, training=training)
        check(cfg)
    except ConfigError as error:
        print(f"clipdist: config error: {error}", file=sys.stderr)
        return 2
    return env, cfg, resolved
