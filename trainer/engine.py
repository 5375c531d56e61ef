"""Step engines: how one rank turns its share of a global batch into gradients.

The trainer owns the optimizer, logging and checkpoints; an engine only runs forward and
backward over the rank's micro-batches and reports losses. `LocalEngine` is gradient
accumulation on one stage (pp = 1, any dp/ep); parallel/pipeline provides the pipeline engine.

Contract of `forward_backward(micro_batches)`:
  - micro_batches: this data-parallel rank's token windows, a list of [micro_batch, seq_len+1];
  - afterwards every parameter's .grad holds d(mean loss over the rank's samples)/dp — i.e. the
    loss of each micro-batch is scaled by 1/len(micro_batches) — before any DP reduction;
  - returns StepLosses whose fields, SUMMED over all ranks of one data-parallel replica, are the
    replica's mean losses (a rank that computes no loss returns zeros).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model import DeepSeekV3


@dataclass
class StepLosses:
    lm: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    mtp: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def add(self, lm: torch.Tensor, mtp, scale: float) -> None:
        self.lm = self.lm + lm.detach().double().cpu() * scale
        if mtp is not None:
            self.mtp = self.mtp + mtp.detach().double().cpu() * scale


class LocalEngine:
    """One stage holds the whole model: plain gradient accumulation over the micro-batches.

    Also the reference surface every engine offers the trainer: named_parameters, grad_norm,
    expert_loads, aux_loss_sum, reset_moe_stats, update_router_biases, modules.
    """

    def __init__(self, model: DeepSeekV3, topo=None):
        self.model, self.topo = model, topo
        self.modules = [model]

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> StepLosses:
        m = len(micro_batches)
        self.model.set_aux_loss_scale(1.0 / m)
        losses = StepLosses()
        for tokens in micro_batches:
            out = self.model(tokens[:, :-1], tokens[:, 1:])
            (out.loss / m).backward()
            losses.add(out.lm_loss, out.mtp_loss, 1.0 / m)
        return losses

    def named_parameters(self):
        return list(self.model.named_parameters())

    def parameters(self):
        return list(self.model.parameters())

    def grad_norm(self) -> float:
        from parallel.grads import global_grad_norm

        return global_grad_norm(self.model.named_parameters(), ep_group=getattr(self.topo, "ep_group", None))

    def moe_layers(self):
        return self.model.moe_layers()

    def expert_loads(self) -> dict[str, torch.Tensor]:
        if self.topo is not None and getattr(self.topo, "dp_group", None) is not None:
            from parallel.dispatch import global_expert_load

            return global_expert_load(self.model, self.topo)
        return {n: m.tokens_per_expert.clone() for n, m in self.model.moe_layers().items()}

    def aux_loss_sum(self) -> float:
        return float(sum(float(m.aux_loss_sum) for m in self.model.moe_layers().values()))

    def reset_moe_stats(self) -> None:
        for m in self.model.moe_layers().values():
            m.tokens_per_expert.zero_()
            m.aux_loss_sum.zero_()

    def update_router_biases(self, loads: dict[str, torch.Tensor]) -> None:
        self.model.update_router_biases(loads)

    def close(self) -> None:
        pass
