"""The pipeline runtime: executes ``schedule.actions[pp_rank]`` exactly, in order.

``PipelineEngine(schedule, modules, topo)`` satisfies parallel/step_engine.py's contract
(``forward_backward(micro_batches) -> StepLosses``); ``modules[c]`` is the stage module of chunk
``c`` (``stages.build_stage_modules``). Every rank of a pipeline gets the same micro-batches (the
data depend only on the dp index): the first stage embeds ``tokens[:, :-1]``, the stage that holds
the head computes ``head_loss`` with ``tokens[:, 1:]`` (DualPipe: rank pp-1 for the forward
direction, rank 0 for the reverse one), so token ids never travel.

Actions
  F   stage forward. The stage input is a leaf ``x`` (the received activation, or on the first
      stage the DETACHED embedding output, so that B/W can treat all stages alike); the output is
      sent (p2p, non-blocking) or, on the last stage, is ``loss / n_micro``.
  B   full: ``autograd.backward`` of the output with the received grad, then the input grad is
      sent (first stage: the embedding backward runs right after).
      split (``full=False``, zero-bubble): input grads only — see ``backward_input``; the weight
      grads run in the later ``W``.
  W   the deferred weight grads (``backward_weight``; first stage: + the embedding backward).
  FB  the forward of one micro-batch and the backward of another, overlapped (threads on CPU):
      parallel/pipeline/fb_pair.py.

Communication overlap that exists on every backend: a stage's output/input-grad send is posted
non-blocking as soon as it is computed; the receives of the next action are posted before the
current action computes (prefetch), so transfers run while the rank computes another micro-batch
(gloo: on its transport thread; the timeline records true completion times).

Weight-gradient split (``B`` with ``full=False`` then ``W``): parallel/pipeline/weight_grad.py.

Evaluation (``evaluate``): the forward-only pass of parallel/pipeline/evaluation.py.

After the last action: every parameter that this rank and its stage-pair partner both hold
(DualPipe: both stages; 1F1B: only the tied embedding of ranks 0 and pp-1) gets its gradient
SUMMED over ``topo.stage_pair_group`` (``parallel.grads.sum_over_stage_pair``). The data-parallel
reduction is left to the trainer (``parallel.grads.allreduce_gradients(engine.modules, topo)``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from model import DeepSeekV3
from parallel.step_engine import StageEngine, StepLosses
from parallel.dispatch import global_expert_load
from model.mixed import COMPUTE_DTYPE, is_low_precision
from parallel.grads import global_grad_norm, sum_over_stage_pair

from .evaluation import ForwardOnly
from .fb_pair import FBPairs, RunningAction
from .p2p import P2P
from .schedule import Action, Kind, Schedule, ScheduleError
from .timeline import TimedDispatcher, Timeline, gather_and_write
from .weight_grad import WeightGradState, backward_input, backward_weight


# ============================================================================ the engine
@dataclass
class _Slot:
    """Live state of one (micro-batch, chunk) between its F and its B (and W)."""

    x: torch.Tensor  # stage input (leaf)
    out: torch.Tensor  # stage output, or loss / n_micro on the last stage
    h0: Optional[torch.Tensor] = None  # first stage: the embedding output (with graph)
    dx: Optional[torch.Tensor] = None  # first stage, split B: grad of the embedding output
    wstate: Optional[WeightGradState] = None


class PipelineEngine(StageEngine):
    """Run one rank's share of a pipeline schedule (see the module docstring).

    schedule: the Schedule (``get_schedule`` / ``stages.plan_pipeline``); modules: one stage
    module per chunk of this rank; topo: the Topology (pp_rank, pp_group, stage_pair_group, ...).
    overlap: "auto" (threads on CPU, sequential on CUDA) | "thread" | "none" — how FB pairs run.
    autocast: the forward-context factory of trainer/precision.py's ``apply_precision`` (entered
    around every stage forward, in the thread that runs it); None = no context.
    timeline: a Timeline to record into when its ``enabled`` flag is set.
    """

    def __init__(self, schedule: Schedule, modules: Sequence[DeepSeekV3], topo: Any, *,
                 overlap: str = "auto", timeline: Optional[Timeline] = None,
                 autocast: Optional[Callable[[], ContextManager]] = None):
        self.schedule, self.topo = schedule, topo
        self._autocast = autocast or contextlib.nullcontext
        self.modules = list(modules)
        self.pp_rank = topo.pp_rank
        if schedule.pp != topo.pp:
            raise ScheduleError(f"schedule {schedule.name} is for pp={schedule.pp}, topology has parallel.pp={topo.pp}")
        if len(self.modules) != schedule.n_chunks(self.pp_rank):
            raise ScheduleError(f"rank {self.pp_rank} holds {schedule.n_chunks(self.pp_rank)} chunks, "
                                f"got {len(self.modules)} modules")
        self.actions = schedule.actions[self.pp_rank]
        self.stages = [schedule.stage_of(self.pp_rank, c) for c in range(len(self.modules))]
        p0 = next(self.modules[0].parameters())
        # activations and their grads travel in the compute dtype (fp32 under BF16 weights too)
        self.device, self.dtype = p0.device, (COMPUTE_DTYPE if is_low_precision(p0) else p0.dtype)
        self.fb_pairs = FBPairs(self.modules, overlap, self.device.type)
        self.timeline = timeline or Timeline(rank=getattr(topo, "rank", self.pp_rank), enabled=False,
                                             label=self._label())
        ranks = getattr(topo, "pp_ranks", None) or list(range(schedule.pp))
        self.p2p = P2P(schedule, self.pp_rank, ranks, topo.pp_group, self.device, self.timeline)
        if topo.pp_group is not None and dist.get_backend(topo.pp_group) == "nccl":
            # NCCL: the first operation on a group must be a collective of all its ranks, not a
            # batch_isend_irecv touching only some of them
            dist.barrier(group=topo.pp_group)
        self._current = RunningAction()
        self._params = self._unique_params()
        self._shared_names, self._pair_same_stages = self._pair_info()
        self._wrapped_dispatchers = False
        self.last_step_s = 0.0
        self._io = self.p2p  # the P2P of the running pass (training or evaluate's)
        self._forward_only: Optional[ForwardOnly] = None  # evaluate's, built on first use
        self._mtp_lambda: Optional[float] = None  # the running step's λ (forward_backward's argument)
        # per micro-batch count: (schedule, P2P, ForwardOnly) — a batch-size ramp changes the count
        self._by_n: dict[int, tuple] = {}

    def set_schedule(self, schedule: Schedule) -> None:
        """Run the following steps with ``schedule`` (same pipeline and placement, another
        micro-batch count: a global batch ramp); its P2P plans are built once and kept."""
        if schedule is self.schedule:
            return
        if schedule.pp != self.schedule.pp or schedule.placement != self.schedule.placement:
            raise ScheduleError(f"set_schedule: {schedule.name} places stages differently from {self.schedule.name}")
        self._by_n[self.schedule.n_microbatches] = (self.schedule, self.p2p, self._forward_only)
        cached = self._by_n.get(schedule.n_microbatches)
        if cached is not None and cached[0] is schedule:
            self.schedule, self.p2p, self._forward_only = cached
        else:
            self.schedule, self._forward_only = schedule, None
            self.p2p = P2P(schedule, self.pp_rank, self.p2p.ranks, self.topo.pp_group, self.device, self.timeline)
        self.actions = schedule.actions[self.pp_rank]
        self._io = self.p2p

    def _label(self) -> str:
        t = self.topo
        stages = ",".join(str(s) for s in self.schedule.placement[self.pp_rank])
        return (f"rank {getattr(t, 'rank', self.pp_rank)} (pp {self.pp_rank}, dp {getattr(t, 'dp_rank', 0)}; "
                f"stages {stages})")

    # ------------------------------------------------------------------ parameters
    def _unique_params(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for m in self.modules:
            for n, p in m.named_parameters():
                if n in out and out[n] is not p:
                    raise RuntimeError(f"two chunks of rank {self.pp_rank} hold different tensors named {n}")
                out[n] = p
        return out

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of this rank once (the shared embedding once), sorted by name."""
        return sorted(self._params.items())

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def _pair_info(self) -> tuple[list[str], bool]:
        """Names held by both this rank and its stage-pair partner (exchanged once at build)."""
        t = self.topo
        group = getattr(t, "stage_pair_group", None)
        ranks = getattr(t, "stage_pair_ranks", [getattr(t, "rank", 0)])
        if group is None or len(ranks) < 2:
            return [], False
        mine = {"params": sorted(self._params), "moe": sorted(self.moe_layers())}
        theirs: list = [None] * len(ranks)
        dist.all_gather_object(theirs, mine, group=group)
        other = theirs[1 - dist.get_rank(group)]
        shared = sorted(set(mine["params"]) & set(other["params"]))
        same = bool(mine["moe"]) and mine["moe"] == other["moe"]
        return shared, same

    def grad_norm_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The (name, param) this rank counts in the global grad norm so that every element is
        counted exactly once over the pipeline: a parameter both pair ranks hold (DualPipe's two
        stage copies, the tied embedding) is counted on the lower pipeline index only."""
        partner_pp = self.schedule.pp - 1 - self.pp_rank
        skip = set(self._shared_names) if partner_pp < self.pp_rank else set()
        return [(n, p) for n, p in self.named_parameters() if n not in skip]

    def grad_norm(self, sharded: bool = False) -> float:
        """Global L2 norm of the gradients (call after the DP reduction): sums experts over EP (or,
        `sharded` after a reduce-scatter, everything over DP) and everything over the pipeline
        group, each element once."""
        return global_grad_norm(self.grad_norm_parameters(), ep_group=getattr(self.topo, "ep_group", None),
                                pp_group=self.topo.pp_group, dp_group=self.topo.dp_group if sharded else None)

    # ------------------------------------------------------------------ MoE bookkeeping
    def expert_loads(self) -> dict[str, torch.Tensor]:
        """Global tokens per expert of every MoE layer this rank holds: summed over the DP group
        and, where the partner holds the same layers (DualPipe), over the stage pair — each
        micro-batch's routing is counted once, on the copy that ran it."""
        return global_expert_load(self.modules, self.topo, stage_pair=self._pair_same_stages)

    # ------------------------------------------------------------------ the step
    def _check_micro_batches(self, micro_batches: Sequence[torch.Tensor]) -> tuple[int, ...]:
        n = self.schedule.n_microbatches
        if len(micro_batches) != n:
            raise ScheduleError(f"{self.schedule.name} was built for {n} micro-batches, got {len(micro_batches)} "
                                f"(train.global_batch / (parallel.dp * train.micro_batch))")
        shape = tuple(micro_batches[0].shape)
        if any(tuple(mb.shape) != shape for mb in micro_batches):
            raise ScheduleError("pipeline micro-batches must all have the same shape (static p2p shapes)")
        return shape

    def _execute(self, actions: Sequence[Action], p2p: P2P, micro_batches: Sequence[torch.Tensor],
                 shape: tuple[int, ...]) -> None:
        """Run ``actions`` in order over ``p2p``; the losses land in ``self.losses``."""
        self.tokens = list(micro_batches)
        self.n_micro = len(micro_batches)
        self._io = p2p
        p2p.begin_step((shape[0], shape[1] - 1, self.modules[0].cfg.dim), self.dtype)
        self.losses = StepLosses()
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.pending_w: dict[tuple[int, int], _Slot] = {}
        for i, act in enumerate(actions):
            # post this action's receives and prefetch the next one's, then wait for ours
            ahead = self.schedule.recvs(self.pp_rank, actions[i + 1]) if i + 1 < len(actions) else []
            p2p.post_recvs(self.schedule.recvs(self.pp_rank, act) + ahead)
            if act.kind is Kind.FB:
                self.fb_pairs.run(act, self._run)
            else:
                self._run(act)
        if self.slots or self.pending_w:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: unfinished (micro-batch, chunk) "
                               f"{sorted(self.slots) + sorted(self.pending_w)}")
        p2p.finish()
        self.tokens = []

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], mtp_lambda: Optional[float] = None) -> StepLosses:
        shape = self._check_micro_batches(micro_batches)
        self._mtp_lambda = mtp_lambda
        tl = self.timeline
        if tl.enabled:
            dist.barrier(group=self.topo.pp_group)
            tl.reset()
            self._wrap_dispatchers()
        t_start = time.perf_counter()
        self._execute(self.actions, self.p2p, micro_batches, shape)
        self._reduce_pair_grads()
        self.last_step_s = time.perf_counter() - t_start
        return self.losses

    def evaluate(self, micro_batches: Sequence[torch.Tensor]) -> StepLosses:
        """Losses of a forward-only pass (parallel/step_engine.py's contract; evaluation.py)."""
        shape = self._check_micro_batches(micro_batches)
        self._mtp_lambda = None  # the losses are recorded apart; λ only weighs the training backward
        if self._forward_only is None:
            self._forward_only = ForwardOnly(self.schedule, self.pp_rank, self.p2p.ranks, self.topo.pp_group,
                                             self.device)
        with self.eval_mode():
            self._execute(self._forward_only.actions, self._forward_only.p2p, micro_batches, shape)
        return self.losses

    def _run(self, a: Action, tid: int = 0) -> None:
        if a.kind is Kind.F:
            self._forward(a, tid)
        elif a.kind is Kind.B:
            self._backward(a, tid)
        elif a.kind is Kind.W:
            self._weight(a, tid)
        else:  # pragma: no cover - validated schedules only hold F/B/W/FB
            raise ScheduleError(f"cannot run {a}")

    # ------------------------------------------------------------------ F / B / W
    def _forward(self, a: Action, tid: int) -> None:
        mb, c = a.microbatch, a.chunk
        self._current.mb, self._current.tid = mb, tid
        mod, stage = self.modules[c], self.stages[c]
        last = stage == self.schedule.n_stages - 1
        tokens = self.tokens[mb]
        ids = tokens[:, :-1]
        recvs = self.schedule.recvs(self.pp_rank, a)
        t0 = time.perf_counter()
        h0 = None
        if stage != 0:
            x = self._io.recv(recvs[0]).requires_grad_(torch.is_grad_enabled())
        t1, c1 = time.perf_counter(), time.thread_time()
        with self._autocast():
            if stage == 0:
                h0 = mod.embed_tokens(ids)
                x = h0.detach().requires_grad_(torch.is_grad_enabled())
            h = mod.forward_layers(x, aux_scale=1.0 / self.n_micro)
            if last:
                o = mod.head_loss(h, ids, tokens[:, 1:], aux_scale=1.0 / self.n_micro, mtp_lambda=self._mtp_lambda)
                out = o.loss / self.n_micro
                self.losses.add(o.lm_loss, o.mtp_loss, 1.0 / self.n_micro)
            else:
                out = h
        self.timeline.add(f"F{mb}", "F", t1, time.perf_counter(), tid=tid, microbatch=mb, chunk=c, stage=stage,
                          wait_s=t1 - t0, cpu_s=time.thread_time() - c1)
        if torch.is_grad_enabled():  # kept for this micro-batch's B (not in evaluate)
            self.slots[(mb, c)] = _Slot(x=x, out=out, h0=h0)
        if not last:
            self._io.send([(m, h) for m in self.schedule.sends(self.pp_rank, a)])

    def _backward(self, a: Action, tid: int) -> None:
        mb, c = a.microbatch, a.chunk
        self._current.mb, self._current.tid = mb, tid
        slot = self.slots.pop((mb, c))
        stage = self.stages[c]
        recvs = self.schedule.recvs(self.pp_rank, a)
        t0 = time.perf_counter()
        grad = self._io.recv(recvs[0]) if recvs else None
        if grad is not None and grad.dtype != slot.out.dtype:
            grad = grad.to(slot.out.dtype)  # p2p buffers carry the compute dtype (self.dtype)
        t1, c1 = time.perf_counter(), time.thread_time()
        if a.full:
            torch.autograd.backward([slot.out], [grad] if grad is not None else None)
            dx = slot.x.grad if slot.x.grad is not None else torch.zeros_like(slot.x)
            if slot.h0 is not None:
                torch.autograd.backward([slot.h0], [dx])
        else:
            params = [p for p in self.modules[c].parameters() if p.requires_grad]
            (dx,), slot.wstate = backward_input([slot.out], [grad], [slot.x], params)
            if dx is None:
                dx = torch.zeros_like(slot.x)
            slot.dx = dx
            self.pending_w[(mb, c)] = slot
        self.timeline.add(f"B{mb}", "B" if a.full else "Bi", t1, time.perf_counter(), tid=tid, microbatch=mb,
                          chunk=c, stage=stage, full=a.full, wait_s=t1 - t0, cpu_s=time.thread_time() - c1)
        sends = self.schedule.sends(self.pp_rank, a)
        if sends:
            self._io.send([(m, dx) for m in sends])

    def _weight(self, a: Action, tid: int) -> None:
        mb, c = a.microbatch, a.chunk
        self._current.mb, self._current.tid = mb, tid
        slot = self.pending_w.pop((mb, c))
        t0, c0 = time.perf_counter(), time.thread_time()
        backward_weight(slot.wstate)
        if slot.h0 is not None:
            torch.autograd.backward([slot.h0], [slot.dx])
        self.timeline.add(f"W{mb}", "W", t0, time.perf_counter(), tid=tid, microbatch=mb, chunk=c,
                          stage=self.stages[c], cpu_s=time.thread_time() - c0)

    # ------------------------------------------------------------------ reductions
    def _reduce_pair_grads(self) -> None:
        if not self._shared_names:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        nbytes = sum_over_stage_pair([self._params[n] for n in self._shared_names], self.topo.stage_pair_group)
        self.timeline.add("stage-pair grad all-reduce", "p2p", t0, time.perf_counter(), tid=2,
                          bytes=nbytes, cpu_s=time.thread_time() - c0)

    # ------------------------------------------------------------------ timeline
    def _wrap_dispatchers(self) -> None:
        if self._wrapped_dispatchers:
            return
        for m in self.moe_layers().values():
            d = m.dispatcher
            if hasattr(d, "dispatch_async") and not isinstance(d, TimedDispatcher):
                m.dispatcher = TimedDispatcher(d, self.timeline, lambda: (self._current.mb, self._current.tid))
        self._wrapped_dispatchers = True

    def save_timeline(self, run_dir: str, png: bool = True) -> Optional[str]:
        """Collective over the default group: write run_dir/timeline.json (+ .png) on rank 0."""
        return gather_and_write(self.timeline, run_dir, png=png)

    def close(self) -> None:
        self.fb_pairs.close()
