"""Token dispatch for the MoE layer: LocalDispatcher (1 process) and AllToAllDispatcher (EP).

`model/moe.py` owns the Dispatcher protocol, `LocalDispatcher`, `permute_by_expert` and
`combine_topk`, so that model/ needs nothing from parallel/ (dependencies point one way:
parallel → model). Dispatcher and LocalDispatcher are re-exported here because this is where the
dispatchers live in the design map. `AllToAllDispatcher` reuses the same permutation and
combine_topk, so both dispatchers sum each token's k expert outputs in the same order.

Expert-parallel dispatch (dropless, uneven all-to-all), per MoE call on every EP rank::

    permute_by_expert(ids)            rows sorted by global expert → per-destination slices contiguous
    all_to_all_single(counts)         per-expert counts → send/recv splits, received per-local-expert counts
    all_to_all_single(x, splits)      dispatch: received rows grouped by (source rank, local expert)
    regroup by local expert           second (stable) permutation → experts(x_local, counts_local)
    undo regroup, all_to_all_single   combine: outputs go back along the reverse splits
    combine_topk                      un-permute and Σ_k gate · expert output

Autograd flows through both all-to-alls (`_AllToAll`: the backward is the reverse
all_to_all_single). `dispatch_async` / `combine_async` return handles with `.wait()` so a
pipeline schedule can overlap the exchange with other compute; `__call__` is their composition.

Every rank of the EP group must call the dispatcher the same number of times in the same order
(forward, and backward through the all-to-alls), even with zero tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from model.moe import (Dispatcher, Experts, LocalDispatcher, MoE, combine_topk, in_recompute,
                       inverse_permutation, permute_by_expert)
from parallel.grads import group_size

__all__ = [
    "AllToAllDispatcher", "Dispatcher", "LocalDispatcher", "DispatchHandle", "CombineHandle", "Dispatched",
    "shard_experts", "apply_expert_parallel", "global_expert_load",
]

STAT_KEYS = ("a2a_bytes_intra_node", "a2a_bytes_inter_node", "a2a_bytes_inter_node_two_hop",
             "a2a_bytes_inter_node_flat_own", "a2a_rows_sent", "a2a_calls", "a2a_seconds")


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single along dim 0; backward is the reverse exchange.

    With `works` (a list) the forward is issued with async_op=True and its Work appended: the
    returned tensor is valid only after `works[-1].wait()`. The backward is synchronous.
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, works):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group,
                                      async_op=works is not None)
        if works is not None:
            works.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None, None


@dataclass
class Dispatched:
    """Tokens received by this rank, grouped by local expert: run `experts(x, counts)` on them."""

    x: torch.Tensor  # [M, dim] rows grouped by local expert
    counts: list[int]  # rows per local expert
    # bookkeeping for combine
    inv_order: torch.Tensor  # inverse of permute_by_expert's order
    weights: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    regroup: Optional[torch.Tensor]  # received rows → grouped by local expert (None = identity)
    ungroup: Optional[torch.Tensor]  # its inverse
    t_issue: float = 0.0


class DispatchHandle:
    def __init__(self, dispatcher: "AllToAllDispatcher", work, x_recv: torch.Tensor, state: Dispatched):
        self._dispatcher, self._work, self._x_recv, self._state = dispatcher, work, x_recv, state

    def wait(self) -> Dispatched:
        if self._work is not None:
            self._work.wait()
            self._work = None
        s = self._state
        s.x = self._x_recv if s.regroup is None else self._x_recv.index_select(0, s.regroup)
        self._dispatcher._add_time(time.perf_counter() - s.t_issue)
        return s


class CombineHandle:
    def __init__(self, dispatcher: "AllToAllDispatcher", work, y_sorted: torch.Tensor, state: Dispatched, t0: float):
        self._dispatcher, self._work, self._y, self._state, self._t0 = dispatcher, work, y_sorted, state, t0

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        self._dispatcher._add_time(time.perf_counter() - self._t0)
        return combine_topk(self._y, self._state.inv_order, self._state.weights)


class AllToAllDispatcher:
    """Expert-parallel dispatcher: sends each (token, expert) row to the EP rank owning the expert.

    ep_group: the EP process group (None or size 1 → no communication, same arithmetic).
    n_experts: routed experts in total; rank i owns experts [i·n_local, (i+1)·n_local).
    gpus_per_node: a node is that many consecutive EP ranks (for the byte accounting).

    `stats` (read and reset per step by the trainer via `reset_stats()`), forward only — the
    backward moves the same bytes again in the opposite direction:
      a2a_bytes_intra_node / a2a_bytes_inter_node: bytes this rank SENT (dispatch + combine) to
        EP ranks on its own node (self included) / on other nodes; their sum is all bytes sent.
      a2a_bytes_inter_node_flat_own / a2a_bytes_inter_node_two_hop: inter-node bytes caused by
        THIS rank's tokens (dispatch out + combine back) under the flat scheme (one row per
        remote (token, expert)) vs a two-hop scheme (one row per remote (token, node), fanned out
        inside the node). Summed over the EP group, flat_own equals the summed inter-node bytes.
      a2a_rows_sent, a2a_calls, a2a_seconds (host wall time from issue to wait; on CUDA only
        meaningful with synchronous calls).
    """

    def __init__(self, ep_group: Any, n_experts: int, gpus_per_node: int = 8):
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if n_experts % self.ep:
            raise ValueError(f"model.n_routed_experts={n_experts} not divisible by parallel.ep={self.ep}")
        self.n_experts, self.n_local = n_experts, n_experts // self.ep
        self.gpus_per_node = gpus_per_node
        self.node = self.ep_rank // gpus_per_node
        self.n_nodes = -(-self.ep // gpus_per_node)
        self.stats: dict[str, float] = {}
        self.reset_stats()

    # ----- stats -----
    def reset_stats(self) -> dict[str, float]:
        """Return the accumulated stats and zero them."""
        old = dict(self.stats)
        self.stats = {k: 0 for k in STAT_KEYS}
        self.stats["a2a_seconds"] = 0.0
        return old

    def _add_time(self, dt: float) -> None:
        if not in_recompute():
            self.stats["a2a_seconds"] += dt

    def _record(self, ids: torch.Tensor, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        if in_recompute():
            return
        st = self.stats
        intra = inter = 0
        for r in range(self.ep):
            b = (send_splits[r] + recv_splits[r]) * row_bytes
            if r // self.gpus_per_node == self.node:
                intra += b
            else:
                inter += b
        st["a2a_bytes_intra_node"] += intra
        st["a2a_bytes_inter_node"] += inter
        st["a2a_rows_sent"] += sum(send_splits) + sum(recv_splits)
        st["a2a_calls"] += 1
        if self.n_nodes > 1 and ids.numel():
            node_of = ids // (self.n_local * self.gpus_per_node)  # [N, k] destination node
            remote = node_of != self.node
            st["a2a_bytes_inter_node_flat_own"] += 2 * int(remote.sum()) * row_bytes
            hit = torch.zeros(ids.shape[0], self.n_nodes, dtype=torch.bool, device=ids.device)
            hit.scatter_(1, node_of, True)
            hit[:, self.node] = False
            st["a2a_bytes_inter_node_two_hop"] += 2 * int(hit.sum()) * row_bytes

    # ----- the exchange -----
    def _check(self, experts: Experts) -> None:
        if experts.n_local != self.n_local or experts.first_expert != self.ep_rank * self.n_local:
            raise ValueError(
                f"experts shard (n_local={experts.n_local}, first_expert={experts.first_expert}) does not match "
                f"EP rank {self.ep_rank}/{self.ep} of {self.n_experts} experts (expected n_local={self.n_local}, "
                f"first_expert={self.ep_rank * self.n_local}); call shard_experts first")

    def dispatch_async(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> DispatchHandle:
        """Start sending rows to their experts' ranks. The count exchange is synchronous (the
        splits must be known on the host); the token all-to-all is asynchronous."""
        self._check(experts)
        t0 = time.perf_counter()
        n, k = ids.shape
        ep, nl = self.ep, self.n_local
        order, counts = permute_by_expert(ids, self.n_experts)
        x_sorted = x.index_select(0, order // k)
        if ep > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.group)
        else:
            recv_counts = counts
        rc = recv_counts.view(ep, nl)  # [source rank, local expert]
        send_splits = counts.view(ep, nl).sum(1).tolist()
        recv_splits = rc.sum(1).tolist()
        counts_local = rc.sum(0).tolist()
        regroup = ungroup = None
        if ep > 1 and nl > 1:
            local_id = torch.arange(nl, device=ids.device).repeat(ep).repeat_interleave(rc.flatten())
            regroup = torch.argsort(local_id, stable=True)
            ungroup = inverse_permutation(regroup)
        state = Dispatched(x=x_sorted, counts=counts_local, inv_order=inverse_permutation(order), weights=weights,
                           send_splits=send_splits, recv_splits=recv_splits, regroup=regroup, ungroup=ungroup,
                           t_issue=t0)
        self._record(ids, send_splits, recv_splits, x.shape[-1] * x.element_size())
        if ep == 1:
            return DispatchHandle(self, None, x_sorted, state)
        works: list = []
        x_recv = _AllToAll.apply(x_sorted, recv_splits, send_splits, self.group, works)
        return DispatchHandle(self, works[0], x_recv, state)

    def combine_async(self, d: Dispatched, y_local: torch.Tensor) -> CombineHandle:
        """Send expert outputs (rows grouped as in `d.x`) back to the tokens' ranks."""
        t0 = time.perf_counter()
        y_recv = y_local
        if d.ungroup is not None:
            y_recv = y_local.index_select(0, d.ungroup)  # undo the regroup
        if self.ep == 1:
            return CombineHandle(self, None, y_recv, d, t0)
        works: list = []
        y_sorted = _AllToAll.apply(y_recv, d.send_splits, d.recv_splits, self.group, works)
        return CombineHandle(self, works[0], y_sorted, d, t0)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
        d = self.dispatch_async(x, ids, weights, experts).wait()
        y_local = experts(d.x, d.counts)
        return self.combine_async(d, y_local).wait()


# ----------------------------------------------------------------------------------------------
# Applying EP to a model
# ----------------------------------------------------------------------------------------------

def _moe_layers(model: Union[nn.Module, Iterable[nn.Module]]) -> dict[str, MoE]:
    mods = [model] if isinstance(model, nn.Module) else list(model)
    out: dict[str, MoE] = {}
    for m in mods:
        for name, mod in m.named_modules():
            if isinstance(mod, MoE):
                out[name] = mod
    return out


@torch.no_grad()
def shard_experts(
    model: nn.Module,
    ep_rank: int,
    ep: int,
    group: Any,
    gpus_per_node: int = 8,
    *,
    source: Optional[nn.Module] = None,
    dispatcher: Optional[AllToAllDispatcher] = None,
) -> AllToAllDispatcher:
    """Give every MoE layer of `model` only this EP rank's experts and an AllToAllDispatcher.

    Each layer's `experts` becomes Experts(n_local, …, first_expert=ep_rank·n_local) holding the
    slice [first_expert, first_expert + n_local) of the full experts — taken from `source` (a full
    model with the same layer names) when given, else from the layer's own (full) experts. As
    init_weights seeds every expert by its global id, calling `model.init_weights(seed)` after
    sharding gives the same values as on the single-process model. Shard BEFORE building the
    optimizer. Also sets `model.set_expert_nodes(ceil(ep / gpus_per_node))`.
    Returns the dispatcher (one instance shared by all layers; pass `dispatcher` to share it
    between several model chunks, e.g. DualPipe's two stages).
    """
    layers = _moe_layers(model)
    src_layers = _moe_layers(source) if source is not None else layers
    if dispatcher is None:
        n_experts = next(iter(layers.values())).n_experts if layers else ep
        dispatcher = AllToAllDispatcher(group, n_experts, gpus_per_node)
    if dispatcher.ep != ep:
        raise ValueError(f"parallel.ep={ep} but the EP group has {dispatcher.ep} ranks")
    for name, moe in layers.items():
        full = src_layers[name].experts
        n_experts = moe.n_experts
        if full.n_local != n_experts:
            raise ValueError(f"{name}.experts holds {full.n_local} of {n_experts} experts; "
                             "shard_experts needs the full experts (pass source=full model)")
        nl = n_experts // ep
        first = ep_rank * nl
        inter_dim, dim = full.w1.shape[1], full.w1.shape[2]
        shard = Experts(nl, dim, inter_dim, first_expert=first).to(device=full.w1.device, dtype=full.w1.dtype)
        for pname in ("w1", "w2", "w3"):
            getattr(shard, pname).copy_(getattr(full, pname)[first:first + nl])
        shard.fp8 = full.fp8
        moe.experts = shard
        moe.dispatcher = dispatcher
    n_nodes = -(-ep // gpus_per_node)
    for moe in layers.values():
        moe.gate.n_nodes = n_nodes
    if hasattr(model, "set_expert_nodes"):
        model.set_expert_nodes(n_nodes)
    return dispatcher


def apply_expert_parallel(model: nn.Module, topo: Any, *, source: Optional[nn.Module] = None,
                          dispatcher: Optional[AllToAllDispatcher] = None) -> AllToAllDispatcher:
    """shard_experts with the coordinates and EP group of a Topology."""
    return shard_experts(model, topo.ep_rank, topo.ep, topo.ep_group, topo.gpus_per_node,
                         source=source, dispatcher=dispatcher)


# ----------------------------------------------------------------------------------------------
# Expert-load reduction (the gradient reductions live in parallel/grads.py)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def global_expert_load(model: Union[nn.Module, Iterable[nn.Module]], topo: Any, *,
                       stage_pair: bool = False) -> dict[str, torch.Tensor]:
    """Each MoE layer's tokens_per_expert summed over the DP group (every rank of the stage):
    name → global load [n_routed_experts] (float32 copies; the buffers are left untouched).
    `stage_pair=True` also sums over the DualPipe stage pair (pass both chunks)."""
    layers = _moe_layers(model)
    names = sorted(layers)
    if not names:
        return {}
    flat = torch.cat([layers[n].tokens_per_expert.float().reshape(-1) for n in names])
    if group_size(topo.dp_group) > 1:
        dist.all_reduce(flat, group=topo.dp_group)
    if stage_pair and topo.stage_pair_group is not None and len(topo.stage_pair_ranks) > 1:
        dist.all_reduce(flat, group=topo.stage_pair_group)
    out, off = {}, 0
    for n in names:
        m = layers[n].tokens_per_expert.numel()
        out[n] = flat[off:off + m].clone()
        off += m
    return out
