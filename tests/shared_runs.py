"""Training runs that more than one test checks, started once per pytest session.

A multi-process run costs seconds to tens of seconds on the small CI machine, and several tests
check different facts of the same job: tests/test_mixed_precision.py (bf16/fp8) and
tests/test_layouts.py (fp32) compare a layout's losses with one process, tests/test_plan_vs_run.py
compares the same run's per-rank bytes (rank_bytes.json, metrics.jsonl) with the planner. ``SharedRuns.get`` (the session fixture
``shared_runs`` in tests/conftest.py) keys a run by its process count and overrides: whichever
test asks first starts it, the others read the same run dir. A run is only ever read after it
ends, so sharing it cannot change what a test sees; the run's own failure is kept and reported
to every test that asks for it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import run_cli

# The low-precision layout jobs both tests check: 4 steps of global batch 16 in micro-batches of 1
# (DualPipe needs >= 2·pp micro-batches per rank) on 4 layers, with the recompute mode the
# DeepSeek-V3 recipe trains bf16/fp8 with, so the byte and activation checks cover it.
LOW = ("bf16", "fp8")
LOW_STEPS = 4
LOW_PIPE = ["train.global_batch=16", "train.micro_batch=1", "model.n_layers=4", f"train.steps={LOW_STEPS}",
            "train.recompute=norm_and_up_proj"]
DUALPIPE = ["parallel.pp=2", "parallel.schedule=dualpipe"]
# (id, nproc, layout overrides, layout as the planner takes it)
LOW_LAYOUTS = [("dp4_ep2", 4, ["parallel.ep=2"], dict(pp=1, dp=4, ep=2)),
               ("pp2_dp2_ep2_dualpipe", 4, DUALPIPE + ["parallel.ep=2"], dict(pp=2, dp=2, ep=2, schedule="dualpipe")),
               ("pp2_dp4_ep4_dualpipe", 8, DUALPIPE + ["parallel.ep=4"], dict(pp=2, dp=4, ep=4, schedule="dualpipe"))]


def low_job(precision: str, args: list[str]) -> list[str]:
    """The overrides of a low-precision job: LOW_PIPE at ``precision`` plus ``args``."""
    return LOW_PIPE + [f"precision={precision}"] + list(args)


class SharedRuns:
    """Runs of the tiny job (tests.helpers.run_cli), one per (nproc, overrides) per session."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._runs: dict[tuple, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(self, nproc: int, overrides: list[str], timeout: int = 900) -> tuple[Path, subprocess.CompletedProcess]:
        """(run dir, finished process) of ``run_cli(overrides + [run.dir=...], nproc)``, run on first use."""
        key = (nproc, tuple(overrides))
        if key not in self._runs:
            run_dir = self.root / f"run{len(self._runs)}"
            res = run_cli(list(overrides) + [f"run.dir={run_dir}"], nproc=nproc, timeout=timeout)
            self._runs[key] = (run_dir, res)
        return self._runs[key]


# fp32 jobs of tests/test_layouts.py (10 steps, evaluating at steps 5 and 10): its one-process
# reference (the tiny job) and its pp2×dp2×ep2 DualPipe run (the pipeline batch: DualPipe needs
# >= 2·pp micro-batches per rank, global batch 16 of micro-batch 1, 4 layers) are also the
# "single" and "pp2_dp2_ep2_dualpipe_fp32" runs whose bytes tests/test_plan_vs_run.py checks.
LAYOUT_STEPS = 10
LAYOUT_EVAL = ["train.eval_every=5", "train.eval_batches=1", "train.ema_decay=0.8"]
LAYOUT_PIPE = ["train.global_batch=16", "train.micro_batch=1", "model.n_layers=4"]
PP2_DP2_EP2_DUALPIPE = ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe"]


def layout_job(args: list[str], evaluate: bool = True) -> list[str]:
    """The overrides of a tests/test_layouts.py job: LAYOUT_STEPS steps (with evaluation) plus ``args``."""
    return [f"train.steps={LAYOUT_STEPS}"] + (LAYOUT_EVAL if evaluate else []) + list(args)
