"""Seconds the training loop is blocked by a checkpoint save: synchronous vs checkpoint.async_save.

    python benchmarks/checkpoint_block.py [--model toy] [--steps 12] [--every 2] [--run-dir runs/ckpt_block]

Trains the model preset in one process twice (same seed, data, batch), saving every `--every`
steps, once with synchronous DCP saves and once with asynchronous ones (stage to CPU, write in a
background thread; the next save waits for the previous). Prints, per mode, the median of
`checkpoint_block_s` over the steps that saved, the ratio async/sync, and whether the two runs'
losses are bit-identical (saving must not change training). Output: `key=value` lines.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.helpers import compose, read_metrics  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402


def run(model: str, steps: int, every: int, run_dir: str, async_save: bool) -> list[dict]:
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = compose([f"model={model}", f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.keep=2",
                   f"checkpoint.async_save={str(async_save).lower()}", f"run.dir={run_dir}",
                   "logging.progress=false", "logging.peak_tflops=1", "train.global_batch=8", "train.micro_batch=4"])
    Trainer(cfg).train()
    return read_metrics(run_dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--run-dir", default=os.path.join(REPO, "runs", "ckpt_block"))
    a = ap.parse_args()
    rows = {mode: run(a.model, a.steps, a.every, os.path.join(a.run_dir, mode), mode == "async")
            for mode in ("sync", "async")}
    med = {}
    for mode, rs in rows.items():
        saved = [r["checkpoint_block_s"] for r in rs if r["step"] % a.every == 0]
        med[mode] = statistics.median(saved)
        print(f"{mode}_checkpoint_block_s_median={med[mode]:.4f} saves={len(saved)} "
              f"step_time_s_median={statistics.median(r['step_time_s'] for r in rs):.4f}")
    print(f"async_over_sync={med['async'] / med['sync']:.3f}")
    same = all((x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]) for x, y in zip(rows["sync"], rows["async"]))
    print(f"losses_bit_identical={same}")


if __name__ == "__main__":
    main()
