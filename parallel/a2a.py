"""One differentiable, uneven all-to-all of encoded rows: the building block of both dispatchers.

`exchange(x, parts, route, w=, ids=)` sends row i of x to peer p for the rows in p's slice of
`route.send` (rows ordered by peer), in the wire format whose encoded tensors are `parts`
(model/wire.py: (fp32,), (bf16,) or (E4M3, scales)), optionally with per-row gate weights `w`
(differentiable) and int32 ids. Everything of a row is packed into ONE uint8 buffer, so one
collective moves it and its byte count is the buffer's width times the rows. Rows for this rank
itself never enter the collective (they are copied), but are encoded/decoded all the same so
the rounding does not depend on where an expert lives.

Autograd: the backward sends the gradients of x (and w) back along the reverse route, in
`route.bwd` format. `Pending.wait()` completes an asynchronous exchange (the outputs are valid
only after it); the backward exchange is synchronous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from model.moe import in_recompute
from model.wire import decode, encode


@dataclass
class Route:
    """Who sends how many rows to whom in one exchange (peer indices are ranks of `group`)."""

    send: list[int]  # rows to each peer (this rank's rows are ordered by peer)
    recv: list[int]  # rows from each peer
    group: Any  # None: a one-rank exchange (local copy)
    me: int  # this rank's index in the group
    remote: list[bool]  # per peer: the link crosses nodes
    bwd: str = "fp32"  # format of the gradients sent back
    stats: Optional["ExchangeStats"] = None  # where the collectives of this route are counted
    kind: str = "dispatch"  # dispatch | combine (which counters its forward bytes feed)

    def reverse(self) -> "Route":
        return Route(self.recv, self.send, self.group, self.me, self.remote, self.bwd, self.stats, self.kind)


class ExchangeStats:
    """The all-to-all counters a dispatcher keeps (read and zeroed per step by the trainer through
    reset_stats). `_count` is the ONE place they grow, called by every collective this module
    issues (`exchange_counts` and the row exchanges of `exchange`, forward and backward):

      a2a_bytes_inter_node / a2a_bytes_intra_node: every byte this rank SENT to another rank of
        another node / of its own node: rows (payload + per-row metadata as packed) of the
        forward exchanges, of the backward exchanges (gradients in the backward format) and the
        split sizes (int64 counts) exchanged before them. Rows for this rank itself are copied,
        not sent. An activation recompute re-runs the forward exchanges: they count again.
      a2a_bytes_dispatch_*: the forward dispatch rows alone; a2a_bytes_backward_*: the backward
        rows alone; a2a_bytes_splits: the split-size messages alone (both link kinds).
      a2a_rows_sent: rows sent to other ranks (every row exchange); a2a_calls: all-to-all
        collectives issued (split sizes and rows, forward and backward; a one-rank group issues
        none); a2a_seconds: host seconds of the forward dispatch/combine (not during recompute).
    """

    KEYS = ("a2a_bytes_intra_node", "a2a_bytes_inter_node", "a2a_bytes_dispatch_inter_node",
            "a2a_bytes_dispatch_intra_node", "a2a_bytes_backward_inter_node", "a2a_bytes_backward_intra_node",
            "a2a_bytes_splits", "a2a_rows_sent", "a2a_calls", "a2a_seconds")
    stats: dict

    def reset_stats(self) -> dict[str, float]:
        """Return the accumulated stats and zero them."""
        old = dict(getattr(self, "stats", {}))
        self.stats = {k: 0 for k in self.KEYS}
        self.stats["a2a_seconds"] = 0.0
        return old

    def _add_time(self, dt: float) -> None:
        if not in_recompute():
            self.stats["a2a_seconds"] += dt

    def _count(self, sent: list[int], me: int, remote: list[bool], what: str, backward: bool = False,
               rows: int = 0) -> None:
        """One collective: `sent[p]` bytes to peer p (p == me: not sent); what = dispatch |
        combine | splits."""
        st = self.stats
        inter = sum(b for p, b in enumerate(sent) if p != me and remote[p])
        intra = sum(b for p, b in enumerate(sent) if p != me and not remote[p])
        st["a2a_calls"] += 1
        st["a2a_bytes_inter_node"] += inter
        st["a2a_bytes_intra_node"] += intra
        st["a2a_rows_sent"] += rows
        if what == "splits":
            st["a2a_bytes_splits"] += inter + intra
        elif backward:
            st["a2a_bytes_backward_inter_node"] += inter
            st["a2a_bytes_backward_intra_node"] += intra
        elif what == "dispatch":
            st["a2a_bytes_dispatch_inter_node"] += inter
            st["a2a_bytes_dispatch_intra_node"] += intra


def exchange_counts(counts: torch.Tensor, group: Any, stats: Optional[ExchangeStats] = None,
                    remote: Optional[list[bool]] = None) -> torch.Tensor:
    """counts [peers·c] (int64) → what each peer sends me, same layout (synchronous). Counted in
    `stats` (c int64 to each peer; `remote[p]`: peer p is on another node)."""
    if group is None:
        return counts.clone()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    if stats is not None:
        peers = dist.get_world_size(group)
        per_peer = counts.numel() // peers * counts.element_size()
        stats._count([per_peer] * peers, dist.get_rank(group), remote or [False] * peers, "splits")
    return out


def _pack(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    cols = [t.reshape(rows, math.prod(t.shape[1:])).contiguous().view(torch.uint8) for t in tensors]
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]


def _unpack(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, off, rows = [], 0, buf.shape[0]
    for t in like:
        tail = tuple(t.shape[1:])
        width = t.element_size() * math.prod(tail)
        out.append(buf[:, off:off + width].contiguous().view(t.dtype).reshape(rows, *tail))
        off += width
    return out


def _send_bytes(buf: torch.Tensor, route: Route, async_op: bool, backward: bool = False):
    """All-to-all of the uint8 rows `buf` (ordered by peer) → (work, finish() → received rows);
    counted in route.stats (a row costs the packed width: payload + metadata)."""
    if route.group is None:
        return None, lambda: buf
    me = route.me
    if route.stats is not None:
        route.stats._count([n * buf.shape[1] for n in route.send], me, route.remote, route.kind, backward,
                           rows=sum(n for p, n in enumerate(route.send) if p != me))
    chunks = buf.split(route.send)
    send, recv = list(route.send), list(route.recv)
    send[me] = recv[me] = 0
    others = torch.cat([c for p, c in enumerate(chunks) if p != me]) if len(chunks) > 1 else buf[:0]
    out = buf.new_empty((sum(recv), buf.shape[1]))
    work = dist.all_to_all_single(out, others.contiguous(), recv, send, group=route.group, async_op=async_op)
    off = sum(route.recv[:me])
    return work, lambda _send=others: torch.cat([out[:off], chunks[me], out[off:]])  # _send: alive until done


class Pending:
    """An issued exchange: `wait()` → (x, w, parts, ids) received (w / ids None when not sent)."""

    def __init__(self, work, finish):
        self._work, self._finish, self._result = work, finish, None
        self.outputs: tuple = ()

    def wait(self):
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = (*self.outputs, *self._finish())
        return self._result


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, parts, ids, fmt, route, async_op, box):
        ctx.route, ctx.has_w = route, w is not None
        ctx.x_dtype = x.dtype
        fields = list(parts) + ([w.detach().float()] if w is not None else []) + ([ids] if ids is not None else [])
        rows = x.shape[0]
        buf = _pack(fields, rows)
        work, finish = _send_bytes(buf, route, async_op)
        n_out = sum(route.recv)
        x_out = x.new_empty((n_out, x.shape[1]))
        w_out = (w.new_empty((n_out, w.shape[1])) if w is not None else x.new_empty((n_out, 0)))

        def done():
            got = _unpack(finish(), fields)
            p_out = tuple(got[:len(parts)])
            rest = got[len(parts):]
            with torch.no_grad():
                x_out.copy_(decode(p_out, fmt))
                if w is not None:
                    w_out.copy_(rest[0])
            return p_out, (rest[-1] if ids is not None else None)

        box.append(Pending(work, done))
        return x_out, w_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx, gw):
        back = ctx.route.reverse()
        fmt = back.bwd
        fx = list(encode(gx, fmt))
        fields = fx + (list(encode(gw, fmt)) if ctx.has_w else [])
        n_gx = len(fx)
        buf = _pack(fields, gx.shape[0])
        work, finish = _send_bytes(buf, back, False, backward=True)
        got = _unpack(finish(), fields)
        dx = decode(tuple(got[:n_gx]), fmt).to(ctx.x_dtype)
        dw = decode(tuple(got[n_gx:]), fmt) if ctx.has_w else None
        return dx, dw, None, None, None, None, None, None


def exchange(x: torch.Tensor, parts: tuple, fmt: str, route: Route, *, w: Optional[torch.Tensor] = None,
             ids: Optional[torch.Tensor] = None, async_op: bool = False) -> Pending:
    """Send rows (x: their decoded value, with autograd; parts: the encoded tensors that travel)
    along `route`. Returns a Pending; its wait() gives (x, w, parts, ids) as received."""
    box: list = []
    x_out, w_out = _Exchange.apply(x, w, parts, ids, fmt, route, async_op, box)
    box[0].outputs = (x_out, w_out if w is not None else None)
    return box[0]
