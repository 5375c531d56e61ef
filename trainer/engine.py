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
    def __init__(self, model: DeepSeekV3):
        self.model = model
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
