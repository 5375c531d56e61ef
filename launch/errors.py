"""User errors that end a run with one line (no traceback) before any collective starts."""
from __future__ import annotations

import sys


def user_error_types() -> tuple[type, ...]:
    from model.config import ConfigError
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError

    types: list[type] = [ConfigError, DataError, CheckpointError]
    try:
        from parallel.topology import LayoutError

        types.append(LayoutError)
    except ImportError:
        pass
    try:
        from parallel.pipeline.schedule import ScheduleError

        types.append(ScheduleError)
    except ImportError:
        pass
    return tuple(types)


def exit_with(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


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


def precheck_overrides(config_dir: str, argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so an unknown key, a wrong type or a missing
    preset ends the process with one line (Hydra's own report spans several) and exit code 2.
    Multirun and hydra.* arguments are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith(("hydra.", "+hydra.", "~hydra."))]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        exit_with(_one_line(err))
