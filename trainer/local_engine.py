"""LocalEngine: one stage holds the whole model (pp = 1, any dp/ep) — plain gradient accumulation.

The engine contract and the shared MoE bookkeeping live in parallel/step_engine.py; the pipeline
engine is parallel/pipeline/runtime.py.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch

from model import DeepSeekV3
from parallel.dispatch import global_expert_load
from parallel.grads import global_grad_norm
from parallel.step_engine import StageEngine, StepLosses

__all__ = ["LocalEngine", "StepLosses"]


class LocalEngine(StageEngine):
    """autocast: the context factory of trainer/precision.py's ``apply_precision``, entered around
    the step's forward and backward passes; None = no context."""

    def __init__(self, model: DeepSeekV3, topo=None, *,
                 autocast: Optional[Callable[[], ContextManager]] = None):
        self.model, self.topo = model, topo
        self.modules = [model]
        self._autocast = autocast or contextlib.nullcontext

    def forward_backward(self, micro_batches: list[torch.Tensor], mtp_lambda: Optional[float] = None) -> StepLosses:
        m = len(micro_batches)
        losses = StepLosses()
        with self._autocast():
            for tokens in micro_batches:
                out = self.model(tokens[:, :-1], tokens[:, 1:], aux_scale=1.0 / m, mtp_lambda=mtp_lambda)
                (out.loss / m).backward()
                losses.add(out.lm_loss, out.mtp_loss, 1.0 / m)
        return losses

    def evaluate(self, micro_batches: list[torch.Tensor]) -> StepLosses:
        losses = StepLosses()
        with self.eval_mode(), self._autocast():
            for tokens in micro_batches:
                out = self.model(tokens[:, :-1], tokens[:, 1:])
                losses.add(out.lm_loss, out.mtp_loss, 1.0 / len(micro_batches))
        return losses

    def named_parameters(self):
        return list(self.model.named_parameters())

    def parameters(self):
        return list(self.model.parameters())

    def grad_norm(self, sharded: bool = False) -> float:
        """sharded: the gradients were reduce-scattered (each element on one DP rank)."""
        return global_grad_norm(self.model.named_parameters(), ep_group=getattr(self.topo, "ep_group", None),
                                dp_group=self.topo.dp_group if sharded else None)

    def expert_loads(self) -> dict[str, torch.Tensor]:
        if self.topo is not None and getattr(self.topo, "dp_group", None) is not None:
            return global_expert_load(self.model, self.topo)
        return {n: m.tokens_per_expert.clone() for n, m in self.model.moe_layers().items()}
