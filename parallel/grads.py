"""Global gradient norm and clipping over a sharded model.

Each gradient element must be counted exactly once in the norm, whatever the layout:
non-expert gradients are replicated over DP (count on one copy: they are identical after the
DP reduction), expert gradients are distinct over EP and replicated over expert-DP, stages are
distinct over PP. So: Σ expert² is summed over the EP group, then everything over the PP group.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from parallel.param_groups import is_expert_param


def global_grad_norm(named_params, ep_group=None, pp_group=None) -> float:
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for name, p in named_params:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if is_expert_param(name):
            expert += sq
        else:
            dense += sq
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
            if p.grad is not None:
                p.grad.mul_(coef)


def count_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def optimizer_state_bytes(optimizer: Optional[torch.optim.Optimizer]) -> int:
    if optimizer is None:
        return 0
    return count_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
