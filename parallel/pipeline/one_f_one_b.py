"""Classic 1F1B (PipeDream-flush) schedule: one stage per rank, full backward, no W split.

Rank r: warm-up of min(pp-1-r, n) forwards, then a steady phase alternating one forward and one
(full) backward, then a cool-down of the remaining backwards. Bubble (pp-1)(F+B) per rank, peak
activations pp micro-batches on rank 0.
"""
from __future__ import annotations

from .schedule import B, F, Schedule, ScheduleError, make_schedule


def one_f_one_b(pp: int, n_microbatches: int) -> Schedule:
    if pp < 1:
        raise ScheduleError(f"1f1b needs parallel.pp >= 1, got {pp}")
    if n_microbatches < 1:
        raise ScheduleError(f"1f1b needs at least one micro-batch (train.microbatches), "
                            f"got {n_microbatches}")
    n = n_microbatches
    actions = []
    for r in range(pp):
        warmup = min(pp - 1 - r, n)
        acts = [F(m) for m in range(warmup)]  # warm-up
        for i in range(n - warmup):  # steady 1F1B
            acts.append(F(warmup + i))
            acts.append(B(i))
        acts.extend(B(m) for m in range(n - warmup, n))  # cool-down
        actions.append(acts)
    return make_schedule(
        name="1f1b", pp=pp, n_microbatches=n, n_stages=pp,
        placement=[[r] for r in range(pp)],
        paths=[[(r, 0) for r in range(pp)]],
        mb_path=[0] * n,
        actions=actions,
    )
