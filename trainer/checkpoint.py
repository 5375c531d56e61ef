"""Checkpoints with torch.distributed.checkpoint (DCP), reshardable across layouts.

Every tensor is keyed by its GLOBAL name, and each routed expert gets its own key
("layers.3.ffn.experts.w1.7"), so a checkpoint written under one (pp, dp, ep) loads under any
other: a rank simply asks for the keys it holds. Replicated tensors are de-duplicated by DCP.

A step folder is written as `step_N.tmp/` and renamed to `step_N/` by rank 0 only after every
rank finished and `meta.json` is written: a folder named step_N is complete or absent. Resume
picks the newest one that loads; a folder that fails to load is reported by name and skipped.

meta.json also records what the tensors belong to: the model config, the parameter inventory
(global name → shape) and the data fingerprint (tokenizer, token count, sample-order seed). A
resume compares them with this run before loading anything and refuses a mismatch with one line
naming the first differing key or tensor; it never silently starts over. Each run has a lineage
id, inherited on resume; `keep` prunes only checkpoints of its own lineage.

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
from torch.distributed.checkpoint.staging import AsyncStager
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
    # ShardedTensor's own constructor (not ShardedTensorBase's) binds the default process group,
    # which DCP's load planner needs to answer .size() of a ShardedTensor; no collective runs
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)


def staged_copy(state: dict) -> dict:
    """A CPU copy of a checkpoint state dict, for an asynchronous save: the training may change the
    live tensors as soon as the save is issued. DCP's own stager deep-copies through torch
    functions that a ShardedTensor (our partial ZeRO-1 pieces) does not implement (data_ptr), so
    the pieces are rebuilt here from copies of their local shards, placed on the CPU."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata

    def on_cpu(md: ShardMetadata) -> ShardMetadata:
        return ShardMetadata(shard_offsets=list(md.shard_offsets), shard_sizes=list(md.shard_sizes),
                             placement=f"rank:{md.placement.rank()}/cpu")

    out = {}
    for key, v in state.items():
        if isinstance(v, ShardedTensor):
            meta = v.metadata()
            local = [Shard(tensor=sh.tensor.detach().to("cpu", copy=True), metadata=on_cpu(sh.metadata))
                     for sh in v.local_shards()]
            out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(local, ShardedTensorMetadata(
                shards_metadata=[on_cpu(md) for md in meta.shards_metadata], size=meta.size,
                tensor_properties=meta.tensor_properties))
        else:
            out[key] = v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
    return out


class _AlreadyStaged(AsyncStager):
    """Hands DCP's async_save a state dict that staged_copy has already copied."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


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


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def inventory(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Global tensor name → shape (what a checkpoint's model part holds)."""
    return {k: list(v.shape) for k, v in state.items()}


def _first_difference(saved: dict, current: dict, prefix: str = "") -> Optional[str]:
    for key in list(saved) + [k for k in current if k not in saved]:
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            return f"{prefix}{key}: saved {a}, this run {b}"
    return None


def weight_storage(param_dtype: torch.dtype) -> str:
    """meta.json's weights.storage: how the weights (and masters) of a checkpoint are stored."""
    if param_dtype == torch.float32:
        return "fp32 weights (no master copies)"
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(param_dtype, str(param_dtype))
    return f"{short} weights + fp32 master ranges"


def incompatibility(meta: dict, expected: dict) -> Optional[str]:
    """What differs between a checkpoint's meta.json and this run (expected: the same "model",
    "params", "weights", "data" entries a save would write; without "data" the data is not
    compared), or None. Entries an older checkpoint lacks are not compared (its DCP load errors
    are translated instead: an FP32 checkpoint without "weights" into a BF16 run names the first
    missing master, "tensor optim.<name>.master: absent from the checkpoint")."""
    if "model" in meta:
        diff = _first_difference(meta["model"], expected["model"], "model.")
        if diff:
            return diff
    if "weights" in meta and "weights" in expected:
        diff = _first_difference(meta["weights"], expected["weights"], "weights.")
        if diff:
            return diff + " (precision fp32 and bf16/fp8 checkpoints do not convert; resume with the saved precision)"
    if "params" in meta:
        saved, cur = meta["params"], expected["params"]
        for name in list(saved) + [n for n in cur if n not in saved]:
            if saved.get(name) != cur.get(name):
                a = tuple(saved[name]) if name in saved else "absent"
                b = tuple(cur[name]) if name in cur else "absent"
                return f"tensor {name}: saved shape {a}, expected {b}"
    if "data" in meta and "data" in expected:  # left out of `expected` by checkpoint.allow_data_change
        return _first_difference(meta["data"], expected["data"])
    return None


def load_error(e: BaseException) -> str:
    """One line for a failed load: DCP's CheckpointException names only the failing ranks; the
    first rank's own exception names the tensor (missing key, size mismatch)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))
        e = e[0] if isinstance(e, tuple) else e  # (exception, traceback summary)
    text = str(e)
    m = re.search(r"Size mismatch between saved torch\.Size\((\[.*?\])\) and current: torch\.Size\((\[.*?\])\) "
                  r"for (\S+)", text)
    if m:
        return f"tensor {m.group(3)}: saved shape {tuple(json.loads(m.group(1)))}, expected {tuple(json.loads(m.group(2)))}"
    m = re.search(r"Missing key in checkpoint state_dict: (\S+?)\.?$", text.strip().splitlines()[0] if text.strip() else "")
    if m:
        return f"tensor {m.group(1)}: absent from the checkpoint"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def lineage_of(path: str) -> Optional[str]:
    try:
        return read_meta(path).get("lineage")
    except (OSError, ValueError):
        return None


RUN_FILES = ("checkpoints", "metrics.jsonl", "rank_bytes.json", "config.yaml", "timeline.json", "timeline.png")


def move_aside(run_dir: str) -> str:
    """Move a previous run's checkpoints and metrics into run_dir/replaced_<n>/ (nothing is deleted)."""
    n = 0
    while os.path.exists(os.path.join(run_dir, f"replaced_{n}")):
        n += 1
    dst = os.path.join(run_dir, f"replaced_{n}")
    os.makedirs(dst)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(run_dir, name)):
            os.replace(os.path.join(run_dir, name), os.path.join(dst, name))
    return dst


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
    ours = [p for _, p in list_complete(ckpt_root) if lineage_of(p) == meta.get("lineage")]
    for old in ours[:-keep] if keep > 0 else []:  # never another run's checkpoints
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
        written = dcp.async_save(staged_copy(state), checkpoint_id=tmp, process_group=self.group,
                                 async_stager=_AlreadyStaged())
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


def load_newest(ckpt_root: str, state_fn: Callable[[], dict[str, torch.Tensor]], explicit: Optional[str] = None,
                expected: Optional[dict] = None):
    """Load the newest complete checkpoint (or `explicit`) into the tensors of state_fn().

    Returns (meta, path of the folder loaded), or None when there is nothing to resume. A folder
    that does not belong to this run (see `incompatibility`) is refused with CheckpointError. A
    folder that fails to load (truncated, corrupted) is named in a warning and the next older one
    is tried; every rank takes the same decision because each one's failure is agreed on with an
    all-reduce. When every folder fails, CheckpointError: nothing is started over in place.
    """
    candidates = [(0, explicit)] if explicit else list(reversed(list_complete(ckpt_root)))
    errors = []
    for _, path in candidates:
        ok, err = True, ""
        try:
            meta = read_meta(path)
        except (OSError, ValueError) as e:
            meta, ok, err = {}, False, f"meta.json: {type(e).__name__}: {e}"
        problem = incompatibility(meta, expected) if (ok and expected is not None) else None
        if problem:
            raise CheckpointError(f"checkpoint.resume: {path} is not this run's checkpoint: {problem}")
        if ok:
            try:
                dcp.load(state_fn(), checkpoint_id=path)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure: folder unusable
                # (DCP's CheckpointException derives from BaseException, not Exception)
                ok, err = False, load_error(e)
        if _dist():
            flag = torch.tensor([0.0 if ok else 1.0])
            dist.all_reduce(flag)
            ok = ok and flag.item() == 0
        if ok:
            return meta, path
        err = err or "failed on another rank"
        if explicit:
            raise CheckpointError(f"checkpoint.resume: cannot load {path}: {err}")
        errors.append(f"{path}: {err}")
        log.warning("checkpoint %s is unusable (%s); trying an older one", path, err)
        print(f"warning: checkpoint {path} is unusable ({err}); trying an older one", flush=True)
    if errors:
        raise CheckpointError(f"checkpoint.resume: no checkpoint in {ckpt_root} loads (newest: {errors[0]}); "
                              "resume from a step folder with checkpoint.resume=<path>, or start over with "
                              "checkpoint.resume=none checkpoint.overwrite=true")
    return None
