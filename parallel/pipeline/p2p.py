"""Point-to-point transfer of activations and gradients between pipeline stages.

Every message is a :class:`~parallel.pipeline.schedule.Message` of the schedule (``recvs`` /
``sends``); its payload has the static per-micro-batch shape ``[micro_batch, seq, dim]``, so no
shape exchange is needed: the receiver allocates the buffer itself.

Matching, both backends:
  * gloo matches by (source, tag): every message gets a unique tag derived from
    (kind, micro-batch, source stage) — one "stream" per message, so arrival order is irrelevant;
  * NCCL ignores tags and matches a pair's messages in posting order: the receiver therefore
    posts its ``irecv``\\ s for a peer in exactly ``schedule.send_order()`` order — when an action
    needs message X from peer P, every not-yet-posted message that P sends before X is posted
    too (received ahead of need and buffered). That rule is applied on gloo as well (harmless).
Ops are issued with ``dist.batch_isend_irecv`` (one NCCL group per call).

Completion: on gloo, ``Work.is_completed()`` / futures are not implemented for p2p, so each
posted op gets a small daemon thread that blocks in ``wait()`` and stamps the completion time
(the transfer itself is driven by gloo's transport thread either way: the waiter only observes
it). That gives true comm intervals for the timeline and lets the compute thread block only on
the messages it needs. On CUDA/NCCL ``wait()`` is called on the compute thread when the tensor
is needed (it orders the current stream after the transfer) and the interval ends there.

All posting goes through one lock, so the DualPipe engine may send from its forward-half thread
while the main thread posts receives.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from .schedule import Message, Schedule

MsgKey = tuple  # (kind, microbatch, src_stage)


def msg_key(m: Message) -> MsgKey:
    return (m.kind, m.microbatch, m.src_stage)


def msg_tag(m: Message, schedule: Schedule) -> int:
    """Unique per message of a step: (micro-batch, source stage, kind)."""
    return (m.microbatch * schedule.n_stages + m.src_stage) * 2 + (1 if m.kind == "grad" else 0)


class _Op:
    """One posted send or receive: its tensor, Work, timing and (gloo) waiter thread."""

    __slots__ = ("msg", "tensor", "work", "t_post", "t_done", "done", "error", "thread", "is_send")

    def __init__(self, msg: Message, tensor: torch.Tensor, is_send: bool):
        self.msg, self.tensor, self.is_send = msg, tensor, is_send
        self.work = None
        self.t_post = self.t_done = 0.0
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def _wait_bg(self) -> None:
        try:
            self.work.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised on the compute thread
            self.error = e
        self.t_done = time.perf_counter()
        self.done.set()

    def wait(self) -> torch.Tensor:
        if self.thread is not None:
            self.done.wait()
            if self.error is not None:
                raise self.error
        elif not self.done.is_set():
            self.work.wait()
            self.t_done = time.perf_counter()
            self.done.set()
        return self.tensor


class P2P:
    """Sends/receives one rank's pipeline messages for one schedule.

    ``ranks[p]``: the global rank of pipeline index p (the pp group of this data-parallel index);
    ``group``: the pipeline process group (None → default group).
    """

    def __init__(self, schedule: Schedule, pp_rank: int, ranks: Sequence[int], group: Any = None,
                 device: Optional[torch.device] = None, timeline: Any = None):
        self.schedule, self.pp_rank = schedule, pp_rank
        self.ranks, self.group = list(ranks), group
        self.device = device or torch.device("cpu")
        self.timeline = timeline
        self.background_wait = self.device.type != "cuda"
        order = schedule.send_order()
        # incoming messages per source pipeline index, in the sender's order
        self._incoming: dict[int, list[Message]] = {
            src: msgs for (src, dst), msgs in order.items() if dst == pp_rank}
        self._pos: dict[MsgKey, tuple[int, int]] = {
            msg_key(m): (src, i) for src, msgs in self._incoming.items() for i, m in enumerate(msgs)}
        # outgoing messages per destination in the schedule's (sender's) order: on NCCL a send is
        # issued only after every earlier one to the same peer, even if an FB pair's backward
        # half finishes before its forward half (threaded overlap)
        self._outgoing: dict[int, list[MsgKey]] = {
            dst: [msg_key(m) for m in msgs] for (src, dst), msgs in order.items() if src == pp_rank}
        self.ordered_sends = self.device.type == "cuda"
        self._lock = threading.Lock()
        self.begin_step(None, None)

    # ------------------------------------------------------------------ step lifecycle
    def begin_step(self, shape: Optional[Sequence[int]], dtype: Optional[torch.dtype]) -> None:
        self.shape, self.dtype = (tuple(shape) if shape is not None else None), dtype
        self._next = {src: 0 for src in self._incoming}
        self._recvs: dict[MsgKey, _Op] = {}
        self._sends: list[_Op] = []
        self._local: dict[MsgKey, torch.Tensor] = {}
        self._out_next = {dst: 0 for dst in self._outgoing}
        self._out_ready: dict[MsgKey, _Op] = {}

    def finish(self) -> None:
        """Wait for every send of the step (and check every expected message was consumed)."""
        left = [k for k in self._recvs] + [k for k in self._out_ready]
        if left:
            self._sends, self._recvs, self._out_ready = [], {}, {}
            raise RuntimeError(f"pipeline p2p: unconsumed or unsent messages {left}")
        for op in self._sends:
            op.wait()
        for op in self._sends:
            self._record(op)
        self._sends = []

    # ------------------------------------------------------------------ posting
    def _peer(self, pp_index: int) -> int:
        return self.ranks[pp_index]

    def _issue(self, ops: list[tuple[_Op, Any]]) -> None:
        if not ops:
            return
        p2p_ops = [dist.P2POp(fn, op.tensor, self._peer(op.msg.dst_rank if op.is_send else op.msg.src_rank),
                              self.group, msg_tag(op.msg, self.schedule)) for op, fn in ops]
        t = time.perf_counter()
        works = dist.batch_isend_irecv(p2p_ops)
        for (op, _), w in zip(ops, works):
            op.work, op.t_post = w, t
            if self.background_wait:
                op.thread = threading.Thread(target=op._wait_bg, daemon=True, name="p2p-wait")
                op.thread.start()

    def _recv_ops_until(self, m: Message) -> list[tuple[_Op, Any]]:
        """irecvs (not yet posted) for every message the source sends up to and including m."""
        src, i = self._pos[msg_key(m)]
        ops = []
        msgs = self._incoming[src]
        while self._next[src] <= i:
            mm = msgs[self._next[src]]
            self._next[src] += 1
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            op = _Op(mm, buf, is_send=False)
            self._recvs[msg_key(mm)] = op
            ops.append((op, dist.irecv))
        return ops

    def post_recvs(self, msgs: Iterable[Message]) -> None:
        """Make sure irecvs for ``msgs`` (and, per send order, everything before them) are posted."""
        with self._lock:
            ops = []
            for m in msgs:
                if not m.local:
                    ops += self._recv_ops_until(m)
            self._issue(ops)

    def send(self, msgs_and_tensors: Iterable[tuple[Message, torch.Tensor]]) -> None:
        """Post sends (non-blocking). Local messages (same rank) are handed over in memory."""
        with self._lock:
            ops = []
            for m, t in msgs_and_tensors:
                t = t.detach()
                if self.dtype is not None and t.dtype != self.dtype:
                    t = t.to(self.dtype)  # static buffer dtype (e.g. a bf16-autocast output)
                if m.local:
                    self._local[msg_key(m)] = t
                    continue
                if self.shape is not None and tuple(t.shape) != self.shape:
                    raise RuntimeError(f"pipeline p2p: {m.kind} of micro-batch {m.microbatch} has shape "
                                       f"{tuple(t.shape)}, expected the static {self.shape}")
                op = _Op(m, t.contiguous(), is_send=True)
                self._sends.append(op)
                if not self.ordered_sends:
                    ops.append((op, dist.isend))
                    continue
                self._out_ready[msg_key(m)] = op
                dst, order = m.dst_rank, self._outgoing[m.dst_rank]
                while self._out_next[dst] < len(order) and order[self._out_next[dst]] in self._out_ready:
                    ops.append((self._out_ready.pop(order[self._out_next[dst]]), dist.isend))
                    self._out_next[dst] += 1
            self._issue(ops)

    # ------------------------------------------------------------------ receiving
    def recv(self, m: Message) -> torch.Tensor:
        """The payload of ``m``, waiting for it if needed (posts its irecv if not done yet)."""
        key = msg_key(m)
        if m.local:
            return self._local.pop(key)
        if key not in self._recvs:
            self.post_recvs([m])
        op = self._recvs.pop(key)
        t = op.wait()
        self._record(op)
        return t

    def _record(self, op: _Op) -> None:
        tl = self.timeline
        if tl is None or not tl.enabled:
            return
        m = op.msg
        direction = "send" if op.is_send else "recv"
        peer = m.dst_rank if op.is_send else m.src_rank
        tl.add(f"{direction} {m.kind} mb{m.microbatch}", "p2p", op.t_post, op.t_done, tid=2,
               microbatch=m.microbatch, kind=m.kind, direction=direction, peer=peer,
               src_stage=m.src_stage, dst_stage=m.dst_stage, bytes=op.tensor.numel() * op.tensor.element_size())
