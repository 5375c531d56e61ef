"""Per-rank timeline of a pipeline step: compute (F / B / W per micro-batch) and communication
(p2p send/recv, expert-parallel all-to-all) intervals, as Chrome-trace JSON and a PNG drawn like
the DualPipe figure of the DeepSeek-V3 report.

Lanes (Chrome-trace ``tid``): 0 = compute on the main thread, 1 = compute of the forward half of
an overlapped FB pair (its own thread on CPU), 2 = pipeline p2p, 3 = all-to-all.

Clocks: events are stamped with ``time.perf_counter()`` and stored relative to the rank's
``origin``; the engine sets the origin right after a barrier of the pipeline group at the start
of a recorded step, so the ranks' timelines line up (to the barrier's skew) across processes
and nodes. ``gather_and_write`` merges every rank's events on rank 0 (``gather_object`` over the
default group — a collective: call it on every rank) and writes ``timeline.json`` +
``timeline.png`` into ``run_dir``.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from model.moe import in_recompute

LANES = {0: "compute", 1: "compute (FB forward half)", 2: "p2p", 3: "all-to-all"}


@dataclass
class Event:
    name: str
    cat: str  # F | B | Bi | W | p2p | a2a
    start: float  # seconds since origin
    end: float
    tid: int = 0
    args: dict = field(default_factory=dict)


class Timeline:
    def __init__(self, rank: int = 0, enabled: bool = False, label: str = ""):
        self.rank, self.enabled, self.label = rank, enabled, label
        self.events: list[Event] = []
        self.origin = time.perf_counter()
        self._lock = threading.Lock()

    def reset(self, origin: Optional[float] = None) -> None:
        self.events = []
        self.origin = time.perf_counter() if origin is None else origin

    def add(self, name: str, cat: str, start: float, end: float, tid: int = 0, **args: Any) -> None:
        """Record an interval given in ``time.perf_counter()`` seconds."""
        if not self.enabled:
            return
        with self._lock:
            self.events.append(Event(name, cat, start - self.origin, end - self.origin, tid, args))

    @contextmanager
    def span(self, name: str, cat: str, tid: int = 0, **args: Any):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, cat, t0, time.perf_counter(), tid, **args)

    def intervals(self, cat: Optional[str] = None, tid: Optional[int] = None) -> list[Event]:
        return [e for e in self.events if (cat is None or e.cat == cat) and (tid is None or e.tid == tid)]

    # ------------------------------------------------------------------ export
    def to_chrome(self, pid: Optional[int] = None) -> list[dict]:
        pid = self.rank if pid is None else pid
        out = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                "args": {"name": self.label or f"rank {self.rank}"}},
               {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
        for tid, lane in LANES.items():
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}})
        for e in self.events:
            out.append({"name": e.name, "cat": e.cat, "ph": "X", "pid": pid, "tid": e.tid,
                        "ts": e.start * 1e6, "dur": max(e.end - e.start, 0.0) * 1e6, "args": e.args})
        return out


def overlaps(a: Event, b: Event) -> float:
    """Length of the time both intervals are open (0 if disjoint)."""
    return max(0.0, min(a.end, b.end) - max(a.start, b.start))


def gather_and_write(timeline: Timeline, run_dir: str, group: Any = None, png: bool = True) -> Optional[str]:
    """Collective: merge every rank's events on rank 0 of ``group`` and write
    ``run_dir/timeline.json`` (Chrome trace) and ``run_dir/timeline.png``. Returns the JSON path
    on the writing rank, else None."""
    import torch.distributed as dist

    payload = {"rank": timeline.rank, "label": timeline.label, "events": timeline.to_chrome()}
    if dist.is_available() and dist.is_initialized():
        me = dist.get_rank()
        dst = 0 if group is None else dist.get_global_rank(group, 0)
        gathered = [None] * dist.get_world_size(group) if me == dst else None
        dist.gather_object(payload, gathered, dst=dst, group=group)
        if me != dst:
            return None
    else:
        gathered = [payload]
    events = [ev for p in sorted(gathered, key=lambda p: p["rank"]) for ev in p["events"]]
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "timeline.json")
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    if png:
        draw_png(events, os.path.join(run_dir, "timeline.png"))
    return path


_COLORS = {"F": "#f6b26b", "B": "#93c47d", "Bi": "#b6d7a8", "W": "#6fa8dc", "p2p": "#999999", "a2a": "#c27ba0"}


def draw_png(chrome_events: Iterable[dict], path: str, title: str = "pipeline timeline") -> None:
    """Draw the merged trace like the report's DualPipe figure: one band per rank, compute boxes
    labelled with the micro-batch and coloured by kind (F / full B / input-grad B / W), hatched
    for chunk 1 (DualPipe's reverse direction); forward halves of overlapped FB pairs in the upper
    half of the band, everything else in the lower half; communication as thin bars below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    evs = [e for e in chrome_events if e.get("ph") == "X"]
    names = {e["pid"]: e["args"]["name"] for e in chrome_events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    pids = sorted({e["pid"] for e in evs} | set(names))
    if not pids:
        return
    t0 = min((e["ts"] for e in evs), default=0.0)
    t1 = max((e["ts"] + e["dur"] for e in evs), default=1.0)
    span_ms = max((t1 - t0) / 1e3, 1e-6)
    fig, ax = plt.subplots(figsize=(max(10, min(40, 0.25 * len(evs) / max(len(pids), 1))), 1.0 + 1.1 * len(pids)))
    row_of = {pid: i for i, pid in enumerate(pids)}
    for e in evs:
        y0 = len(pids) - 1 - row_of[e["pid"]]
        x, w = (e["ts"] - t0) / 1e3, e["dur"] / 1e3
        cat, tid = e.get("cat", ""), e.get("tid", 0)
        color = _COLORS.get(cat, "#cccccc")
        if cat in ("p2p", "a2a"):
            lane = 0.02 if cat == "p2p" else 0.12
            ax.add_patch(plt.Rectangle((x, y0 + lane), max(w, span_ms * 1e-4), 0.08, color=color, alpha=0.7, lw=0))
            continue
        yb, h = (y0 + 0.6, 0.35) if tid == 1 else (y0 + 0.22, 0.35)
        chunk = e.get("args", {}).get("chunk", 0)
        ax.add_patch(plt.Rectangle((x, yb), w, h, facecolor=color, edgecolor="black", lw=0.4,
                                   hatch="///" if chunk else None))
        mb = e.get("args", {}).get("microbatch")
        if mb is not None and w > span_ms * 0.012:
            ax.text(x + w / 2, yb + h / 2, str(mb), ha="center", va="center", fontsize=6)
    ax.set_xlim(0, span_ms)
    ax.set_ylim(0, len(pids))
    ax.set_yticks([len(pids) - 1 - i + 0.5 for i in range(len(pids))])
    ax.set_yticklabels([names.get(p, f"rank {p}") for p in pids], fontsize=7)
    ax.set_xlabel("ms")
    ax.set_title(title + " (hatched: chunk 1 = DualPipe's reverse direction; upper half-row: forward half of "
                         "an overlapped FB pair; thin bars: p2p / all-to-all)", fontsize=8)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _COLORS.items()], fontsize=6, ncol=6,
              loc="upper right", bbox_to_anchor=(1.0, 1.0 + 0.6 / (1 + len(pids))))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class TimedDispatcher:
    """Wraps an AllToAllDispatcher to record its forward all-to-alls on `timeline` (lane 3);
    the same dispatch → experts → combine as its ``__call__``, with a clock between the phases.
    `where()` returns the (micro-batch, thread lane) of the action that is running."""

    def __init__(self, inner, timeline: "Timeline", where: Callable[[], tuple]):
        self.inner, self.timeline, self.where = inner, timeline, where

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, ids, weights, experts):
        mb, tid = self.where()
        t0 = time.perf_counter()
        d = self.inner.dispatch_async(x, ids, weights, experts).wait()
        t1 = time.perf_counter()
        y = experts(d.x, d.counts)
        t2 = time.perf_counter()
        out = self.inner.combine_async(d, y).wait()
        t3 = time.perf_counter()
        if not in_recompute():
            self.timeline.add(f"dispatch mb{mb}", "a2a", t0, t1, tid=3, microbatch=mb, thread=tid)
            self.timeline.add(f"combine mb{mb}", "a2a", t2, t3, tid=3, microbatch=mb, thread=tid)
        return out
