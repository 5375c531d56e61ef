"""DualPipeV ("cut-in-half" DualPipe) as a pure-data schedule.

``pp`` ranks, ``2*pp`` model stages, one parameter copy: rank r holds stage r (chunk 0, on the
way down the V) and stage 2pp-1-r (chunk 1, on the way back). Every micro-batch enters at rank 0,
goes down to rank pp-1, turns there (stage pp-1 -> pp is a local hand-over, no p2p) and comes back
to rank 0, which also computes the loss. Needs ``n_microbatches >= 2*pp``.

The per-rank program is DualPipe's eight steps (see ``dualpipe.py``) with K = pp half-pipe
ranks, h = r, phase = chunk and all ``n`` micro-batches flowing through both chunks.
Activations are counted in units of one DualPipeV stage (half of a DualPipe stage).
"""
from __future__ import annotations

from .dualpipe import _eight_steps, _RankProgram
from .schedule import Schedule, ScheduleError, make_schedule


def dualpipev(pp: int, n_microbatches: int) -> Schedule:
    if pp < 1:
        raise ScheduleError(f"dualpipev needs parallel.pp >= 1, got {pp}")
    n = n_microbatches
    if n < 2 * pp:
        raise ScheduleError(
            f"dualpipev needs >= 2*parallel.pp = {2 * pp} micro-batches "
            f"(train.microbatches = global_batch / (micro_batch * dp)), got {n} with "
            f"parallel.pp={pp}")
    actions = []
    for r in range(pp):
        prog = _RankProgram(chunk_of_phase=(0, 1), microbatch=lambda c, i: i)
        actions.append(_eight_steps(prog, pp, r, n))
    return make_schedule(
        name="dualpipev", pp=pp, n_microbatches=n, n_stages=2 * pp,
        placement=[[r, 2 * pp - 1 - r] for r in range(pp)],
        paths=[[(s, 0) for s in range(pp)] + [(pp - 1 - s, 1) for s in range(pp)]],
        mb_path=[0] * n,
        actions=actions,
    )
