"""Two-hop, node-limited expert dispatch (`parallel.dispatch=two_hop`), as DeepSeek-V3 runs it.

A node is `gpus_per_node` consecutive EP ranks; rank = node·G + l. Per MoE call on every EP rank:

    hop 1 (inter-node group: the ranks with local index l on every node)
        each token goes ONCE to each node holding one of its experts (≤ model.max_nodes_per_token),
        to the rank with the sender's own local index there, with its k slots restricted to that
        node (node-local expert id or -1, gate weight or 0). Rows for the own node are copied.
    hop 2 (intra-node group: the G ranks of the node)
        the forwarding rank sends each row once to each GPU of the node holding one of its
        experts, with the slots restricted to that GPU; the FP8 tiles are forwarded as they came.
    experts                 (row, slot) pairs grouped by local expert → experts(x, counts)
    combine hop 2 back      each expert output returns to the forwarding rank (one row per pair)
    partial                 forwarding rank: Σ over the token's slots on the node of gate · output,
                            in slot order: ONE partial per (token, node)
    combine hop 1 back      the partial returns to the source, which sums the partials in node
                            order (the shared expert is added by the MoE layer).

Rows return in the order they were received, so no source position travels. Autograd flows
through every hop (parallel/a2a.py: an exchange's backward is the reverse exchange). Rounding:
model/wire.py; LocalDispatcher(two_hop=True) reproduces the forward rounding. Hop 1 of dispatch
and hop 2 of combine are asynchronous (`dispatch_async` / `combine_async` return handles); the
hop that depends on them runs inside `wait()`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from model.moe import Experts, inverse_permutation, take_rows
from model.wire import FP32, Wire, encode, encode_rows
from parallel.a2a import ExchangeStats, Pending, Route, exchange, exchange_counts


def pair_counts(ids: torch.Tensor, n_local: int, gpus: int, rank: int) -> list[float]:
    """ids [N, k] of the tokens of EP rank `rank` (nodes of `gpus` ranks, `n_local` experts each)
    → this source rank's routing as the pair counts of parallel/a2a_bytes.py: two_hop's (token,
    remote node), (hop-1 row, other GPU of the node than its forwarder), (pair, expert on another
    GPU than its forwarder); flat's (pair, expert on another node), (pair, other GPU of my node)."""
    node, local = divmod(rank, gpus)
    gpu = ids // n_local  # [N, k] EP rank of each pair's expert
    fwd = (gpu // gpus) * gpus + local  # the forwarding rank on that pair's node
    token_nodes = sum(len(set(row.tolist()) - {node}) for row in gpu // gpus)
    token_gpus = sum(len({g for g, f in zip(gr.tolist(), fr.tolist()) if g != f}) for gr, fr in zip(gpu, fwd))
    token_experts = int((gpu != fwd).sum())
    remote_pairs = int((gpu // gpus != node).sum())
    node_pairs = int(((gpu // gpus == node) & (gpu != rank)).sum())
    return [token_nodes, token_gpus, token_experts, remote_pairs, node_pairs]


def _size(group: Any) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group: Any) -> int:
    return dist.get_rank(group) if group is not None else 0


@dataclass
class _Source:
    """What the source keeps between dispatch and combine."""

    n_tokens: int
    slot1: torch.Tensor  # position token·n_nodes + node of each hop-1 row
    route1: Route


@dataclass
class _Forward:
    """What the forwarding rank keeps."""

    w1: torch.Tensor  # [R1, k] gate weights of the received hop-1 rows (0 off-node), with autograd
    pair1: torch.Tensor  # position row1·k + slot of every pair it will get back, in return order
    route2: Route


@dataclass
class TwoHopDispatched:
    """Rows on this rank's experts (`x`, grouped by local expert; `counts`; FP8 tiles `x_fp8`)."""

    x: torch.Tensor
    counts: list[int]
    x_fp8: Optional[tuple]
    src: _Source
    fwd: _Forward
    order: torch.Tensor  # pairs (row2, slot) → grouped by expert
    route2_back: Route
    t_issue: float = 0.0

    def compute(self, experts: Experts) -> torch.Tensor:
        return experts(self.x, self.counts, self.x_fp8)


class TwoHopDispatchHandle:
    def __init__(self, disp: "TwoHopDispatcher", pending: Pending, src: _Source, k: int, t0: float):
        self._disp, self._pending, self._src, self._k, self._t0 = disp, pending, src, k, t0
        self._result: Optional[TwoHopDispatched] = None

    def wait(self) -> TwoHopDispatched:
        if self._result is None:
            self._result = self._disp._hop2(self._pending, self._src, self._k, self._t0)
        return self._result


class TwoHopCombineHandle:
    def __init__(self, disp: "TwoHopDispatcher", pending: Pending, d: TwoHopDispatched, t0: float):
        self._disp, self._pending, self._d, self._t0 = disp, pending, d, t0
        self._out: Optional[torch.Tensor] = None

    def wait(self) -> torch.Tensor:
        if self._out is None:
            self._out = self._disp._combine_hop1(self._pending, self._d, self._t0)
        return self._out


class TwoHopDispatcher(ExchangeStats):
    """Expert-parallel dispatcher over whole nodes: hop 1 inter-node, hop 2 intra-node.

    ep_group: the EP group (rank i owns experts [i·n_local, (i+1)·n_local)); inter_group: the
    ranks with this rank's local index on every node of it; intra_group: this node's ranks.
    `stats`: parallel/a2a.py's ExchangeStats, as AllToAllDispatcher's: every byte this rank sent
    (split sizes of both hops, dispatch and combine rows with their metadata, backward gradient
    rows) over inter-node / intra-node links, and the number of collectives.
    """

    def __init__(self, ep_group: Any, inter_group: Any, intra_group: Any, n_experts: int,
                 gpus_per_node: int, wire: Wire = FP32):
        self.group, self.inter_group, self.intra_group = ep_group, inter_group, intra_group
        self.ep, self.ep_rank = _size(ep_group), _rank(ep_group)
        if self.ep % gpus_per_node and self.ep > 1:
            raise ValueError(f"parallel.dispatch=two_hop: parallel.ep={self.ep} is not a whole number of "
                             f"nodes of parallel.gpus_per_node={gpus_per_node}")
        self.gpus = min(gpus_per_node, self.ep)
        self.n_nodes = self.ep // self.gpus
        self.node, self.local = divmod(self.ep_rank, self.gpus)
        if _size(inter_group) != self.n_nodes or _size(intra_group) != self.gpus:
            raise ValueError(f"two_hop groups: inter-node group of {_size(inter_group)} ranks and intra-node "
                             f"group of {_size(intra_group)} for {self.n_nodes} nodes of {self.gpus}")
        if n_experts % self.ep:
            raise ValueError(f"model.n_routed_experts={n_experts} not divisible by parallel.ep={self.ep}")
        self.n_experts, self.n_local = n_experts, n_experts // self.ep
        self.per_node = self.n_local * self.gpus
        self.gpus_per_node = gpus_per_node
        self.wire = wire
        self.reset_stats()

    def _check(self, experts: Experts) -> None:
        if experts.n_local != self.n_local or experts.first_expert != self.ep_rank * self.n_local:
            raise ValueError(f"experts shard (n_local={experts.n_local}, first_expert={experts.first_expert}) "
                             f"does not match EP rank {self.ep_rank}/{self.ep}; call shard_experts first")

    # ----- dispatch -----
    def dispatch_async(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       experts: Experts) -> TwoHopDispatchHandle:
        """Hop 1 (asynchronous): each token once to each of its destination nodes."""
        self._check(experts)
        t0 = time.perf_counter()
        n, k = ids.shape
        fmt = self.wire.dispatch
        node_of = ids // self.per_node  # [N, k]
        hit = torch.zeros(n, self.n_nodes, dtype=torch.bool, device=ids.device)
        hit.scatter_(1, node_of, True)
        dest_tok = hit.t().nonzero()  # (node, token), ordered by node then token
        node1, tok1 = dest_tok[:, 0], dest_tok[:, 1]
        on_node = node_of.index_select(0, tok1) == node1.unsqueeze(1)  # [R1, k]
        meta1 = torch.where(on_node, ids.index_select(0, tok1) - node1.unsqueeze(1) * self.per_node,
                            torch.full_like(on_node, -1, dtype=ids.dtype)).to(torch.int32)
        w1 = weights.index_select(0, tok1) * on_node.to(weights.dtype)
        xd, tiles = encode_rows(x, fmt, "fp32")
        x1 = xd.index_select(0, tok1)
        parts1 = take_rows(tiles, tok1) if tiles is not None else encode(x1, fmt)
        send1 = torch.bincount(node1, minlength=self.n_nodes)
        remote = [p != self.node for p in range(self.n_nodes)]
        recv1 = exchange_counts(send1, self.inter_group, self, remote)
        route1 = Route(send1.tolist(), recv1.tolist(), self.inter_group, self.node, remote, self.wire.backward,
                       self, "dispatch")
        pending = exchange(x1, parts1, fmt, route1, w=w1, ids=meta1, async_op=True)
        src = _Source(n, tok1 * self.n_nodes + node1, route1)
        return TwoHopDispatchHandle(self, pending, src, k, t0)

    def _hop2(self, pending: Pending, src: _Source, k: int, t0: float) -> TwoHopDispatched:
        """Hop 2 (inside wait): each received row once to each GPU of this node it needs."""
        fmt = self.wire.dispatch
        x1, w1, parts1, meta1 = pending.wait()
        gpu_of = torch.where(meta1 >= 0, meta1 // self.n_local, torch.full_like(meta1, -1))  # [R1, k]
        r1 = x1.shape[0]
        hit = torch.zeros(r1, self.gpus + 1, dtype=torch.bool, device=x1.device)
        hit.scatter_(1, (gpu_of + 1).long(), True)  # column 0 collects the off-node slots
        dest_row = hit[:, 1:].t().nonzero()  # (gpu, row1), ordered by gpu then row
        gpu2, row2 = dest_row[:, 0], dest_row[:, 1]
        on_gpu = gpu_of.index_select(0, row2) == gpu2.unsqueeze(1).to(gpu_of.dtype)  # [R2, k]
        meta2 = torch.where(on_gpu, meta1.index_select(0, row2) - (gpu2 * self.n_local).unsqueeze(1).to(meta1.dtype),
                            torch.full_like(meta1.index_select(0, row2), -1))
        send2 = torch.bincount(gpu2, minlength=self.gpus)
        recv2 = exchange_counts(send2, self.intra_group, self)
        route2 = Route(send2.tolist(), recv2.tolist(), self.intra_group, self.local,
                       [False] * self.gpus, self.wire.backward, self, "dispatch")
        x2_send = x1.index_select(0, row2)
        got = exchange(x2_send, take_rows(parts1, row2), fmt, route2, ids=meta2).wait()
        x2, _, parts2, meta2r = got
        # the pairs this rank will send back, in the order the forwarder expects them: per row, slots ascending
        pos = on_gpu.nonzero()  # (sent row2 index, slot) — the forwarder's view
        pair1 = row2.index_select(0, pos[:, 0]) * k + pos[:, 1]
        fwd = _Forward(w1, pair1, route2)
        # expert side: (received row, slot) pairs on my experts, grouped by expert
        valid = meta2r >= 0
        pj = valid.nonzero()  # row-major: rows by source GPU, slots ascending
        eid = meta2r[pj[:, 0], pj[:, 1]].long()
        order = torch.argsort(eid, stable=True)
        counts = torch.bincount(eid, minlength=self.n_local).tolist()
        rows = pj[:, 0].index_select(0, order)
        pairs_from = torch.zeros(self.gpus, dtype=torch.long)
        src_of_row = torch.repeat_interleave(torch.arange(self.gpus), torch.tensor(route2.recv, dtype=torch.long))
        pairs_from.index_add_(0, src_of_row, valid.sum(1).long().cpu())
        pairs_back = torch.zeros(self.gpus, dtype=torch.long).index_add_(
            0, gpu2.cpu(), on_gpu.sum(1).long().cpu())
        back = Route(pairs_from.tolist(), pairs_back.tolist(), self.intra_group, self.local,
                     [False] * self.gpus, self.wire.backward, self, "combine")
        x_fp8 = take_rows(parts2, rows) if fmt == "fp8" else None  # else the experts quantise (FP8 experts)
        d = TwoHopDispatched(x=x2.index_select(0, rows), counts=counts, x_fp8=x_fp8,
                             src=src, fwd=fwd, order=order, route2_back=back, t_issue=t0)
        self._add_time(time.perf_counter() - t0)
        return d

    # ----- combine -----
    def combine_async(self, d: TwoHopDispatched, y_local: torch.Tensor) -> TwoHopCombineHandle:
        """Combine hop 2 back (asynchronous): every expert output to its forwarding rank."""
        t0 = time.perf_counter()
        fmt = self.wire.combine
        y_pairs = y_local.index_select(0, inverse_permutation(d.order))
        pending = exchange(y_pairs, encode(y_pairs, fmt), fmt, d.route2_back, async_op=True)
        return TwoHopCombineHandle(self, pending, d, t0)

    def _combine_hop1(self, pending: Pending, d: TwoHopDispatched, t0: float) -> torch.Tensor:
        fmt = self.wire.combine
        y_back = pending.wait()[0]  # [P, dim]: pairs (row1, slot) in d.fwd.pair1 order
        w1 = d.fwd.w1
        r1, k = w1.shape
        dim = y_back.shape[-1]
        dense = y_back.new_zeros(r1 * k, dim).index_copy(0, d.fwd.pair1, y_back)
        partial = (dense.view(r1, k, dim) * w1.unsqueeze(-1)).sum(dim=1)  # slot order, as combine_topk
        r = d.src.route1.reverse()
        r.kind = "combine"
        got = exchange(partial, encode(partial, fmt), fmt, r).wait()
        n = d.src.n_tokens
        out = got[0].new_zeros(n * self.n_nodes, dim).index_copy(0, d.src.slot1, got[0])
        self._add_time(time.perf_counter() - t0)
        return out.view(n, self.n_nodes, dim).sum(dim=1)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
        d = self.dispatch_async(x, ids, weights, experts).wait()
        return self.combine_async(d, d.compute(experts)).wait()
