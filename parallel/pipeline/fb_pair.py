"""FB actions: the forward of one micro-batch and the backward of another, overlapped.

On CPU the forward half runs in a second thread while the main thread runs the backward half, so
the interleaving is at op granularity (finer than the paper's attention / dispatch / MLP /
combine chunks): whenever one half blocks — in an expert-parallel all-to-all (gloo runs it on its
own threads, GIL released), in a p2p wait, or simply waiting for its input — the other one
computes, and the forward's output send is posted the moment it is ready, during the backward.
The two halves always touch different chunks; with ep > 1 each chunk must own its EP process
group (``stages.shard_stage_experts`` / ``stages.stage_dispatchers`` do this) so the two threads'
all-to-alls never interleave on one group. What this does NOT buy on a CPU box: two compute-bound
halves on a one-thread-per-process budget just share the cores (no speed-up unless one of them
waits). On CUDA the halves run back to back on one stream (overlap="auto"); NCCL p2p still runs
on its own stream, but stream-level overlap of the all-to-all with the other half's kernels is
not implemented.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from .schedule import Action

OVERLAPS = ("auto", "thread", "none")


class RunningAction(threading.local):
    """The (micro-batch, thread lane) of the action running in the calling thread: lane 0 is the
    main thread, lane 1 an FB pair's forward thread (the timed all-to-all's label)."""

    mb: Optional[int] = None
    tid: int = 0


class FBPairs:
    """Runs FB actions: threaded (overlap="thread", or "auto" off CUDA) or one half after the other.

    ``run(action, lane)`` is the runtime's executor of a single F / B / W action."""

    def __init__(self, modules: Sequence, overlap: str, device_type: str):
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap: expected auto|thread|none, got {overlap!r}")
        self.threaded = overlap == "thread" or (overlap == "auto" and device_type != "cuda")
        if self.threaded:
            check_ep_groups(modules)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fb-forward") if self.threaded else None

    def run(self, act: Action, run: Callable[[Action, int], None]) -> None:
        f, b = act.forward, act.backward
        if self._pool is None or f.chunk == b.chunk:
            run(f, 0)
            run(b, 0)
            return
        fut = self._pool.submit(run, f, 1)
        try:
            run(b, 0)
        finally:
            fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def check_ep_groups(modules: Sequence) -> None:
    """Threaded FB pairs run all-to-alls of two chunks at once: they need distinct groups."""
    seen: dict[int, int] = {}
    for c, m in enumerate(modules):
        for moe in m.moe_layers().values():
            d = moe.dispatcher
            group, ep = getattr(d, "group", None), getattr(d, "ep", 1)
            if group is None or ep <= 1:
                continue
            if seen.setdefault(id(group), c) != c:
                raise ValueError("PipelineEngine(overlap='thread'): chunks "
                                 f"{seen[id(group)]} and {c} share one expert-parallel process group; "
                                 "shard with parallel.pipeline.stages.shard_stage_experts (one EP group "
                                 "per chunk) or use overlap='none'")
