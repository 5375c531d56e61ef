"""The transformer block: pre-norm MLA, then a dense SwiGLU or an MoE layer.

Its own file because both the main model (model/transformer.py) and each multi-token-prediction
depth (model/mtp.py) are built from it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import MLA
from model.config import ModelConfig
from model.layers import MLP, RMSNorm
from model.moe import Dispatcher, ExpertPlacement, MoE


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense SwiGLU (first n_dense_layers) or MoE.

    recompute (train.recompute, checked by DeepSeekV3): "full" keeps only the block input for
    backward; "norm_and_up_proj" recomputes MLA's latent norms and up-projections."""

    def __init__(self, cfg: ModelConfig, layer_id: int, experts: ExpertPlacement = ExpertPlacement(),
                 dispatcher: Optional[Dispatcher] = None, recompute: str = "none"):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg, recompute_up_proj=recompute == "norm_and_up_proj")
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, experts, dispatcher) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim)
        self.recompute = recompute == "full"

    def _forward(self, x: torch.Tensor, rope: torch.Tensor, aux_scale: float) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, aux_scale=aux_scale) if isinstance(self.ffn, MoE) else self.ffn(h))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, aux_scale: float = 1.0) -> torch.Tensor:
        """aux_scale: the MoE balance loss's weight in the step (MoE.forward)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, rope, aux_scale, use_reentrant=False)
        return self._forward(x, rope, aux_scale)
