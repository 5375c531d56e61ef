"""Errors that end a run with one line (no traceback): user errors before any collective starts,
and agreed stops (train.on_nonfinite=stop).

Under torchrun every rank raises the same config/layout error (the checks are pure functions of
the config), so only rank 0 prints it. Errors that can differ between ranks (a data file missing
on one node, a checkpoint one rank cannot read) are printed by every rank that hits them.
The exit code is EXIT_USER_ERROR: not worth a restart. torchrun (2.13) restarts a failed group
whatever the exit code, so under --max-restarts each attempt fails the same way at once (before
any collective) and prints its one line.
"""
from __future__ import annotations

import os
import sys
import time

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from model.config import ConfigError
from parallel.pipeline.schedule import ScheduleError
from trainer.config import register_configs
from trainer.data import DataError

EXIT_USER_ERROR = 2


def _rank_independent_error_types() -> tuple[type, ...]:
    """Errors every rank raises identically (config, layout, schedule, the agreed non-finite stop):
    printed by rank 0 only."""
    # here, not at the top: these two modules import torch, which launch.plan never loads
    from parallel.topology import LayoutError
    from trainer.step_guard import NonFiniteError

    return (ConfigError, NonFiniteError, LayoutError, ScheduleError)


def user_error_types() -> tuple[type, ...]:
    """Every error that ends a run with one line: the rank-independent ones, plus data and
    checkpoint errors (which can differ per node, so every rank that meets one prints it)."""
    from trainer.checkpoint import CheckpointError  # here: it imports torch, which launch.plan never loads

    return (*_rank_independent_error_types(), DataError, CheckpointError)


def _same_on_every_rank(err: BaseException) -> bool:
    return isinstance(err, _rank_independent_error_types())


def should_print(err: BaseException) -> bool:
    """Rank 0 prints an error every rank raises alike; any rank prints the others."""
    return not _same_on_every_rank(err) or os.environ.get("RANK", "0") == "0"


# How long a silent rank waits before exiting: torchrun stops the whole group as soon as one
# worker exits, so a rank that exited at once could get rank 0 killed before it printed the line.
# torchrun ends the wait (SIGTERM) when rank 0 exits.
SILENT_RANK_GRACE_S = 20.0


def exit_with(err: BaseException | str) -> None:
    """One line `error: ...` and EXIT_USER_ERROR. A str is a config composition error: the same on
    every rank, printed by rank 0."""
    if (os.environ.get("RANK", "0") == "0") if isinstance(err, str) else should_print(err):
        print(f"error: {err}", file=sys.stderr, flush=True)
    elif "TORCHELASTIC_RUN_ID" in os.environ:

        time.sleep(SILENT_RANK_GRACE_S)
    sys.exit(EXIT_USER_ERROR)


def _one_line(err: BaseException) -> str:
    """Hydra/OmegaConf composition errors as one line naming the key."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if cause is not None and full_key:
        first = str(cause).splitlines()[0]
        return f"{full_key}: {first}"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if "Available options" in str(err):
        opts = [ln for ln in lines[lines.index(next(l for l in lines if l.startswith("Available options"))) + 1:]
                if not ln.startswith(("Config search path", "provider="))]
        return f"{lines[0]} (available: {', '.join(opts)})"
    return " ".join(lines[:2])


def first_error(config_dir: str, overrides: list[str]) -> str | None:
    """Compose the config with these overrides and validate every key (trainer/validation.py):
    the one line naming the first bad key, or None. Nothing is created or started."""
    from trainer.validation import validate_config  # here: it imports torch, which launch.plan never loads

    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return _one_line(err)
    try:
        validate_config(cfg)
    except ConfigError as err:
        return str(err)
    return None


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The override lists to check for a -m sweep: every value of every swept key once (the
    others at their first value), not the whole cartesian product."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        text = o.input_line
        if o.is_sweep_override():
            key = text.split("=", 1)[0]
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([text])
    variants = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for value in c[1:]:
            variants.append([v if j != i else value for j, v in enumerate(variants[0])])
    return variants


def precheck_overrides(config_dir: str, argv: list[str]) -> None:
    """Compose and validate the config once before Hydra runs, so an unknown key, a wrong type, a
    value out of range or a missing preset ends the process with one line (Hydra's own report
    spans several) and exit code 2. A -m sweep checks each swept value. Other flags and hydra.*
    arguments are left to Hydra."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith(("-", "hydra.", "+hydra.", "~hydra."))]
    variants = [overrides]
    if multirun:
        try:
            variants = _sweep_variants(overrides)
        except HydraException as err:
            exit_with(_one_line(err))
    for variant in variants:
        problem = first_error(config_dir, variant)
        if problem:
            exit_with(problem)
