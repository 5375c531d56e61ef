"""ZeRO-1: AdamW states sharded over data parallelism, per parameter.

Non-expert parameters are replicated over DP, so their AdamW states are partitioned over the DP
group; expert parameters are replicated over expert-DP (dp/ep copies), so theirs are partitioned
over the expert-DP group. Each partition is torch's ZeroRedundancyOptimizer: every parameter is
OWNED by one rank of its group, which keeps its moments, updates it, and broadcasts the new
values after the step. Gradients are all-reduced beforehand (parallel.grads.allreduce_gradients;
gloo has no reduce-scatter), so the global grad norm and clipping see full gradients.

Why whole-parameter ownership rather than DeepSpeed's flat partitions: an owned parameter keeps
its optimizer state under its own name, so checkpoints (trainer/checkpoint.py, DCP) store
"optim.<param>.exp_avg" from whichever rank owns it and any other layout reloads it by name —
resharding needs no conversion step. DeepSpeed's stage-1 optimizer flattens parameters into its
own buffers and reduces gradients from backward hooks it installs, which fights DualPipe's split
backward (input-grad now, weight-grad later) and the stage-pair gradient sum, and its
checkpoints reshard only through its own universal-checkpoint tool.

The update is element-wise AdamW on the same fp32 numbers as the unsharded optimizer, so a
ZeRO-1 run matches a replicated one to round-off (tests/test_zero.py).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from parallel.grads import group_size, optimizer_state_bytes
from parallel.param_groups import optimizer_param_groups


class ShardedAdamW:
    """AdamW over named parameters with ZeRO-1 sharding of the states.

    named_params: (global name, parameter) of everything this rank trains (one stage, or both
    DualPipe stage copies). dp_group / edp_group: the groups over which non-expert / expert
    parameters are replicated (None = not replicated: a plain AdamW for that part).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 dp_group=None, edp_group=None, zero: bool = True):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.name_of = {p: n for n, p in named}
        self.optimizers: list[torch.optim.Optimizer] = []
        defaults = dict(lr=lr, betas=betas, eps=eps, foreach=True)
        for is_expert, groups in optimizer_param_groups(named, weight_decay):
            group = edp_group if is_expert else dp_group
            if zero and group_size(group) > 1:
                opt = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                              process_group=group, **defaults,
                                              weight_decay=groups[0]["weight_decay"])
                for g in groups[1:]:
                    opt.add_param_group(g)
            else:
                opt = torch.optim.AdamW(groups, **defaults)
            self.optimizers.append(opt)

    # --- the torch.optim.Optimizer surface the trainer uses
    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    # --- what this rank owns (for checkpoints and memory accounting)
    def _local(self, opt) -> torch.optim.Optimizer:
        return opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt

    def owned(self) -> list[tuple[str, torch.nn.Parameter, dict]]:
        """(name, parameter, AdamW state) for every parameter whose state lives on this rank.
        States not created yet (before the first step) are materialised at zero."""
        out = []
        for opt in self.optimizers:
            local = self._local(opt)
            for g in local.param_groups:
                for p in g["params"]:
                    st = local.state[p]
                    if not st:
                        st["step"] = torch.zeros((), dtype=torch.float32)
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    out.append((self.name_of[p], p, st))
        return out

    def reset_state(self) -> None:
        for opt in self.optimizers:
            self._local(opt).state.clear()

    def state_bytes(self) -> int:
        """Bytes of the optimizer states held on this rank (its ZeRO-1 shard)."""
        return sum(optimizer_state_bytes(self._local(opt)) for opt in self.optimizers)


def unsharded_state_bytes(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> int:
    """What plain AdamW would hold for these parameters (fp32 moments + a step per tensor)."""
    return sum(2 * p.numel() * p.element_size() + 4 for _, p in named_params if p.requires_grad)


def build_optimizer(named_params, train_cfg, topo: Optional[object], zero: bool = True) -> ShardedAdamW:
    return ShardedAdamW(
        named_params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay,
        dp_group=getattr(topo, "dp_group", None), edp_group=getattr(topo, "edp_group", None), zero=zero)
