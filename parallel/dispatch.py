"""Token dispatch for the MoE layer: LocalDispatcher (1 process) and AllToAllDispatcher (EP, flat).

`model/moe.py` owns the Dispatcher protocol, `LocalDispatcher`, `permute_by_expert` and
`combine_topk`, so that model/ needs nothing from parallel/ (dependencies point one way:
parallel → model). Dispatcher and LocalDispatcher are re-exported here because this is where the
dispatchers live in the design map. `AllToAllDispatcher` reuses the same permutation and
combine_topk, so both dispatchers sum each token's k expert outputs in the same order.
`parallel.dispatch=two_hop` (parallel/two_hop.py) sends a token once per destination node
instead; `build_dispatcher` picks one.

Flat expert-parallel dispatch (dropless, uneven all-to-all), per MoE call on every EP rank::

    permute_by_expert(ids)            rows sorted by global expert → per-destination slices contiguous
    all_to_all_single(counts)         per-expert counts → send/recv splits, received per-local-expert counts
    exchange(rows, splits)            dispatch: received rows grouped by (source rank, local expert)
    regroup by local expert           second (stable) permutation → experts(x_local, counts_local)
    undo regroup, exchange back       combine: outputs go back along the reverse splits
    combine_topk                      un-permute and Σ_k gate · expert output

Rows travel in the `parallel.a2a_dtype` format (model/wire.py; each token encoded once, an FP8
row is the experts' GEMM input) through parallel/a2a.py's `exchange`, whose backward is the
reverse exchange. `dispatch_async` / `combine_async` return handles with `.wait()` so a
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

from model.moe import (Dispatcher, Experts, LocalDispatcher, MoE, combine_topk, inverse_permutation,
                       permute_by_expert, take_rows)
from model.wire import FP32, Wire, encode, encode_rows
from parallel.a2a import ExchangeStats, Pending, Route, exchange, exchange_counts
from parallel.grads import group_size
from parallel.two_hop import TwoHopDispatcher

__all__ = [
    "AllToAllDispatcher", "Dispatcher", "LocalDispatcher", "DispatchHandle", "CombineHandle", "Dispatched",
    "shard_experts", "apply_expert_parallel", "global_expert_load",
]

DISPATCH_MODES = ("auto", "flat", "two_hop")


@dataclass
class Dispatched:
    """Tokens received by this rank, grouped by local expert: run `compute(experts)` on them."""

    x: torch.Tensor  # [M, dim] rows grouped by local expert
    counts: list[int]  # rows per local expert
    x_fp8: Optional[tuple]  # x's FP8 tiles when the dispatch format is fp8 (the experts' GEMM input)
    # bookkeeping for combine
    inv_order: torch.Tensor  # inverse of permute_by_expert's order
    weights: torch.Tensor
    route: Route
    regroup: Optional[torch.Tensor]  # received rows → grouped by local expert (None = identity)
    ungroup: Optional[torch.Tensor]  # its inverse
    t_issue: float = 0.0

    def compute(self, experts: Experts) -> torch.Tensor:
        return experts(self.x, self.counts, self.x_fp8)


class DispatchHandle:
    def __init__(self, dispatcher: "AllToAllDispatcher", pending: Pending, state: Dispatched):
        self._dispatcher, self._pending, self._state = dispatcher, pending, state
        self._done = False

    def wait(self) -> Dispatched:
        s = self._state
        if not self._done:
            x_recv, _, parts, _ = self._pending.wait()
            s.x = x_recv if s.regroup is None else x_recv.index_select(0, s.regroup)
            if self._dispatcher.wire.dispatch == "fp8":
                s.x_fp8 = parts if s.regroup is None else take_rows(parts, s.regroup)
            self._dispatcher._add_time(time.perf_counter() - s.t_issue)
            self._done = True
        return s


class CombineHandle:
    def __init__(self, dispatcher: "AllToAllDispatcher", pending: Pending, state: Dispatched, t0: float):
        self._dispatcher, self._pending, self._state, self._t0 = dispatcher, pending, state, t0

    def wait(self) -> torch.Tensor:
        y_sorted = self._pending.wait()[0]
        self._dispatcher._add_time(time.perf_counter() - self._t0)
        return combine_topk(y_sorted, self._state.inv_order, self._state.weights)


class AllToAllDispatcher(ExchangeStats):
    """Expert-parallel dispatcher, `parallel.dispatch=flat`: sends each (token, expert) row to the
    EP rank owning the expert in one all-to-all (parallel/two_hop.py: the two-hop variant).

    ep_group: the EP process group (None or size 1 → no communication, same arithmetic).
    n_experts: routed experts in total; rank i owns experts [i·n_local, (i+1)·n_local).
    gpus_per_node: a node is that many consecutive EP ranks (for the byte accounting).
    wire: formats of the dispatch / combine rows and of the backward exchanges (model/wire.py).

    `stats` (read and reset per step by the trainer via `reset_stats()`): parallel/a2a.py's
    ExchangeStats, counted by the collectives themselves — every byte this rank sent (split
    sizes, dispatch and combine rows, and the backward's gradient rows) over intra-/inter-node
    links, and the number of collectives. a2a_seconds: host wall time from issue to wait (on
    CUDA only meaningful with synchronous calls).
    """

    def __init__(self, ep_group: Any, n_experts: int, gpus_per_node: int = 8, wire: Wire = FP32):
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if n_experts % self.ep:
            raise ValueError(f"model.n_routed_experts={n_experts} not divisible by parallel.ep={self.ep}")
        self.n_experts, self.n_local = n_experts, n_experts // self.ep
        self.gpus_per_node = gpus_per_node
        self.node = self.ep_rank // gpus_per_node
        self.n_nodes = -(-self.ep // gpus_per_node)
        self.wire = wire
        self.reset_stats()

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
        fmt = self.wire.dispatch
        order, counts = permute_by_expert(ids, self.n_experts)
        rows = order // k
        xd, tiles = encode_rows(x, fmt, "fp32")  # each token encoded once
        x_sorted = xd.index_select(0, rows)
        parts = take_rows(tiles, rows) if tiles is not None else encode(x_sorted, fmt)
        remote = [r // self.gpus_per_node != self.node for r in range(ep)]
        recv_counts = exchange_counts(counts, self.group if ep > 1 else None, self, remote)
        rc = recv_counts.view(ep, nl)  # [source rank, local expert]
        send_splits = counts.view(ep, nl).sum(1).tolist()
        recv_splits = rc.sum(1).tolist()
        counts_local = rc.sum(0).tolist()
        regroup = ungroup = None
        if ep > 1 and nl > 1:
            local_id = torch.arange(nl, device=ids.device).repeat(ep).repeat_interleave(rc.flatten())
            regroup = torch.argsort(local_id, stable=True)
            ungroup = inverse_permutation(regroup)
        route = Route(send_splits, recv_splits, self.group if ep > 1 else None, self.ep_rank, remote,
                      self.wire.backward, self, "dispatch")
        pending = exchange(x_sorted, parts, fmt, route, async_op=True)
        state = Dispatched(x=x_sorted, counts=counts_local, x_fp8=None, inv_order=inverse_permutation(order),
                           weights=weights, route=route, regroup=regroup, ungroup=ungroup, t_issue=t0)
        return DispatchHandle(self, pending, state)

    def combine_async(self, d: Dispatched, y_local: torch.Tensor) -> CombineHandle:
        """Send expert outputs (rows grouped as in `d.x`) back to the tokens' ranks."""
        t0 = time.perf_counter()
        fmt = self.wire.combine
        y_recv = y_local
        if d.ungroup is not None:
            y_recv = y_local.index_select(0, d.ungroup)  # undo the regroup
        route = d.route.reverse()
        route.kind = "combine"
        pending = exchange(y_recv, encode(y_recv, fmt), fmt, route, async_op=True)
        return CombineHandle(self, pending, d, t0)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
        d = self.dispatch_async(x, ids, weights, experts).wait()
        return self.combine_async(d, d.compute(experts)).wait()


def build_dispatcher(mode: str, groups: tuple, n_experts: int, gpus_per_node: int, wire: Wire = FP32):
    """The EP dispatcher of `parallel.dispatch` (`flat` | `two_hop`) over groups
    (ep_group, ep_inter_group, ep_intra_group)."""
    ep_group, inter, intra = groups
    if mode == "two_hop":
        return TwoHopDispatcher(ep_group, inter, intra, n_experts, gpus_per_node, wire)
    if mode != "flat":
        raise ValueError(f"parallel.dispatch: expected flat|two_hop, got {mode!r}")
    return AllToAllDispatcher(ep_group, n_experts, gpus_per_node, wire)


def resolve_dispatch(mode: str, n_nodes: int) -> str:
    """`parallel.dispatch=auto` → two_hop when the EP group (or, in one process, the expert node
    count) spans more than one node, else flat."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"parallel.dispatch: expected {'|'.join(DISPATCH_MODES)}, got {mode!r}")
    if mode == "auto":
        return "two_hop" if n_nodes > 1 else "flat"
    return mode


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
                          dispatcher: Optional[AllToAllDispatcher] = None, mode: str = "flat",
                          wire: Wire = FP32, groups: Optional[tuple] = None):
    """shard_experts with the coordinates and EP groups of a Topology; `mode` (flat | two_hop)
    and `wire` choose the dispatcher unless one is given; `groups` = (ep, inter, intra) groups
    to use instead of the topology's own (a second DualPipe chunk)."""
    if dispatcher is None:
        groups = groups or (topo.ep_group, topo.ep_inter_group, topo.ep_intra_group)
        n_experts = next(iter(_moe_layers(model).values())).n_experts
        dispatcher = build_dispatcher(mode, groups, n_experts, topo.gpus_per_node, wire)
    return shard_experts(model, topo.ep_rank, topo.ep, dispatcher.group, topo.gpus_per_node,
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
