"""One agreed decision per step, taken before the optimizer step: is any rank's loss or gradient
non-finite, and has any rank received a preemption notice?

The global grad norm is not enough to see a NaN everywhere: replicated gradients are counted on
one DP copy only (parallel/grads.py), so a NaN on another replica would not reach it. Each rank
therefore checks its own loss and gradients, and one all-reduce of a world-sized vector (a slot per
rank, plus one for preemption) gives every rank the same verdict and the names of the bad ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.moe import Experts
from parallel.grads import grad_of
from trainer.checkpoint import tensor_items

ON_NONFINITE = ("skip", "stop")


class NonFiniteError(Exception):
    """train.on_nonfinite=stop: the message names the step, the rank(s) and the first parameter.
    Not a RuntimeError, which the loop reads as a failed collective."""


@dataclass
class StepVerdict:
    nonfinite_ranks: list[int] = field(default_factory=list)
    preempt: bool = False

    @property
    def nonfinite(self) -> bool:
        return bool(self.nonfinite_ranks)


def local_nonfinite(loss_values: list[float], named_params) -> bool:
    """True when this rank's loss or any of its gradients holds a NaN or an Inf."""
    if not all(math.isfinite(v) for v in loss_values):
        return True
    grads = (grad_of(p) for _, p in named_params)
    return any(g is not None and not bool(torch.isfinite(g).all()) for g in grads)


def agree(local_bad: bool, preempt: bool, rank: int, world_size: int) -> StepVerdict:
    """The step's verdict, identical on every rank (one all-reduce when world_size > 1)."""
    flags = torch.zeros(world_size + 1, dtype=torch.float32)
    flags[rank] = float(local_bad)
    flags[world_size] = float(preempt)
    if world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad = [r for r in range(world_size) if flags[r] > 0]
    return StepVerdict(nonfinite_ranks=bad, preempt=bool(flags[world_size] > 0))


def first_nonfinite_name(named_params, modules: dict[str, torch.nn.Module]) -> str:
    """Global name of this rank's first parameter whose gradient is not finite; a routed expert is
    named by its global expert id (`layers.3.ffn.experts.w1.7`), as in the checkpoint."""
    for name, p in named_params:
        grad = grad_of(p)
        if grad is None or bool(torch.isfinite(grad).all()):
            continue
        for key, g in tensor_items({name: grad}, modules).items():
            if not bool(torch.isfinite(g).all()):
                return key
    return "(none: the loss is not finite)"


def stop_message(step: int, verdict: StepVerdict, names_by_rank: dict[int, str]) -> str:
    ranks = ", ".join(str(r) for r in verdict.nonfinite_ranks)
    first = verdict.nonfinite_ranks[0]
    return (f"train.on_nonfinite=stop: non-finite loss or gradient at step {step} on rank(s) {ranks}; "
            f"first parameter with a non-finite gradient (rank {first}): {names_by_rank[first]}. "
            f"No checkpoint was written from this state")


def gather_names(name: str, world_size: int) -> dict[int, str]:
    """Every rank's first non-finite parameter name (a collective: all ranks agreed to stop)."""
    if world_size == 1:
        return {0: name}
    out: list = [None] * world_size
    dist.all_gather_object(out, name)
    return dict(enumerate(out))


def inject_nonfinite(named_params, modules: dict[str, torch.nn.Module]) -> str:
    """debug.inject_nonfinite_at_step: a NaN in one gradient of this rank, preferably a routed
    expert's (to exercise global expert naming). Returns the global name it expects to be reported."""
    grads = [(n, p) for n, p in named_params if grad_of(p) is not None]
    experts = [(n, p) for n, p in grads if isinstance(modules.get(n.rsplit(".", 1)[0]), Experts)]
    name, p = (experts or grads)[0]
    target = grad_of(p)[0] if experts else grad_of(p)
    target[(0,) * target.dim()] = float("nan")
    return f"{name}.{modules[name.rsplit('.', 1)[0]].first_expert}" if experts else name
