"""Checkpoints with torch.distributed.checkpoint (DCP), reshardable across layouts.

Every tensor is keyed by its GLOBAL name, and each routed expert gets its own key
("layers.3.ffn.experts.w1.7"), so a checkpoint written under one (pp, dp, ep) loads under any
other: a rank simply asks for the keys it holds. Replicated tensors are de-duplicated by DCP.

A step folder is written as `step_N.tmp/` and renamed to `step_N/` by rank 0 only after every
rank finished and `meta.json` is written: a folder named step_N is complete or absent, and the
name alone is what resume trusts (the rename is the commit). Resume picks the newest one that
loads; a folder that fails to load is reported by name and skipped.

`CheckpointWriter` saves synchronously, or (checkpoint.async_save) with DCP's async_save: the
state is staged to CPU memory on the training thread, written by a background thread over a
dedicated gloo group, and committed (meta.json, rename) when every rank's write is done. At most
one save is in flight; the next save, and the end of the run, wait for it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from model.moe import Experts

log = logging.getLogger(__name__)
# A single-process run saves and loads without a process group, which is what we intend.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    pass


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def tensor_items(named: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Split stacked expert tensors into one view per global expert id."""
    out = {}
    for name, t in named.items():
        mod_name = name.rsplit(".", 1)[0]
        mod = modules.get(mod_name)
        if isinstance(mod, Experts) and t.dim() >= 1 and t.shape[0] == mod.n_local:
            for e in range(mod.n_local):
                out[f"{name}.{mod.first_expert + e}"] = t[e]
        else:
            out[name] = t
    return out


def model_state(model: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    named = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if _persistent(model, n)}}
    return {prefix + k: v for k, v in tensor_items(named, modules).items()}


def _persistent(model: torch.nn.Module, name: str) -> bool:
    mod_name, _, buf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return buf not in mod._non_persistent_buffers_set


def optimizer_state(modules: dict[str, torch.nn.Module], shards, prefix: str = "optim.") -> dict[str, torch.Tensor]:
    """This rank's ZeRO-1 pieces of the optimizer state (parallel/zero.ShardedAdamW.shards()),
    keyed by global parameter name like the weights ("optim.<name>.exp_avg", an expert weight's
    split per expert). A piece that is a whole tensor is saved as one; a partial one (a flat range
    of the tensor) as a ShardedTensor of boxes whose global metadata lists every rank's pieces, so
    DCP reassembles, and any other layout reads, whatever ranges it asks for. `modules`: name →
    module of every module this rank holds (to find the Experts blocks)."""
    out = {}
    for sh in shards:
        shape = tuple(sh.param.shape)
        mod = modules.get(sh.name.rsplit(".", 1)[0])
        if isinstance(mod, Experts) and len(shape) >= 1 and shape[0] == mod.n_local:
            per = _numel(shape[1:])
            keys = [(f"{sh.name}.{mod.first_expert + e}", e * per, shape[1:]) for e in range(mod.n_local)]
        else:
            keys = [(sh.name, 0, shape)]
        out[f"{prefix}{sh.name}.step"] = sh.state["step"]
        for key, base, kshape in keys:
            n = _numel(kshape)
            a, b = max(sh.start, base), min(sh.stop, base + n)
            if a >= b:
                continue
            ranges = [(r, max(s, base) - base, min(e, base + n) - base) for r, s, e in sh.ranges
                      if max(s, base) < min(e, base + n)]
            for kind, flat in sh.state.items():
                if kind != "step":
                    out[f"{prefix}{key}.{kind}"] = _piece(flat[a - sh.start:b - sh.start], a - base, kshape, ranges)
    return out


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def _boxes(a: int, b: int, shape: tuple) -> list[tuple[tuple, tuple]]:
    """The flat range [a, b) of a row-major tensor of `shape` as (offsets, sizes) boxes, each a
    contiguous run of the range, in order: partial first row, whole rows, partial last row."""
    if not shape:
        return [((), ())] if b > a else []
    inner = _numel(shape[1:])
    out = []
    if a % inner and a < b:  # a partial first row
        row = a // inner
        end = min(b, (row + 1) * inner)
        out += [((row,) + o, (1,) + s) for o, s in _boxes(a - row * inner, end - row * inner, shape[1:])]
        a = end
    if b // inner > a // inner and a < b:  # whole rows
        out.append(((a // inner,) + (0,) * (len(shape) - 1), (b // inner - a // inner,) + tuple(shape[1:])))
        a = b // inner * inner
    if a < b:  # a partial last row
        row = a // inner
        out += [((row,) + o, (1,) + s) for o, s in _boxes(a - row * inner, b - row * inner, shape[1:])]
    return out


def _piece(flat: torch.Tensor, start: int, shape: tuple, ranges) -> torch.Tensor:
    """`flat` holds elements [start, start + len) of a tensor of `shape`; `ranges`: (global rank,
    start, stop) of every rank's piece of it."""
    if start == 0 and flat.numel() == _numel(shape):
        return flat.view(shape)
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
    from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    dev = flat.device
    where = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index}"
    me = dist.get_rank() if _dist() else 0
    global_md, local = [], []
    for rank, a, b in ranges:
        for offs, sizes in _boxes(a, b, tuple(shape)):
            md = ShardMetadata(shard_offsets=list(offs), shard_sizes=list(sizes), placement=f"rank:{rank}/{where}")
            global_md.append(md)
            if rank == me:
                lo = _flat_index(offs, shape) - start
                local.append(Shard(tensor=flat[lo:lo + _numel(sizes)].view(sizes), metadata=md))
    meta = ShardedTensorMetadata(shards_metadata=global_md, size=torch.Size(shape),
                                 tensor_properties=TensorProperties(dtype=flat.dtype))
    st = ShardedTensorBase._init_from_local_shards_and_global_metadata(local, meta)
    assert isinstance(st, ShardedTensor)
    return st


def _flat_index(offsets, shape) -> int:
    idx = 0
    for o, n in zip(offsets, shape):
        idx = idx * int(n) + int(o)
    return idx


def list_complete(ckpt_root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for d in os.listdir(ckpt_root):
        m = re.fullmatch(r"step_(\d+)", d)
        if m and os.path.isdir(os.path.join(ckpt_root, d)):
            found.append((int(m.group(1)), os.path.join(ckpt_root, d)))
    return sorted(found)


def _paths(ckpt_root: str, step: int) -> tuple[str, str]:
    final = os.path.join(ckpt_root, f"step_{step}")
    return final, final + ".tmp"


def _prepare(tmp: str, rank: int) -> None:
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier()


def _commit(ckpt_root: str, step: int, meta: dict, keep: int) -> str:
    """Rank 0, once every rank's write is done: meta.json, then the rename that makes step_N exist."""
    final, tmp = _paths(ckpt_root, step)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, **meta}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in list_complete(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save(ckpt_root: str, step: int, state: dict[str, torch.Tensor], meta: dict, keep: int, rank: int,
         after_write: Optional[Callable[[], None]] = None) -> str:
    """Synchronous save. `after_write` runs on this rank between its write and the commit
    (fault injection: debug.faults)."""
    final, tmp = _paths(ckpt_root, step)
    _prepare(tmp, rank)
    dcp.save(state, checkpoint_id=tmp)
    if after_write is not None:
        after_write()
    _barrier()
    if rank == 0:
        _commit(ckpt_root, step, meta, keep)
    _barrier()
    return final


class CheckpointWriter:
    """The run's checkpoint saves, synchronous or asynchronous; `save` returns the seconds the
    training loop was blocked (the whole save, or waiting for the previous one plus staging)."""

    def __init__(self, ckpt_root: str, keep: int, rank: int, async_save: bool = False, group=None):
        self.root, self.keep, self.rank, self.async_save, self.group = ckpt_root, keep, rank, async_save, group
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt") if async_save else None
        self._pending: Optional[Future] = None

    def save(self, step: int, state: dict[str, torch.Tensor], meta: dict,
             after_write: Optional[Callable[[], None]] = None) -> float:
        t0 = time.perf_counter()
        if not self.async_save:
            save(self.root, step, state, meta, self.keep, self.rank, after_write)
            return time.perf_counter() - t0
        self.wait()
        _, tmp = _paths(self.root, step)
        _prepare(tmp, self.rank)
        # Staging (a CPU copy of every tensor) happens here, on the training thread: the
        # training may change the live tensors as soon as this returns.
        written = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group)
        self._pending = self._pool.submit(self._finish, written, step, meta, after_write)
        return time.perf_counter() - t0

    def _finish(self, written: Future, step: int, meta: dict, after_write) -> None:
        written.result()
        if after_write is not None:
            after_write()
        if self.group is not None:  # every rank's data is on disk before rank 0 commits
            dist.barrier(group=self.group)
        if self.rank == 0:
            _commit(self.root, step, meta, self.keep)
        if self.group is not None:  # step_N exists for every rank once wait() returns
            dist.barrier(group=self.group)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


def load_newest(ckpt_root: str, state_fn: Callable[[], dict[str, torch.Tensor]], explicit: Optional[str] = None):
    """Load the newest complete checkpoint (or `explicit`) into the tensors of state_fn().

    Returns its meta dict, or None when there is nothing to resume. A folder that fails to load
    (truncated, corrupted) is named in a warning and the next older one is tried; every rank
    takes the same decision because each one's failure is agreed on with an all-reduce.
    """
    candidates = [(0, explicit)] if explicit else list(reversed(list_complete(ckpt_root)))
    for _, path in candidates:
        ok, err = True, ""
        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
            dcp.load(state_fn(), checkpoint_id=path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure: folder unusable
            # (DCP's CheckpointException derives from BaseException, not Exception)
            ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if _dist():
            flag = torch.tensor([0.0 if ok else 1.0])
            dist.all_reduce(flag)
            ok = ok and flag.item() == 0
        if ok:
            return meta
        if explicit:
            raise CheckpointError(f"checkpoint.resume: cannot load {path}: {err or 'failed on another rank'}")
        log.warning("checkpoint %s is unusable (%s); trying an older one", path, err or "failed on another rank")
        print(f"warning: checkpoint {path} is unusable ({err or 'failed on another rank'}); trying an older one",
              flush=True)
    return None
