"""Pipeline-schedule IR: per-rank action lists as pure data (no torch, no processes).

One source of truth: the generators (``one_f_one_b``, ``dualpipe``, ``dualpipev``) build a
:class:`Schedule`; the simulator replays it with unit costs and the distributed runtime executes
exactly the same per-rank action lists.

Vocabulary
----------
* **stage** ``s`` — a contiguous slice of the model; ``0 .. n_stages-1``. Stage 0 owns the
  embedding, stage ``n_stages-1`` owns the head / MTP / loss.
* **chunk** ``c`` — index of a stage *copy* held by a rank; ``placement[rank][chunk]`` is the
  stage it runs. 1F1B: one chunk per rank. DualPipe: chunk 0 = the forward direction
  (micro-batches enter at rank 0; rank r runs stage r), chunk 1 = the reverse direction
  (micro-batches enter at rank pp-1; rank r runs stage pp-1-r). DualPipeV: chunk 0 = stage r on
  the way down the V, chunk 1 = stage 2pp-1-r on the way back.
* **path** — the sequence of ``(rank, chunk)`` a micro-batch visits, one per stage
  (``paths[p][s]``); ``mb_path[m]`` says which path micro-batch ``m`` takes. DualPipe has two
  paths (one per direction, micro-batches ``0..n/2-1`` forward, ``n/2..n-1`` reverse); 1F1B and
  DualPipeV have one.

Actions
-------
* ``F``  forward of (microbatch, chunk).
* ``B``  backward of (microbatch, chunk). ``full=True``: full backward (input grads *and*
  weight grads; no W follows). ``full=False``: input-grad backward only; the weight grads are
  computed by a later ``W`` of the same (microbatch, chunk) (zero-bubble split).
* ``W``  deferred weight-grad backward of (microbatch, chunk) whose ``B`` had ``full=False``.
* ``FB`` an overlapped pair: the forward ``F`` of one (microbatch, chunk) and the backward ``B``
  of another, executed interleaved (DualPipe's compute/communication overlap). Its halves are
  ``fb.forward`` and ``fb.backward``; the halves' inputs are needed before it starts and both
  outputs leave when it ends.

Communication is implied by the placement: the output of ``F`` on stage s goes to stage s+1 of
the same micro-batch's path, the input-grad of ``B`` on stage s goes to stage s-1.
:meth:`Schedule.recvs` / :meth:`Schedule.sends` derive those messages for the runtime (a message
whose source and destination rank coincide is ``local``: hand the tensor over in memory).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Dict, Iterator, List, Optional, Sequence, Tuple


class ScheduleError(ValueError):
    """An impossible schedule request (bad pp / micro-batch count) or an invalid schedule."""


class Kind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    FB = "FB"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@dataclass(frozen=True)
class Action:
    """One unit of work on one rank. Build with :func:`F`, :func:`B`, :func:`W`, :func:`FB`.

    ``microbatch``/``chunk`` are set for F, B and W and are ``None`` for FB, whose two halves
    are ``forward`` (an F action) and ``backward`` (a B action).
    """

    kind: Kind
    microbatch: Optional[int] = None
    chunk: Optional[int] = None
    full: bool = True  # B only: True = full backward (incl. weight grads), False = W split off
    forward: Optional["Action"] = None  # FB only
    backward: Optional["Action"] = None  # FB only

    def parts(self) -> Tuple["Action", ...]:
        """The elementary actions (F, B or W) in execution order: FB -> (forward, backward)."""
        if self.kind is Kind.FB:
            return (self.forward, self.backward)  # type: ignore[return-value]
        return (self,)

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            return f"FB[{self.forward}|{self.backward}]"
        suffix = "" if (self.kind is not Kind.B or self.full) else "i"
        return f"{self.kind.value}{suffix}{self.microbatch}.{self.chunk}"

    __repr__ = __str__


def F(microbatch: int, chunk: int = 0) -> Action:
    return Action(Kind.F, microbatch, chunk)


def B(microbatch: int, chunk: int = 0, full: bool = True) -> Action:
    return Action(Kind.B, microbatch, chunk, full=full)


def W(microbatch: int, chunk: int = 0) -> Action:
    return Action(Kind.W, microbatch, chunk)


def FB(forward: Action, backward: Action) -> Action:
    if forward.kind is not Kind.F or backward.kind is not Kind.B:
        raise ScheduleError(f"FB needs an F and a B half, got {forward} and {backward}")
    return Action(Kind.FB, forward=forward, backward=backward)


@dataclass(frozen=True)
class Message:
    """A point-to-point transfer implied by the schedule.

    ``kind`` is ``"act"`` (output of F on ``src_stage`` -> input of F on ``src_stage+1``) or
    ``"grad"`` (input-grad of B on ``src_stage`` -> output-grad of B on ``src_stage-1``).
    """

    kind: str
    microbatch: int
    src_rank: int
    src_chunk: int
    src_stage: int
    dst_rank: int
    dst_chunk: int
    dst_stage: int

    @property
    def local(self) -> bool:
        """Source and destination are the same rank (DualPipeV's turn of the V): no p2p."""
        return self.src_rank == self.dst_rank


Loc = Tuple[int, int]  # (rank, chunk)


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the placement metadata the runtime needs."""

    name: str
    pp: int
    n_microbatches: int
    n_stages: int
    placement: Tuple[Tuple[int, ...], ...]  # placement[rank][chunk] = stage index
    paths: Tuple[Tuple[Loc, ...], ...]  # paths[p][stage] = (rank, chunk)
    mb_path: Tuple[int, ...]  # mb_path[microbatch] = index into paths
    actions: Tuple[Tuple[Action, ...], ...]  # actions[rank] = ordered list

    # ---------------------------------------------------------------- placement queries
    def n_chunks(self, rank: int) -> int:
        return len(self.placement[rank])

    def stage_of(self, rank: int, chunk: int) -> int:
        """Model stage run by ``chunk`` of ``rank``."""
        return self.placement[rank][chunk]

    def path(self, microbatch: int) -> Tuple[Loc, ...]:
        return self.paths[self.mb_path[microbatch]]

    def loc(self, microbatch: int, stage: int) -> Loc:
        """(rank, chunk) that runs ``stage`` for ``microbatch``."""
        return self.path(microbatch)[stage]

    def holders(self, stage: int) -> List[Loc]:
        """Every (rank, chunk) holding a copy of ``stage``. DualPipe: two copies whose gradients
        must be summed (over this pair, then over DP) before the optimizer step."""
        return [(r, c) for r, chunks in enumerate(self.placement)
                for c, s in enumerate(chunks) if s == stage]

    def is_first_stage(self, rank: int, chunk: int) -> bool:
        return self.stage_of(rank, chunk) == 0

    def is_last_stage(self, rank: int, chunk: int) -> bool:
        """The loss is computed here (the F output is not sent; B starts from the loss)."""
        return self.stage_of(rank, chunk) == self.n_stages - 1

    def neighbours(self, rank: int) -> List[int]:
        """Other ranks this rank exchanges activations/gradients with."""
        peers = set()
        for path in self.paths:
            for s, (r, _) in enumerate(path):
                if r != rank:
                    continue
                for t in (s - 1, s + 1):
                    if 0 <= t < self.n_stages and path[t][0] != rank:
                        peers.add(path[t][0])
        return sorted(peers)

    def microbatches_of(self, path_index: int) -> List[int]:
        return [m for m, p in enumerate(self.mb_path) if p == path_index]

    # ---------------------------------------------------------------- implied communication
    def _msg(self, kind: str, mb: int, src_stage: int, dst_stage: int) -> Message:
        sr, sc = self.loc(mb, src_stage)
        dr, dc = self.loc(mb, dst_stage)
        return Message(kind, mb, sr, sc, src_stage, dr, dc, dst_stage)

    def recvs(self, rank: int, action: Action) -> List[Message]:
        """Messages ``action`` on ``rank`` must receive before it starts (FB: both halves)."""
        out = []
        for a in action.parts():
            s = self.stage_of(rank, a.chunk)
            if a.kind is Kind.F and s > 0:
                out.append(self._msg("act", a.microbatch, s - 1, s))
            elif a.kind is Kind.B and s < self.n_stages - 1:
                out.append(self._msg("grad", a.microbatch, s + 1, s))
        return out

    def sends(self, rank: int, action: Action) -> List[Message]:
        """Messages ``action`` on ``rank`` produces when it ends (FB: both halves)."""
        out = []
        for a in action.parts():
            s = self.stage_of(rank, a.chunk)
            if a.kind is Kind.F and s < self.n_stages - 1:
                out.append(self._msg("act", a.microbatch, s, s + 1))
            elif a.kind is Kind.B and s > 0:
                out.append(self._msg("grad", a.microbatch, s, s - 1))
        return out

    def send_order(self) -> Dict[Tuple[int, int], List[Message]]:
        """For each (src_rank, dst_rank) pair, the non-local messages in the sender's order.

        A backend that matches p2p messages by order rather than by tag (NCCL) must post the
        receiver's ``irecv``\\ s for that pair in exactly this order (receiving ahead of need
        and buffering where the receiver consumes in a different order)."""
        order: Dict[Tuple[int, int], List[Message]] = {}
        for r, acts in enumerate(self.actions):
            for a in acts:
                for m in self.sends(r, a):
                    if not m.local:
                        order.setdefault((m.src_rank, m.dst_rank), []).append(m)
        return order

    def __str__(self) -> str:
        lines = [f"{self.name}: pp={self.pp} n_microbatches={self.n_microbatches} "
                 f"n_stages={self.n_stages}"]
        for r, acts in enumerate(self.actions):
            lines.append(f"  rank {r} {list(self.placement[r])}: " + " ".join(map(str, acts)))
        return "\n".join(lines)


def make_schedule(name: str, pp: int, n_microbatches: int, n_stages: int,
                  placement: Sequence[Sequence[int]], paths: Sequence[Sequence[Loc]],
                  mb_path: Sequence[int], actions: Sequence[Sequence[Action]]) -> Schedule:
    """Build a :class:`Schedule` from lists (converted to tuples) and validate it."""
    sched = Schedule(
        name=name, pp=pp, n_microbatches=n_microbatches, n_stages=n_stages,
        placement=tuple(tuple(p) for p in placement),
        paths=tuple(tuple((int(r), int(c)) for r, c in p) for p in paths),
        mb_path=tuple(mb_path),
        actions=tuple(tuple(a) for a in actions),
    )
    validate(sched)
    return sched


# -------------------------------------------------------------------- validation
def _key(rank: int, a: Action) -> Tuple[int, int, int]:
    return (a.microbatch, rank, a.chunk)


def validate(schedule: Schedule, check_deadlock: bool = True) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` is complete and locally consistent.

    Checks: shapes of the metadata; every path visits stage s on a (rank, chunk) placed at s;
    every action runs on a (rank, chunk) on its micro-batch's path; every (stage, microbatch) gets
    exactly one F and one B, plus exactly one W iff that B is split (``full=False``); on each rank
    F precedes B precedes W for the same (microbatch, chunk) (FB: its F half counts first); and,
    with ``check_deadlock``, that the ranks can execute their lists in order when each action
    waits only for its received inputs (non-blocking sends).
    """
    s = schedule
    if s.pp < 1 or len(s.actions) != s.pp or len(s.placement) != s.pp:
        raise ScheduleError(f"{s.name}: need pp={s.pp} >= 1 action lists and placements")
    if s.n_microbatches < 1 or len(s.mb_path) != s.n_microbatches:
        raise ScheduleError(f"{s.name}: mb_path must have one entry per micro-batch")
    for p, path in enumerate(s.paths):
        if len(path) != s.n_stages:
            raise ScheduleError(f"{s.name}: path {p} has {len(path)} hops, want {s.n_stages}")
        for st, (r, c) in enumerate(path):
            if not (0 <= r < s.pp and 0 <= c < len(s.placement[r])) or s.placement[r][c] != st:
                raise ScheduleError(f"{s.name}: path {p} puts stage {st} on rank {r} chunk {c}, "
                                    f"which is not placed there")
    for m, p in enumerate(s.mb_path):
        if not 0 <= p < len(s.paths):
            raise ScheduleError(f"{s.name}: micro-batch {m} has unknown path {p}")

    seen_f: Dict[Tuple[int, int, int], int] = {}
    seen_b: Dict[Tuple[int, int, int], Action] = {}
    seen_w: Dict[Tuple[int, int, int], int] = {}
    for r, acts in enumerate(s.actions):
        for i, act in enumerate(acts):
            if act.kind is Kind.FB:
                if act.forward is None or act.backward is None or \
                        act.forward.kind is not Kind.F or act.backward.kind is not Kind.B:
                    raise ScheduleError(f"{s.name}: rank {r} action {i}: malformed FB {act}")
            for a in act.parts():
                where = f"{s.name}: rank {r} action {i} ({act})"
                if a.microbatch is None or not 0 <= a.microbatch < s.n_microbatches:
                    raise ScheduleError(f"{where}: micro-batch out of range")
                if a.chunk is None or not 0 <= a.chunk < len(s.placement[r]):
                    raise ScheduleError(f"{where}: chunk out of range")
                stage = s.placement[r][a.chunk]
                if s.loc(a.microbatch, stage) != (r, a.chunk):
                    raise ScheduleError(f"{where}: micro-batch {a.microbatch} does not pass "
                                        f"through rank {r} chunk {a.chunk}")
                k = _key(r, a)
                if a.kind is Kind.F:
                    if k in seen_f:
                        raise ScheduleError(f"{where}: second F of micro-batch {a.microbatch} "
                                            f"on stage {stage}")
                    seen_f[k] = i
                elif a.kind is Kind.B:
                    if k in seen_b:
                        raise ScheduleError(f"{where}: second B of micro-batch {a.microbatch} "
                                            f"on stage {stage}")
                    if k not in seen_f:
                        raise ScheduleError(f"{where}: B before its F")
                    seen_b[k] = a
                elif a.kind is Kind.W:
                    if k in seen_w:
                        raise ScheduleError(f"{where}: second W")
                    if k not in seen_b:
                        raise ScheduleError(f"{where}: W before its B")
                    if seen_b[k].full:
                        raise ScheduleError(f"{where}: W after a full backward")
                    seen_w[k] = i
                else:
                    raise ScheduleError(f"{where}: unknown action kind")
    for m in range(s.n_microbatches):
        for st, (r, c) in enumerate(s.path(m)):
            k = (m, r, c)
            if k not in seen_f or k not in seen_b:
                raise ScheduleError(f"{s.name}: micro-batch {m} misses its "
                                    f"{'F' if k not in seen_f else 'B'} on stage {st} "
                                    f"(rank {r} chunk {c})")
            if not seen_b[k].full and k not in seen_w:
                raise ScheduleError(f"{s.name}: micro-batch {m} stage {st} has a split B "
                                    f"but no W")
    if check_deadlock:
        replay_order(s)


def replay_order(schedule: Schedule) -> List[Tuple[int, int]]:
    """A causal execution order [(rank, action index), ...] of the whole schedule.

    Each rank runs its list in order; an action may run once every message it receives has been
    produced (sends never block). Raises :class:`ScheduleError` on a deadlock.
    """
    s = schedule
    produced = set()  # (kind, microbatch, src_stage)
    idx = [0] * s.pp
    order: List[Tuple[int, int]] = []
    total = sum(len(a) for a in s.actions)
    while len(order) < total:
        progress = False
        for r in range(s.pp):
            while idx[r] < len(s.actions[r]):
                act = s.actions[r][idx[r]]
                if any((m.kind, m.microbatch, m.src_stage) not in produced
                       for m in s.recvs(r, act)):
                    break
                for m in s.sends(r, act):
                    produced.add((m.kind, m.microbatch, m.src_stage))
                order.append((r, idx[r]))
                idx[r] += 1
                progress = True
        if not progress:
            stuck = {r: str(s.actions[r][idx[r]]) for r in range(s.pp)
                     if idx[r] < len(s.actions[r])}
            raise ScheduleError(f"{s.name}: deadlock, ranks wait at {stuck}")
    return order


def forward_only(schedule: Schedule) -> Schedule:
    """The schedule's forward passes alone (evaluation): every rank keeps its F actions in their
    training order (FB pairs give their F half), on the same placement and paths.

    Each channel then carries the same activation messages in the same order, and the lists cannot
    deadlock where the training lists do not: dropping actions only removes waits. ``replay_order``
    checks it anyway. Not a training schedule (no B), so :func:`validate` would reject it."""
    fwd = replace(schedule, name=f"{schedule.name}-forward-only", actions=tuple(
        tuple(a for a in iter_parts(acts) if a.kind is Kind.F) for acts in schedule.actions))
    replay_order(fwd)
    return fwd


def iter_parts(actions: Sequence[Action]) -> Iterator[Action]:
    for act in actions:
        yield from act.parts()
