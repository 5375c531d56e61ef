"""Where a step's numbers go: metrics.jsonl (the run contract), wandb, and the tqdm bar."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch


class MetricsSink:
    """Rank-0 only. `log(step, record)` appends one JSON object per step to run.dir/metrics.jsonl.

    On resume, records of steps after the resumed checkpoint are dropped first, so the file
    never holds a step twice (a crashed attempt may have logged steps it never checkpointed).
    """

    def __init__(self, run_dir: str, cfg, config_dict: dict, total_steps: int, start_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        self._wandb = None
        if cfg.wandb != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.project, name=cfg.name, mode=cfg.wandb, dir=run_dir,
                                     config=config_dict, resume="allow")
        self._bar = None
        self._val = None  # the last validation loss, kept on the progress bar between evaluations
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, record: dict, extra: Optional[dict] = None) -> None:
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        if self._wandb is not None:
            self._wandb.log({**record, **(extra or {})}, step=step)
        if self._bar is not None:
            self._bar.update(1)
            if "val_loss" in record:
                self._val = f"{record['val_loss']:.3f}"
            shown = {"val": self._val} if self._val else {}
            self._bar.set_postfix(loss=f"{record['loss']:.3f}", **shown, tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """Achieved FLOP/s of a square matmul on this device: the MFU denominator when none is set."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def peak_memory_bytes(device: torch.device) -> int:
    """Allocator peak on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
