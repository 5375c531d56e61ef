"""Gradient reduction over the layout, then the global gradient norm and clipping.

Reduction (before the optimizer step): `sum_over_stage_pair` adds the gradients of parameters
that both ranks of a pipeline stage pair hold (DualPipe's two stage copies, 1F1B's tied
embedding); then the data-parallel reduction turns every gradient into the gradient of the
GLOBAL batch-mean loss over DP (non-expert) and expert-DP (expert) replicas, in one of two ways
(`parallel.grad_reduce`):
- `allreduce_gradients`: every rank gets the whole reduced gradient (gloo's default: its
  reduce-scatter is no cheaper, and the fp32 numerics of every run stay those of earlier runs);
- `reduce_scatter_gradients` (auto on NCCL, with ZeRO-1): every rank gets only the range of the
  reduced gradient its ZeRO-1 optimizer updates (parallel/partition.zero_partition), as Megatron's
  distributed optimizer does; with the parameter all-gather after the step that is the bytes of
  ONE all-reduce instead of an all-reduce plus an all-gather. The rest of each gradient is zeroed
  (never stale): readers that walk whole gradients (norm, clipping, the non-finite check) then see
  every element of the global gradient exactly once over the DP group.

Norm: each gradient element must be counted exactly once in the norm, whatever the layout. After
an all-reduce, non-expert gradients are replicated over DP (count on one copy: they are identical),
expert gradients are distinct over EP and replicated over expert-DP, stages are distinct over PP:
so Σ expert² is summed over the EP group, then everything over the PP group. After a
reduce-scatter every element lives on one rank of its DP group: everything is summed over DP, then
PP.

`grad_of(p)` is the only way code reads a gradient: a BF16 parameter's gradient is the fp32
`main_grad` that model.mixed.weight accumulates (it never has a `.grad`), an FP32 parameter's is
its `.grad`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from model.mixed import MAIN_GRAD, is_low_precision
from model.naming import is_expert_param
from parallel.partition import offsets_of, pieces_between, shard_range

GRAD_REDUCE = ("auto", "all_reduce", "reduce_scatter")
# torch 2.13 renamed reduce_scatter_tensor (deprecated there) to reduce_scatter_single
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient of parameter `p` (None before any backward reached it): the fp32 main_grad of
    a low-precision parameter, else `.grad`."""
    return getattr(p, MAIN_GRAD, None) if is_low_precision(p) else p.grad


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """`grad_of(p)`, materialised as zeros of the gradient's dtype when missing (a shard that
    received no token, an unused parameter) so that every rank reduces the same buckets."""
    g = grad_of(p)
    if g is None:
        g = torch.zeros(p.shape, dtype=grad_dtype(p), device=p.device)
        if is_low_precision(p):
            setattr(p, MAIN_GRAD, g)
        else:
            p.grad = g
    return g


def clear_grad(p: torch.Tensor) -> None:
    """Drop `p`'s gradient (zero_grad(set_to_none=True))."""
    p.grad = None
    if hasattr(p, MAIN_GRAD):
        setattr(p, MAIN_GRAD, None)


def grad_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype gradients of `p` accumulate in: fp32 for a BF16 parameter, its own otherwise."""
    return torch.float32 if is_low_precision(p) else p.dtype


def grad_nbytes(params) -> int:
    """Bytes of the gradients of `params` once materialised (4 per element under mixed precision)."""
    return int(sum(p.numel() * torch.empty((), dtype=grad_dtype(p)).element_size() for p in params))


def group_size(group: Any) -> int:
    """Ranks in `group` (1 for None: a single process or an unsplit dimension)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _all_reduce_flat(tensors: list[torch.Tensor], group: Any) -> int:
    """In-place SUM all-reduce of `tensors` as ONE flat buffer (one collective); returns its bytes."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
    return flat.numel() * flat.element_size()


def _coalesced_all_reduce(tensors: list[torch.Tensor], group: Any, bucket_elems: int) -> None:
    """In-place SUM all-reduce of `tensors` over `group`, flattened into buckets per dtype/device."""
    if group_size(group) == 1 or not tensors:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, t in enumerate(ts):
            bucket.append(t)
            size += t.numel()
            if size >= bucket_elems or i == len(ts) - 1:
                _all_reduce_flat(bucket, group)
                bucket, size = [], 0


def _named_params(model: Union[nn.Module, Iterable[nn.Module]]) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, is_expert) for every trainable parameter, sorted by name (so ranks holding
    the same chunks in a different order still reduce matching tensors)."""
    mods = [model] if isinstance(model, nn.Module) else list(model)
    seen: set[int] = set()
    out = []
    for m in mods:
        for name, p in m.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p, is_expert_param(name)))
    return sorted(out, key=lambda t: t[0])


@torch.no_grad()
def allreduce_gradients(model: Union[nn.Module, Iterable[nn.Module]], topo: Any, *,
                        bucket_mb: float = 25.0) -> None:
    """Make every gradient the gradient of the GLOBAL batch-mean loss, given that each DP rank
    back-propagated the mean loss of its own (equal-sized) local batch.

    Non-expert grads: mean over the DP group (Σ_dp / dp). Expert grads: an expert shard's grad
    already sums, through the all-to-all backward, the contributions of the tokens of every rank
    of its EP group (each ∂L_r/∂W with L_r that rank's local mean); summing over the expert-DP
    replicas then covers all dp ranks once, so: Σ_edp / dp.
    Missing grads (a shard that received no token, an unused parameter) are materialised as
    zeros so every rank all-reduces the same buckets. Stage-pair sums (`sum_over_stage_pair`) come
    first, inside the pipeline step.
    """
    params = _named_params(model)
    grads = [grad_or_zeros(p) for _, p, _ in params]
    bucket_elems = max(1, int(bucket_mb * 2**20 / 4))
    dense = [g for g, (_, _, is_exp) in zip(grads, params) if not is_exp]
    expert = [g for g, (_, _, is_exp) in zip(grads, params) if is_exp]
    scale = 1.0 / topo.dp
    for g in dense + expert:
        g.mul_(scale)
    _coalesced_all_reduce(dense, topo.dp_group, bucket_elems)
    _coalesced_all_reduce(expert, topo.edp_group, bucket_elems)


def resolve_grad_reduce(choice: str, backend: str, zero: bool) -> str:
    """`parallel.grad_reduce` → all_reduce | reduce_scatter. auto = reduce_scatter on NCCL with
    ZeRO-1, else all_reduce (gloo; and without ZeRO-1 every rank updates whole parameters)."""
    if choice not in GRAD_REDUCE:
        raise ValueError(f"parallel.grad_reduce: expected {'|'.join(GRAD_REDUCE)}, got {choice!r}")
    if choice == "auto":
        return "reduce_scatter" if backend == "nccl" and zero else "all_reduce"
    if choice == "reduce_scatter" and not zero:
        raise ValueError("parallel.grad_reduce: reduce_scatter needs ZeRO-1 (parallel.zero=true): without it "
                         "every rank updates whole parameters and needs whole gradients (use all_reduce)")
    return choice


@torch.no_grad()
def reduce_scatter_gradients(parts: list[tuple[list[nn.Parameter], Any]], topo: Any, *,
                             bucket_mb: float = 25.0) -> None:
    """`allreduce_gradients`' result, but each rank keeps only the range of every gradient that
    its ZeRO-1 optimizer updates; the rest is zeroed.

    parts: (parameters in optimizer order, the group their optimizer state is sharded over, or None
    when it is not replicated) per ZeRO-1 part, from ShardedAdamW.zero_parts(): the cut is
    parallel/partition.zero_partition's, the optimizer's own. Scaling as in allreduce_gradients
    (both parts by 1/dp; expert-DP × EP covers the DP group)."""
    bucket_elems = max(1, int(bucket_mb * 2**20 / 4))
    for params, group in parts:
        grads = [grad_or_zeros(p) for p in params]
        for g in grads:
            g.mul_(1.0 / topo.dp)
        if grads and group_size(group) > 1:
            _reduce_scatter_flat(grads, group, bucket_elems)


def _reduce_scatter_flat(grads: list[torch.Tensor], group: Any, bucket_elems: int) -> None:
    """SUM over `group` of `grads` laid end to end and cut into the group's contiguous ranges
    (partition.shard_range, as zero_partition cuts them): afterwards this rank's range holds the
    sum and every other element of `grads` is zero. Bucket k carries the k-th `chunk` elements of
    every rank's range (zero-padded where a range is shorter), so each rank receives a contiguous
    piece and no gradient-sized flat copy is ever made."""
    size, me = group_size(group), dist.get_rank(group)
    flats = [g.view(-1) for g in grads]
    offsets = offsets_of(f.numel() for f in flats)
    ranges = [shard_range(offsets[-1], size, r) for r in range(size)]
    width = max(hi - lo for lo, hi in ranges)
    chunk = max(1, min(width, bucket_elems // size))
    dtype = functools.reduce(torch.promote_types, (f.dtype for f in flats))
    for k in range(0, width, chunk):
        send = torch.zeros(size, chunk, dtype=dtype, device=flats[0].device)
        for r, (lo, hi) in enumerate(ranges):
            pos = 0
            for i, a, b in pieces_between(offsets, lo + k, min(hi, lo + k + chunk)):
                send[r, pos:pos + b - a].copy_(flats[i][a:b])
                pos += b - a
        recv = torch.empty(chunk, dtype=dtype, device=send.device)
        _REDUCE_SCATTER(recv, send.view(-1), group=group)
        lo, hi = ranges[me]  # only this rank's range is written: later buckets read other elements
        pos = 0
        for i, a, b in pieces_between(offsets, lo + k, min(hi, lo + k + chunk)):
            flats[i][a:b].copy_(recv[pos:pos + b - a])
            pos += b - a
    lo, hi = ranges[me]
    for i, a, b in pieces_between(offsets, 0, lo) + pieces_between(offsets, hi, offsets[-1]):
        flats[i][a:b].zero_()


@torch.no_grad()
def sum_over_stage_pair(params: list[nn.Parameter], group: Any) -> int:
    """SUM the gradients of `params` (held by both ranks of a pipeline stage pair, in the same
    order on both) over `group`, in one collective; missing grads become zeros first. Returns the
    bytes all-reduced."""
    return _all_reduce_flat([grad_or_zeros(p) for p in params], group)


def global_grad_norm(named_params, ep_group=None, pp_group=None, dp_group=None) -> float:
    """L2 norm of the global gradient, each element counted once (see the module docstring).
    dp_group: given after `reduce_scatter_gradients` (every element on one rank of it, zeros
    elsewhere): then everything is summed over it instead of the experts over EP."""
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for name, p in named_params:
        g = grad_of(p)
        if g is None:
            continue
        sq = g.detach().double().pow(2).sum().cpu()
        if is_expert_param(name):
            expert += sq
        else:
            dense += sq
    if dp_group is not None:
        total = dense + expert
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(total, group=dp_group)
    else:
        if ep_group is not None and dist.get_world_size(ep_group) > 1:
            dist.all_reduce(expert, group=ep_group)
        total = dense + expert
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return math.sqrt(total.item())


def clip_grads_(params, norm: float, max_norm: float) -> None:
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            g = grad_of(p)
            if g is not None:
                g.mul_(coef)


def count_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def optimizer_state_bytes(optimizer: Optional[torch.optim.Optimizer]) -> int:
    if optimizer is None:
        return 0
    return count_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
