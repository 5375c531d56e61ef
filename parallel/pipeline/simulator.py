"""Event-driven replay of a :class:`Schedule` with unit costs.

Cost convention (the DeepSeek-V3 report's Table 2): ``b`` is the paper's B, the time of a *full*
backward chunk (input grads + weight grads); ``w`` is the weight-grad part of it. Hence

* ``F``                      costs ``f``
* ``B`` with ``full=True``   costs ``full_b`` (defaults to ``b``)
* ``B`` with ``full=False``  costs ``b - w``  (input grads only)
* ``W``                      costs ``w``
* ``FB``                     costs ``fb`` (the paper's F&B: a forward and a full backward
  overlapped), or ``fb - w`` when its backward half is split.

A message costs ``p2p`` (latency, overlapped with compute: it only delays the consumer);
a local hand-over (same rank) costs nothing.

Each rank executes its action list in order; an action starts when the rank is free and every
input it receives has arrived (F: the previous stage's F output of the same micro-batch;
B: the next stage's B output). All ranks start at t=0.

Bubble of a rank = makespan - busy time of that rank (all its idle time, including waiting at
the end for the slowest rank). With this definition 1F1B gives exactly (pp-1)(F+B) on every
rank, the paper's closed form; ``bubble`` is the maximum over ranks.

Peak activations of a rank = the maximum number of (micro-batch, chunk) whose F has run and whose
B has not, in units of one micro-batch's activations of one stage of the schedule (an FB counts
its F half before releasing its B half). Deferred W's still hold the inputs their weight grads
need; that is not counted (as in the paper: 1F1B pp, DualPipe pp+1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .schedule import Action, Kind, Schedule, ScheduleError


@dataclass(frozen=True)
class Costs:
    f: float = 1.0
    b: float = 2.0  # full backward (paper's B)
    w: float = 1.0  # weight-grad part of b
    fb: float = 2.5  # overlapped forward + full backward (paper's F&B)
    p2p: float = 0.0
    full_b: Optional[float] = None  # cost of a non-split backward; None -> b

    def of(self, action: Action) -> float:
        if action.kind is Kind.F:
            return self.f
        if action.kind is Kind.W:
            return self.w
        if action.kind is Kind.B:
            if action.full:
                return self.b if self.full_b is None else self.full_b
            return self.b - self.w
        if action.kind is Kind.FB:
            return self.fb if action.backward.full else self.fb - self.w
        raise ScheduleError(f"no cost for {action}")


@dataclass(frozen=True)
class Timed:
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    makespan: float
    bubble_per_rank: Tuple[float, ...]
    bubble: float
    peak_activations_per_rank: Tuple[int, ...]
    peak_activations: int
    busy_per_rank: Tuple[float, ...]
    timeline: Tuple[Tuple[Timed, ...], ...]  # timeline[rank] = actions with start/end


def simulate(schedule: Schedule, costs: Costs = Costs()) -> SimResult:
    s = schedule
    ready: Dict[Tuple[str, int, int], float] = {}  # (kind, mb, src_stage) -> finish time
    free = [0.0] * s.pp
    idx = [0] * s.pp
    timeline: List[List[Timed]] = [[] for _ in range(s.pp)]
    total = sum(len(a) for a in s.actions)
    done = 0
    while done < total:
        progress = False
        for r in range(s.pp):
            while idx[r] < len(s.actions[r]):
                act = s.actions[r][idx[r]]
                arrivals = []
                for m in s.recvs(r, act):
                    t = ready.get((m.kind, m.microbatch, m.src_stage))
                    if t is None:
                        break
                    arrivals.append(t + (0.0 if m.local else costs.p2p))
                else:
                    start = max([free[r]] + arrivals)
                    end = start + costs.of(act)
                    for m in s.sends(r, act):
                        ready[(m.kind, m.microbatch, m.src_stage)] = end
                    timeline[r].append(Timed(act, start, end))
                    free[r] = end
                    idx[r] += 1
                    done += 1
                    progress = True
                    continue
                break
        if not progress:
            stuck = {r: str(s.actions[r][idx[r]]) for r in range(s.pp)
                     if idx[r] < len(s.actions[r])}
            raise ScheduleError(f"{s.name}: deadlock, ranks wait at {stuck}")

    makespan = max((t.end for tl in timeline for t in tl), default=0.0)
    busy = tuple(sum(t.end - t.start for t in tl) for tl in timeline)
    bubbles = tuple(makespan - b for b in busy)
    peaks = tuple(_peak_activations(acts) for acts in s.actions)
    return SimResult(
        makespan=makespan, bubble_per_rank=bubbles, bubble=max(bubbles),
        peak_activations_per_rank=peaks, peak_activations=max(peaks),
        busy_per_rank=busy, timeline=tuple(tuple(tl) for tl in timeline),
    )


def _peak_activations(actions) -> int:
    live = peak = 0
    for act in actions:
        for a in act.parts():
            if a.kind is Kind.F:
                live += 1
                peak = max(peak, live)
            elif a.kind is Kind.B:
                live -= 1
    return peak


def to_chrome_trace(schedule: Schedule, result: SimResult, us_per_unit: float = 1000.0
                    ) -> List[dict]:
    """Chrome-trace events (``chrome://tracing`` / Perfetto: ``json.dump({"traceEvents": ev})``).

    One process per rank (pid = rank), one thread (tid 0); each action is a complete event
    (ph="X") with ``ts``/``dur`` in microseconds (``us_per_unit`` per cost unit)."""
    events: List[dict] = []
    for r in range(schedule.pp):
        stages = ", ".join(str(x) for x in schedule.placement[r])
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0,
                       "args": {"name": f"rank {r} (stages {stages})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0,
                       "args": {"sort_index": r}})
        for t in result.timeline[r]:
            a = t.action
            args = {"kind": a.kind.value}
            for part in a.parts():
                args[f"{part.kind.value}"] = {
                    "microbatch": part.microbatch, "chunk": part.chunk,
                    "stage": schedule.stage_of(r, part.chunk),
                    **({"full": part.full} if part.kind is Kind.B else {})}
            events.append({
                "name": str(a), "cat": a.kind.value, "ph": "X", "pid": r, "tid": 0,
                "ts": t.start * us_per_unit, "dur": (t.end - t.start) * us_per_unit,
                "args": args,
            })
    return events
