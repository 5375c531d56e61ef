"""What every step engine shares: the loss record and the MoE bookkeeping over a rank's stages.

A step engine turns one rank's share of a global batch into gradients; the trainer owns the
optimizer, logging and checkpoints. `trainer.local_engine.LocalEngine` (one stage holds the whole
model) and `parallel.pipeline.runtime.PipelineEngine` (the rank's pipeline stages) derive from
`StageEngine`.

Contract of `forward_backward(micro_batches, mtp_lambda=None)`:
  - micro_batches: this data-parallel rank's token windows, a list of [micro_batch, seq_len+1];
  - mtp_lambda: this step's λ (train.mtp_lambda's schedule; None = the model config's);
  - afterwards every parameter's gradient (parallel.grads.grad_of: .grad, or the fp32 main_grad
    of a BF16 weight) holds d(mean loss over the rank's samples)/dp — i.e. the
    loss of each micro-batch is scaled by 1/len(micro_batches) — before any DP reduction;
  - returns StepLosses whose fields, SUMMED over all ranks of one data-parallel replica, are the
    replica's mean losses (a rank that computes no loss returns zeros).

`evaluate(micro_batches)` returns the same StepLosses from forward passes only (validation):
modules in eval mode (no balance loss, no expert-load statistics, so the training step's MoE
bookkeeping is untouched), autograd off, no gradients touched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from model.moe import MoE


@dataclass
class StepStats:
    """The MoE side of one step (``StageEngine.end_step``): what the trainer logs and sums over
    ranks, read once so that the counters behind it can be zeroed for the next step."""

    loads: dict[str, torch.Tensor]  # MoE layer name → GLOBAL tokens per expert (the bias update's input)
    aux_loss: float  # this rank's summed balance loss (summed over a replica's ranks, like StepLosses)
    a2a_bytes_intra_node: float  # this rank's all-to-all bytes of the step (dispatch + combine)
    a2a_bytes_inter_node: float


@dataclass
class StepLosses:
    lm: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    mtp: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    def add(self, lm: torch.Tensor, mtp, scale: float) -> None:
        self.lm = self.lm + lm.detach().double().cpu() * scale
        if mtp is not None:
            self.mtp = self.mtp + mtp.detach().double().cpu() * scale


class StageEngine:
    """MoE bookkeeping over `self.modules` (the DeepSeekV3 stage modules this rank holds)."""

    modules: list

    def expert_loads(self) -> dict[str, torch.Tensor]:
        """MoE layer name → global tokens per expert of the step (each engine's own reduction)."""
        raise NotImplementedError

    def moe_layers(self) -> dict[str, MoE]:
        out: dict[str, MoE] = {}
        for m in self.modules:
            out.update(m.moe_layers())
        return out

    def aux_loss_sum(self) -> float:
        """This rank's summed balance loss of the step (each micro-batch counted on the copy that
        ran it): the trainer sums it over all ranks of a replica, like the losses."""
        return float(sum(float(m.aux_loss_sum) for m in self.moe_layers().values()))

    def a2a_bytes(self) -> tuple[float, float]:
        """This rank's all-to-all bytes since the last call (intra-node, inter-node; dispatch +
        combine, sent + received); reading resets the dispatchers' counters. The MoE layers of a
        module share one dispatcher: the first layer's read returns its total, the others 0."""
        totals = [0.0, 0.0]
        for m in self.moe_layers().values():
            if hasattr(m.dispatcher, "reset_stats"):
                st = m.dispatcher.reset_stats()
                totals[0] += float(st.get("a2a_bytes_intra_node", 0))
                totals[1] += float(st.get("a2a_bytes_inter_node", 0))
        return totals[0], totals[1]

    def reset_moe_stats(self) -> None:
        for m in self.moe_layers().values():
            m.tokens_per_expert.zero_()
            m.aux_loss_sum.zero_()

    def end_step(self, update_biases: bool = True, gamma: Optional[float] = None) -> StepStats:
        """After the optimizer step, in one call: the global expert loads (a collective: see
        ``expert_loads``), the router-bias update from them with this step's γ (None: the model
        config's; left out for a skipped step), this rank's balance-loss sum and all-to-all bytes;
        the MoE counters are then zeroed."""
        loads = self.expert_loads()
        if update_biases:
            self.update_router_biases(loads, gamma)
        stats = StepStats(loads, self.aux_loss_sum(), *self.a2a_bytes())
        self.reset_moe_stats()
        return stats

    def update_router_biases(self, loads: dict[str, torch.Tensor], gamma: Optional[float] = None) -> None:
        for m in self.modules:
            m.update_router_biases(loads, gamma)

    @contextlib.contextmanager
    def eval_mode(self):
        """Modules in eval mode and autograd off for the block; training modes restored after,
        and evaluation's all-to-all bytes dropped (they are not the next step's)."""
        modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(self.modules, modes):
                m.train(mode)
            self.a2a_bytes()

    def close(self) -> None:
        pass
