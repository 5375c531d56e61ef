"""What every step engine shares: the loss record and the MoE bookkeeping over a rank's stages.

A step engine turns one rank's share of a global batch into gradients; the trainer owns the
optimizer, logging and checkpoints. `trainer.local_engine.LocalEngine` (one stage holds the whole
model) and `parallel.pipeline.runtime.PipelineEngine` (the rank's pipeline stages) derive from
`StageEngine`.

Contract of `forward_backward(micro_batches)`:
  - micro_batches: this data-parallel rank's token windows, a list of [micro_batch, seq_len+1];
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

import torch

from model.moe import MoE


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

    def moe_layers(self) -> dict[str, MoE]:
        out: dict[str, MoE] = {}
        for m in self.modules:
            out.update(m.moe_layers())
        return out

    def aux_loss_sum(self) -> float:
        """This rank's summed balance loss of the step (each micro-batch counted on the copy that
        ran it): the trainer sums it over all ranks of a replica, like the losses."""
        return float(sum(float(m.aux_loss_sum) for m in self.moe_layers().values()))

    def reset_moe_stats(self) -> None:
        for m in self.moe_layers().values():
            m.tokens_per_expert.zero_()
            m.aux_loss_sum.zero_()

    def update_router_biases(self, loads: dict[str, torch.Tensor]) -> None:
        for m in self.modules:
            m.update_router_biases(loads)

    @contextlib.contextmanager
    def eval_mode(self):
        """Modules in eval mode and autograd off for the block; training modes restored after."""
        modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(self.modules, modes):
                m.train(mode)

    def close(self) -> None:
        pass
