"""Hydra multirun sweeps, each job under torchrun, and the summary table at the end.

    python -m launch.train -m train.lr=1e-3,3e-3 launch.nproc_per_node=2 parallel.ep=2 run.dir=runs/lr

Hydra's basic sweeper expands the comma-separated overrides (cartesian product) and calls
`launch.train.main` once per job, in this process. `main` hands the job to `run_job` here:

- The job's run.dir is its Hydra job directory, `${hydra.sweep.dir}/${hydra.sweep.subdir}`, which
  configs/config.yaml sets to `${run.dir}/${hydra.job.num}`: runs/lr/0, runs/lr/1, ... (distinct per
  job, whatever run.dir the command line gives; `hydra.sweep.dir=...` moves the root).
- launch.nproc_per_node > 1: the job runs as a subprocess
  `python -m torch.distributed.run --standalone --nproc_per_node N -m launch.train <job overrides>
  run.dir=<job dir>`; its exit code is the job's status. A plain run (no -m) with
  launch.nproc_per_node > 1 relaunches itself the same way. Under torchrun (LOCAL_RANK set) nothing
  is relaunched.
- launch.nproc_per_node == 1: the Trainer runs in this process, as in a single run.
A failed job never stops the sweep: it is a row "failed (rc=N)" in the table, and the process exits
with 1 at the end. `SweepSummary` (a Hydra Callback, configs/config.yaml hydra.callbacks) collects one
row per job (on_job_end, read from the job's metrics.jsonl) and prints the table (on_multirun_end),
also saved as <sweep dir>/summary.txt. `python -m launch.sweep <sweep dir>` prints it again.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import traceback
from typing import Any, Callable, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_FILE = "sweep_job.json"  # one job's row, written into its run.dir
SUMMARY_FILE = "summary.txt"

_in_process_job = False  # set while a multirun job runs the Trainer in this process


def _hydra_cfg() -> Optional[DictConfig]:
    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    hc = _hydra_cfg()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def wants_launch(cfg: DictConfig) -> bool:
    """True when `main` should hand this invocation to `run_job`: a multirun job (not already
    running in-process), or a plain run asking for launch.nproc_per_node > 1 outside torchrun."""
    if _in_process_job or _under_torchrun():
        return False
    nproc = int(cfg.get("launch", {}).get("nproc_per_node", 1))
    return in_multirun() or nproc > 1


def _override_value(path: str) -> str:
    """A path as a Hydra override value (quoted when it holds characters the grammar treats specially)."""
    if re.fullmatch(r"[\w./:+~-]+", path):
        return path
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def torchrun_command(overrides: list[str], run_dir: str, nproc: int, max_restarts: int = 0) -> list[str]:
    job = [o for o in overrides if _key(o) != "run.dir"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "launch.train", *job, f"run.dir={_override_value(run_dir)}"]


def _run_in_process(cfg: DictConfig, main: Callable[[DictConfig], Any]) -> int:
    global _in_process_job
    _in_process_job = True
    try:
        main(cfg)
        return 0
    except SystemExit as e:  # launch.errors.exit_with: a named user error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # noqa: BLE001 - one failed job must not end the sweep
        traceback.print_exc()
        return 1
    finally:
        _in_process_job = False


def run_job(cfg: DictConfig, main: Callable[[DictConfig], Any]) -> Optional[dict]:
    """Run one job (see the module docstring). Returns the job's result for the callback in a
    multirun; in a plain run, exits with the torchrun subprocess' code when it failed."""
    nproc = int(cfg.launch.nproc_per_node)
    if not in_multirun():  # plain run with launch.nproc_per_node > 1
        hc = _hydra_cfg()
        overrides = list(hc.overrides.task) if hc is not None else []
        cmd = torchrun_command(overrides, str(cfg.run.dir), nproc, int(cfg.launch.max_restarts))
        rc = subprocess.call(cmd, env=_child_env())
        if rc:
            sys.exit(rc)
        return None

    hc = _hydra_cfg()
    overrides = list(hc.overrides.task)
    run_dir = os.path.join(str(hc.sweep.dir), str(hc.sweep.subdir))
    cfg.run.dir = run_dir
    how = f"torchrun, {nproc} ranks" if nproc > 1 else "in-process"
    print(f"[sweep] job {hc.job.num}: {' '.join(overrides) or '(no overrides)'} -> {run_dir} ({how})", flush=True)
    if nproc > 1:
        cmd = torchrun_command(overrides, run_dir, nproc, int(cfg.launch.max_restarts))
        rc = subprocess.call(cmd, env=_child_env())
    else:
        rc = _run_in_process(cfg, main)
    sys.stdout.flush()
    sys.stderr.flush()
    return {"num": int(hc.job.num), "overrides": overrides, "run_dir": run_dir, "rc": rc, "nproc": nproc}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------------------------------
# Summary table


def summarize_metrics(run_dir: str) -> dict:
    """final step, final loss, mean lm_loss over the last 10 steps, median tokens/s of a run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    recs: list[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass  # a half-written last line of a killed run
    if not recs:
        return {"final_step": None, "final_loss": None, "lm_loss_last10": None, "tokens_per_s_median": None}
    last10 = [r["lm_loss"] for r in recs[-10:] if "lm_loss" in r]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return {"final_step": recs[-1].get("step"), "final_loss": recs[-1].get("loss"),
            "lm_loss_last10": sum(last10) / len(last10) if last10 else None,
            "tokens_per_s_median": statistics.median(tps) if tps else None}


def job_row(result: dict, swept_keys: Optional[list[str]] = None) -> dict:
    rc = result["rc"]
    shown = [o for o in result["overrides"] if swept_keys is None or _key(o) in swept_keys]
    return {"job": result["num"], "overrides": " ".join(shown or result["overrides"]),
            "run_dir": result["run_dir"], "status": "ok" if rc == 0 else f"failed (rc={rc})",
            "rc": rc, **summarize_metrics(result["run_dir"])}


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-" if v is None else str(v)
    return format(v, spec)


def format_table(rows: list[dict]) -> str:
    head = ["job", "overrides", "run.dir", "final step", "final loss", "lm_loss (last 10)", "tokens/s (median)", "status"]
    body = [[str(r["job"]), r["overrides"] or "-", r["run_dir"], _fmt(r["final_step"], "d"), _fmt(r["final_loss"], ".4f"),
             _fmt(r["lm_loss_last10"], ".4f"), _fmt(r["tokens_per_s_median"], ".0f"), r["status"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    numeric = {0, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def swept_keys_of(task_overrides: list[str]) -> Optional[list[str]]:
    """Keys the command line sweeps over (train.lr=1e-3,3e-3 -> train.lr), via Hydra's parser."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    except Exception:  # noqa: BLE001 - the table falls back to all overrides
        return None
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return keys or None


class SweepSummary(Callback):
    """Hydra callback: one row per job (on_job_end), the table at the end (on_multirun_end).
    Exits with 1 after the table when any job failed."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.swept: Optional[list[str]] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows, self.swept = [], swept_keys_of(list(config.hydra.overrides.task))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        result = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        if not isinstance(result, dict):  # the task function raised (or returned nothing)
            num = int(config.hydra.job.num)
            run_dir = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
            result = {"num": num, "overrides": list(job_return.overrides or []), "run_dir": run_dir, "rc": 1}
        row = job_row(result, self.swept)
        self.rows.append(row)
        print(f"[sweep] job {row['job']}: {row['status']}", flush=True)
        try:
            os.makedirs(row["run_dir"], exist_ok=True)
            with open(os.path.join(row["run_dir"], JOB_FILE), "w") as f:
                json.dump(row, f)
        except OSError:
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        rows = sorted(self.rows, key=lambda r: r["job"]) or load_rows(sweep_dir)
        table = format_table(rows)
        failed = [r for r in rows if r["rc"] != 0]
        print(f"\n[sweep] {len(rows)} jobs, {len(failed)} failed ({sweep_dir})\n{table}", flush=True)
        try:
            with open(os.path.join(sweep_dir, SUMMARY_FILE), "w") as f:
                f.write(table + "\n")
        except OSError:
            pass
        if failed:
            sys.stdout.flush()
            raise SystemExit(1)  # SystemExit passes through Hydra's callback error handling


def load_rows(sweep_dir: str) -> list[dict]:
    """The rows saved in <sweep dir>/<job>/sweep_job.json (metrics re-read from the run dirs)."""
    rows = []
    if os.path.isdir(sweep_dir):
        for name in os.listdir(sweep_dir):
            path = os.path.join(sweep_dir, name, JOB_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    row = json.load(f)
                row.update(summarize_metrics(row["run_dir"]))
                rows.append(row)
    return sorted(rows, key=lambda r: r["job"])


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: python -m launch.sweep <sweep dir>   (prints the summary table of a finished sweep)", file=sys.stderr)
        sys.exit(2)
    found = load_rows(sys.argv[1])
    if not found:
        print(f"error: no {JOB_FILE} under {sys.argv[1]}/*/", file=sys.stderr)
        sys.exit(2)
    print(format_table(found))
    sys.exit(1 if any(r["rc"] != 0 for r in found) else 0)
