"""Run a function in N local processes joined by a process group (for tests and benchmarks).

    from parallel.testing import run_distributed
    results = run_distributed(fn, 4, arg1, arg2, timeout=120)   # fn(rank, world_size, arg1, arg2)

Each process is spawned fresh (no fork of a parent that already started torch threads), gets a
free TCP port, one intra-op thread (OMP_NUM_THREADS=1: the test machines are small and shared),
and calls ``torch.distributed.init_process_group`` (gloo by default) with the same timeout, so a
hung collective raises in the child instead of blocking forever. ``fn`` must be importable by
name (a module-level function). Its return value travels back through ``torch.save`` bytes, so
tensors are fine. If any rank raises, the others are stopped and a ``DistributedTestError``
carries that rank's traceback; if the deadline passes, every process is killed and
``DistributedTestTimeout`` names the ranks that had not finished.
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank raised; the message holds its traceback."""


class DistributedTestTimeout(TimeoutError):
    """Some ranks did not finish before the deadline (a hang, usually a collective mismatch)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, backend, timeout, threads, env, args, kwargs, out_q):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": str(threads),
    })
    os.environ.update(env or {})
    dist = None
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        result = fn(rank, world_size, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put(("ok", rank, buf.getvalue(), time.time()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        # report BEFORE tearing the group down: peers then fail with "connection closed", and the
        # parent must see this (the root cause) first
        out_q.put(("err", rank, traceback.format_exc(), time.time()))
    finally:
        if dist is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after an error must not hide it
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    threads: int = 1,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` processes; return the
    per-rank results (index = rank). Raises DistributedTestError / DistributedTestTimeout."""
    import torch

    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, name=f"rank{r}", daemon=True,
                    args=(fn, r, world_size, port, backend, timeout, threads, env, args, kwargs, out_q))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    errors: list[tuple[float, int, str]] = []
    error: str | None = None
    finished = False
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise DistributedTestTimeout(
                    f"{getattr(fn, '__name__', fn)}: ranks {missing} did not finish within {timeout:.0f} s")
            try:
                status, rank, payload, stamp = out_q.get(timeout=min(remaining, 0.5))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    # give a dying rank's error message a moment to arrive before reporting
                    try:
                        status, rank, payload, stamp = out_q.get(timeout=2.0)
                    except queue_mod.Empty:
                        raise DistributedTestError(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} and no message") from None
                else:
                    continue
            if status == "err":
                errors.append((stamp, rank, payload))
                # other ranks usually fail in turn (their peer left): collect them briefly and
                # report the earliest failure, the likely root cause
                grace = time.monotonic() + 2.0
                while time.monotonic() < grace:
                    try:
                        st2, r2, p2, s2 = out_q.get(timeout=max(0.0, grace - time.monotonic()))
                    except queue_mod.Empty:
                        break
                    if st2 == "err":
                        errors.append((s2, r2, p2))
                errors.sort()
                _, rank, payload = errors[0]
                others = [r for _, r, _ in errors[1:]]
                error = f"rank {rank} of {world_size} failed:\n{payload}"
                if others:
                    error += f"\n(ranks {others} failed afterwards)"
                break
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        if error is not None:
            raise DistributedTestError(error)
        finished = True
    finally:
        for p in procs:
            p.join(timeout=5 if finished else 0.2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        out_q.close()
    return [results[r] for r in range(world_size)]
