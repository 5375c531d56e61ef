"""Multi-token prediction (DeepSeek-V3 §2.2).

Depth k predicts token t_{i+k+1} from position i. It combines the previous depth's
representation h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
runs one transformer block, and reads logits through its own final norm and the SHARED output
head. Embedding and head belong to the main model and are passed in, never copied.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from model.block import Block
from model.config import ModelConfig
from model.layers import Linear, RMSNorm
from model.moe import Dispatcher, ExpertPlacement


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, experts: ExpertPlacement = ExpertPlacement(),
                 dispatcher: Optional[Dispatcher] = None, recompute: str = "none"):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim)
        self.block = Block(cfg, layer_id, experts, dispatcher, recompute)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # "shared_head.norm" in the released weights

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, rope: torch.Tensor,
                aux_scale: float = 1.0) -> torch.Tensor:
        """h_prev, emb_next [B, T-k, dim] → this depth's normalised representation [B, T-k, dim]."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.norm(self.block(h, rope, aux_scale=aux_scale))
