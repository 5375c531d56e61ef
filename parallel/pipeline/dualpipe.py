"""DualPipe (DeepSeek-V3 technical report, section 3.2.1) as a pure-data schedule.

Bidirectional pipeline: ``pp`` ranks (even), ``pp`` model stages, two copies of each stage.
Rank r holds stage r as chunk 0 (the forward direction: micro-batches ``0 .. n/2-1`` enter at
rank 0) and stage pp-1-r as chunk 1 (the reverse direction: micro-batches ``n/2 .. n-1`` enter at
rank pp-1). Needs ``n_microbatches`` even and >= 2*pp.

Every rank runs the same eight phases as the reference implementation (deepseek-ai/DualPipe,
``dualpipe.py``), with step counts that depend only on the rank's distance to the pipeline end,
``h = min(r, pp-1-r)``. Each rank names its two chunks by *phase*: phase 0 is the direction
whose micro-batches reach it first (chunk 0 on the first half of the ranks, chunk 1 on the
second half), phase 1 the other one. With K = pp/2 and N = n/2 micro-batches per direction:

  1. nF0        2(K-h-1) forwards of phase 0 — fill the pipe from the near end.
  2. nF0F1      h+1 pairs F0, F1 — the far direction's first micro-batches arrive.
  3. nB1W1F1    K-h-1 times: input-grad B1, its W right away, F1 (zero-bubble warm-up).
  4. nF0B1F1B0  N-2K+h+1 times: FB(F0, B1), FB(F1, B0) — the overlapped main loop: each forward
                chunk runs interleaved with a backward chunk of the other direction so the
                all-to-all of one hides behind the compute of the other. (On the middle ranks
                the very first F0/B1 pair runs back to back, not overlapped, as in the reference.)
  5. nB1F1B0    K-h-1 times: B1, FB(F1, B0) — forwards run out.
  6. nB1B0      h+1 pairs B1, B0; the second half of them split off W (zero bubble).
  7. nWB0       K-h-1 times: W, input-grad B0 — deferred weight grads fill the drain bubble.
  8. nW         h+1 remaining W's.

Micro-batches are processed first-in first-out per (rank, chunk); W's pop the split B's FIFO.
The same eight steps with K = pp and one V-shaped path give DualPipeV (``dualpipev.py``).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Tuple

from .schedule import Action, B, F, FB, W, Schedule, ScheduleError, make_schedule


class _RankProgram:
    """Emits one rank's actions; hands out micro-batch ids FIFO per phase."""

    def __init__(self, chunk_of_phase: Tuple[int, int],
                 microbatch: Callable[[int, int], int]) -> None:
        self.chunk_of_phase = chunk_of_phase
        self.microbatch = microbatch  # (chunk, k-th of that chunk) -> micro-batch id
        self.n_f = [0, 0]
        self.n_b = [0, 0]
        self.deferred: Deque[Tuple[int, int]] = deque()  # split B's awaiting their W
        self.actions: List[Action] = []

    def f(self, phase: int) -> Action:
        c = self.chunk_of_phase[phase]
        a = F(self.microbatch(c, self.n_f[c]), c)
        self.n_f[c] += 1
        return a

    def b(self, phase: int, zero_bubble: bool = False) -> Action:
        c = self.chunk_of_phase[phase]
        mb = self.microbatch(c, self.n_b[c])
        self.n_b[c] += 1
        if zero_bubble:
            self.deferred.append((mb, c))
        return B(mb, c, full=not zero_bubble)

    def w(self) -> Action:
        mb, c = self.deferred.popleft()
        return W(mb, c)

    def emit(self, *acts: Action) -> None:
        self.actions.extend(acts)


def _eight_steps(prog: _RankProgram, k: int, h: int, per_direction: int) -> List[Action]:
    """The DualPipe phases for one rank. ``k``: ranks per half-pipe (pp/2 for DualPipe, pp for
    DualPipeV); ``h``: this rank's index within its half-pipe; ``per_direction``: micro-batches
    each chunk processes. The turning rank (``h == k-1``: the middle ranks of DualPipe, the last
    rank of DualPipeV) does its first F0/B1 of the main loop back to back, not overlapped."""
    p = prog
    # Step 1: nF0 — forwards from the near end only.
    for _ in range(2 * (k - h - 1)):
        p.emit(p.f(0))
    # Step 2: nF0F1 — interleave the far direction's first forwards.
    for _ in range(h + 1):
        p.emit(p.f(0), p.f(1))
    # Step 3: nB1W1F1 — first backwards of phase 1 with the weight grad right behind (zero bubble).
    for _ in range(k - h - 1):
        p.emit(p.b(1, zero_bubble=True), p.w(), p.f(1))
    # Step 4: nF0B1F1B0 — the overlapped steady state: F of one direction with B of the other.
    for i in range(per_direction - 2 * k + h + 1):
        if i == 0 and h == k - 1:
            p.emit(p.f(0), p.b(1))  # middle/turning rank: not overlapped (smaller bubble)
        else:
            f0 = p.f(0)
            p.emit(FB(f0, p.b(1)))
        f1 = p.f(1)
        p.emit(FB(f1, p.b(0)))
    # Step 5: nB1F1B0 — phase-0 forwards are done; phase-1 forwards still overlap B0.
    for _ in range(k - h - 1):
        b1 = p.b(1)
        f1 = p.f(1)
        p.emit(b1, FB(f1, p.b(0)))
    # Step 6: nB1B0 — drain both directions; the second half of them defer W (zero bubble).
    zero_bubble = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zero_bubble = True
        p.emit(p.b(1, zero_bubble))
        if i == (h + 1) // 2 and h % 2 == 0:
            zero_bubble = True
        p.emit(p.b(0, zero_bubble))
    # Step 7: nWB0 — a deferred W fills the gap before each remaining input-grad B0.
    for _ in range(k - h - 1):
        w = p.w()
        p.emit(w, p.b(0, zero_bubble=True))
    # Step 8: nW — the remaining weight grads.
    for _ in range(h + 1):
        p.emit(p.w())
    assert not p.deferred and p.n_f == [per_direction] * 2 and p.n_b == [per_direction] * 2
    return p.actions


def dualpipe(pp: int, n_microbatches: int) -> Schedule:
    """DeepSeek-V3 DualPipe over ``pp`` ranks and ``n_microbatches`` micro-batches."""
    if pp < 2 or pp % 2:
        raise ScheduleError(f"dualpipe needs an even pipeline size parallel.pp >= 2, got {pp}")
    n = n_microbatches
    if n < 2 * pp or n % 2:
        raise ScheduleError(
            f"dualpipe needs an even number of micro-batches >= 2*parallel.pp = {2 * pp} "
            f"(train.microbatches = global_batch / (micro_batch * dp)), got {n} with "
            f"parallel.pp={pp}")
    half_n, k = n // 2, pp // 2
    actions = []
    for r in range(pp):
        second_half = r >= k
        prog = _RankProgram(
            chunk_of_phase=(1, 0) if second_half else (0, 1),
            microbatch=lambda c, i: c * half_n + i,
        )
        actions.append(_eight_steps(prog, k, min(r, pp - 1 - r), half_n))
    return make_schedule(
        name="dualpipe", pp=pp, n_microbatches=n, n_stages=pp,
        placement=[[r, pp - 1 - r] for r in range(pp)],
        paths=[[(s, 0) for s in range(pp)], [(pp - 1 - s, 1) for s in range(pp)]],
        mb_path=[0] * half_n + [1] * half_n,
        actions=actions,
    )
