"""ZeRO-1: AdamW whose states (and FP32 master weights) are split evenly over data parallelism.

Non-expert parameters are replicated over DP, so their optimizer state is partitioned over the
DP group; expert parameters are replicated over expert-DP (dp/ep copies), so theirs over the
expert-DP group. Each partition is parallel/partition.zero_partition: the part's parameters laid
end to end and cut into equal contiguous ranges (within one element), the layout of Megatron's and
DeepSpeed's flat buffers. The planner calls the same function, so its per-rank bytes are exact.

A step, per part: every rank holds the reduced gradient of at least its range (parallel/grads.py:
all of it after `allreduce_gradients`, only its range after `reduce_scatter_gradients`, which cuts
the part's gradients by this same partition, `zero_parts()`); it updates only its range: the FP32 master (the parameter itself when the weights are FP32), exp_avg and
exp_avg_sq in `moment_dtype` (updated in FP32, stored rounded); then the updated range, in the
weights' dtype, is all-gathered to the group's other ranks.

Why our own flat partition and not DeepSpeed's stage-1 optimizer (benchmarks/zero_memory.py compares
both): its state is a flat buffer of ITS OWN, keyed by buffer position, and it reduces gradients
from backward hooks it installs, which fights DualPipe's split backward (input-grad now,
weight-grad later) and the stage-pair gradient sum; its checkpoints reshard only through its own
universal-checkpoint tool. Here every piece of state keeps the global name of its parameter and
its position in it (`shards()`), so trainer/checkpoint.py saves it as DCP pieces that any other
layout reloads by name — no conversion step.

The update is the element-wise AdamW of torch.optim.AdamW (same operations in the same order),
so with FP32 weights and moments it reproduces the unsharded optimizer (tests/test_zero.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from parallel.grads import clear_grad, grad_nbytes, grad_of, group_size
from parallel.param_groups import optimizer_param_groups
from parallel.partition import zero_partition

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ParamShard:
    """This rank's piece [start, stop) (flat elements) of one parameter's optimizer state.
    `state`: kind → flat tensor of stop - start elements (exp_avg, exp_avg_sq, and master when the
    weights are not FP32), and "step" → the piece's AdamW step (a scalar). `ranges`: (global rank, start, stop) of every rank's piece of this
    parameter (for the checkpoint's global metadata)."""

    name: str
    param: torch.nn.Parameter
    start: int
    stop: int
    state: dict
    ranges: list


class _Part:
    """The optimizer of the non-expert (or of the expert) parameters over one replication group."""

    def __init__(self, groups: list[dict], group, zero: bool, moment_dtype: torch.dtype, name_of: dict):
        self.groups = groups
        self.params = [p for g in groups for p in g["params"]]
        self.group_of = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        self.group = group if zero and group_size(group) > 1 else None
        size = group_size(self.group)
        me = dist.get_rank(self.group) if self.group is not None else 0
        global_ranks = dist.get_process_group_ranks(self.group) if self.group is not None else \
            [dist.get_rank() if dist.is_initialized() else 0]
        partition = zero_partition([p.numel() for p in self.params], size)
        self.partition, self.me = partition, me
        self.shard_len = [sum(b - a for _, a, b in pcs) for pcs in partition]
        n = self.shard_len[me]
        needs_master = any(p.dtype != torch.float32 for p in self.params)
        self.master = torch.empty(n, dtype=torch.float32, device=self._device()) if needs_master else None
        self.exp_avg = torch.zeros(n, dtype=moment_dtype, device=self._device())
        self.exp_avg_sq = torch.zeros(n, dtype=moment_dtype, device=self._device())
        ranges: dict[int, list] = {}
        for r, pcs in enumerate(partition):
            for i, a, b in pcs:
                ranges.setdefault(i, []).append((global_ranks[r], a, b))
        self.pieces = []  # (param index, start, stop, offset in this rank's shard)
        self.shards: list[ParamShard] = []
        # AdamW's step per piece, a tensor (DCP loads it in place); a parameter without a gradient
        # is skipped and does not count the step, as torch.optim.AdamW does
        self.steps: list[torch.Tensor] = []
        off = 0
        for i, a, b in partition[me]:
            self.pieces.append((i, a, b, off))
            self.steps.append(torch.zeros((), dtype=torch.float32))
            st = {"exp_avg": self.exp_avg[off:off + b - a], "exp_avg_sq": self.exp_avg_sq[off:off + b - a],
                  "step": self.steps[-1]}
            if self.master is not None:
                st["master"] = self.master[off:off + b - a]
            self.shards.append(ParamShard(name_of[self.params[i]], self.params[i], a, b, st, ranges[i]))
            off += b - a
        self.load_master_from_weights()

    def _device(self) -> torch.device:
        return self.params[0].device

    def _flat(self, i: int) -> torch.Tensor:
        return self.params[i].detach().view(-1)

    @torch.no_grad()
    def load_master_from_weights(self) -> None:
        if self.master is not None:
            for i, a, b, off in self.pieces:
                self.master[off:off + b - a].copy_(self._flat(i)[a:b])

    def reset(self) -> None:
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        for t in self.steps:
            t.zero_()
        self.load_master_from_weights()

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.master, self.exp_avg, self.exp_avg_sq, *self.steps) if t is not None]

    @torch.no_grad()
    def step(self, betas: tuple[float, float], eps: float) -> None:
        beta1, beta2 = betas
        for gi, g in enumerate(self.groups):
            ks = [k for k, (i, *_) in enumerate(self.pieces)
                  if self.group_of[i] == gi and grad_of(self.params[i]) is not None]
            if not ks:
                continue
            pcs = [self.pieces[k] for k in ks]
            steps = []
            for k in ks:
                self.steps[k] += 1
                steps.append(float(self.steps[k]))
            lr, wd = g["lr"], g["weight_decay"]
            if self.master is not None:
                weights = [self.master[off:off + b - a] for i, a, b, off in pcs]
            else:
                weights = [self._flat(i)[a:b] for i, a, b, off in pcs]
            grads = [self._grad(i)[a:b].float() for i, a, b, off in pcs]
            m_store = [self.exp_avg[off:off + b - a] for i, a, b, off in pcs]
            v_store = [self.exp_avg_sq[off:off + b - a] for i, a, b, off in pcs]
            low = self.exp_avg.dtype != torch.float32
            m = [x.float() for x in m_store] if low else m_store
            v = [x.float() for x in v_store] if low else v_store
            # torch.optim.AdamW (foreach, decoupled weight decay), operation for operation
            if wd != 0:
                torch._foreach_mul_(weights, 1 - lr * wd)
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [(1 - beta2 ** s) ** 0.5 for s in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(weights, m, denom, [(lr / (1 - beta1 ** s)) * -1 for s in steps])
            if low:
                torch._foreach_copy_(m_store, m)
                torch._foreach_copy_(v_store, v)
            if self.master is not None:
                for (i, a, b, off), w in zip(pcs, weights):
                    self._flat(i)[a:b].copy_(w)
        self._gather()

    def _grad(self, i: int) -> torch.Tensor:
        return grad_of(self.params[i]).view(-1)

    @torch.no_grad()
    def _gather(self) -> None:
        """Every rank's updated range, in the weights' dtype, to every rank of the group."""
        if self.group is None:
            return
        dtypes = {p.dtype for p in self.params}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        width = max(self.shard_len)
        send = torch.zeros(width, dtype=dtype, device=self._device())
        off = 0
        for i, a, b, _ in self.pieces:
            send[off:off + b - a].copy_(self._flat(i)[a:b])
            off += b - a
        recv = [torch.empty_like(send) for _ in self.shard_len]
        dist.all_gather(recv, send, group=self.group)
        for r, pcs in enumerate(self.partition):
            if r == self.me:
                continue
            off = 0
            for i, a, b in pcs:
                self._flat(i)[a:b].copy_(recv[r][off:off + b - a])
                off += b - a


class ShardedAdamW:
    """AdamW over named parameters with ZeRO-1 sharding of its states (and FP32 master weights).

    named_params: (global name, parameter) of everything this rank trains (one stage, or both
    DualPipe stage copies). dp_group / edp_group: the groups over which non-expert / expert
    parameters are replicated (None = not replicated: this rank holds all of that part's state).
    moment_dtype: torch.float32 or torch.bfloat16 storage of exp_avg / exp_avg_sq.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 dp_group=None, edp_group=None, zero: bool = True, moment_dtype: torch.dtype = torch.float32):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        name_of = {p: n for n, p in named}
        self.betas, self.eps = betas, eps
        self.parts: list[_Part] = []
        for is_expert, groups in optimizer_param_groups(named, weight_decay):
            for g in groups:
                g["lr"] = lr
            self.parts.append(_Part(groups, edp_group if is_expert else dp_group, zero, moment_dtype, name_of))
        self.grad_bytes = 0  # gradient bytes held at the last step (measured there)

    # --- the torch.optim.Optimizer surface the trainer uses
    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.groups]

    def step(self) -> None:
        self.grad_bytes = grad_nbytes(p for part in self.parts for p in part.params if grad_of(p) is not None)
        for part in self.parts:
            part.step(self.betas, self.eps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            for p in part.params:
                if set_to_none:
                    clear_grad(p)
                elif grad_of(p) is not None:
                    grad_of(p).zero_()

    def zero_parts(self) -> list[tuple[list[torch.nn.Parameter], object]]:
        """(parameters in partition order, the group their state is sharded over, or None) per
        part: what parallel.grads.reduce_scatter_gradients cuts exactly as this optimizer does."""
        return [(part.params, part.group) for part in self.parts]

    # --- what this rank holds (for checkpoints and memory accounting)
    def shards(self) -> list[ParamShard]:
        """This rank's piece of every parameter's state, with its global name and position."""
        return [s for part in self.parts for s in part.shards]

    def reset_state(self) -> None:
        for part in self.parts:
            part.reset()

    def load_master_from_weights(self) -> None:
        """After loading weights without master copies (a checkpoint of FP32 weights)."""
        for part in self.parts:
            part.load_master_from_weights()

    def state_bytes(self) -> int:
        """Bytes of the optimizer state on this rank: its ranges of master weights and moments,
        plus one fp32 step counter per parameter piece."""
        return sum(t.numel() * t.element_size() for part in self.parts for t in part.state_tensors())


def unsharded_state_bytes(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> int:
    """What plain AdamW would hold for these parameters (fp32 moments + a step per tensor)."""
    return sum(2 * p.numel() * p.element_size() + 4 for _, p in named_params if p.requires_grad)


def moment_dtype_for(moment_dtype: str, precision: str) -> torch.dtype:
    """optim.moment_dtype: auto = bf16 under bf16/fp8 (the paper's recipe), fp32 under fp32."""
    if moment_dtype == "auto":
        moment_dtype = "fp32" if precision == "fp32" else "bf16"
    return MOMENT_DTYPES[moment_dtype]


def build_optimizer(named_params, train_cfg, topo: Optional[object], zero: bool = True,
                    moment_dtype: torch.dtype = torch.float32) -> ShardedAdamW:
    return ShardedAdamW(
        named_params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
        dp_group=getattr(topo, "dp_group", None), edp_group=getattr(topo, "edp_group", None), zero=zero,
        moment_dtype=moment_dtype)
