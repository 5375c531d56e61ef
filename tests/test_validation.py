"""Every user-facing key is validated before anything starts: the config walk over the structured
config (a new field without a row in trainer/validation.py's RULES fails here), and the one-line
`error: <key>: ...` through python -m launch.train, torchrun and -m sweeps."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest

from launch.errors import first_error
from tests.helpers import CONFIG_DIR, REPO_ROOT, TINY, run_cli
from trainer.validation import INTERNAL, RULES, schema_keys


def test_every_schema_key_has_a_rule():
    keys = schema_keys()
    missing = sorted(set(keys) - set(RULES))
    stale = sorted(set(RULES) - set(keys))
    assert not missing, f"add a row (check + invalid examples) to trainer/validation.py RULES for {missing}"
    assert not stale, f"RULES names keys the config no longer has: {stale}"
    assert len(keys) >= 100 and "hardware" in INTERNAL
    print(f"\n{len(keys)} user-facing keys, {sum(len(r.bad) for r in RULES.values())} invalid examples")


CASES = [(key, bad) for key, rule in RULES.items() for bad in rule.bad]


@pytest.fixture(scope="module")
def base_cfg():
    from tests.helpers import compose

    cfg = compose(TINY)
    assert first_error(CONFIG_DIR, TINY) is None
    return cfg


def _error_line(cfg, key, value):
    """The first error for cfg with key set to value, as the command line would report it: Hydra's
    typing (the node refuses the value) or trainer/validation.py's rules."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from model.config import ConfigError
    from trainer.validation import validate_config

    cfg = copy.deepcopy(cfg)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
        validate_config(cfg)
    except OmegaConfBaseException as err:
        return f"{err.full_key}: {str(err).splitlines()[0]}"
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("key, bad", CASES, ids=[f"{k}={b}" for k, b in CASES])
def test_every_invalid_value_is_one_named_line(base_cfg, key, bad):
    line = _error_line(base_cfg, key, bad)
    assert line is not None, f"{key}={bad!r} was accepted"
    assert line.startswith(f"{key}:"), line
    assert "\n" not in line and "Traceback" not in line


@pytest.mark.parametrize("args, key", [
    (["train.global_batch=0"], "train.global_batch"),
    (["train.global_batch=-8"], "train.global_batch"),
    (["train.lr=-1e-3"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["run.dir=/proc/version/run"], "run.dir"),
    (["logging.wandb=maybe"], "logging.wandb"),
])
def test_new_user_bad_inputs_are_one_named_line(tmp_path, args, key):
    res = run_cli([f"run.dir={tmp_path}"] + args, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {key}:"), res.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_value_under_torchrun_is_one_named_line_per_rank(tmp_path):
    res = run_cli([f"run.dir={tmp_path}", "parallel.ep=2", "train.lr=-1"], nproc=2, timeout=180)
    assert res.returncode != 0, res.stderr
    # torchrun's own agent reports the failed ranks with its traceback; none comes from our code
    assert not re.search(r'File ".*/(launch|trainer|parallel|model)/', res.stderr), res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and all(ln.startswith("error: train.lr:") for ln in errors), res.stderr


@pytest.mark.parametrize("sweep, key", [
    ("train.lrr=1e-3,3e-3", "train.lrr"),  # a typo in the swept key
    ("train.lr=1e-3,-1", "train.lr"),  # one bad value among the swept ones
])
def test_sweep_with_a_bad_key_or_value_is_one_named_line(tmp_path, sweep, key):
    cmd = [sys.executable, "-m", "launch.train", "-m", sweep, f"run.dir={tmp_path}"] + TINY
    res = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), res.stderr
    assert not any(os.scandir(tmp_path)), "no job started"
