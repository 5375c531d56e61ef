"""Multi-head Latent Attention (MLA), the training form (no weight absorption).

Queries go through a low-rank bottleneck (wq_a → q_norm → wq_b) unless q_lora_rank == 0.
Keys and values share one compressed latent c_kv (wkv_a → kv_norm → wkv_b), and a single
decoupled rotary key k_pe is shared by all heads; each head's query carries its own q_pe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.layers import Linear, RMSNorm, apply_rope


class MLA(nn.Module):
    """recompute_up_proj (train.recompute=norm_and_up_proj): recompute the latent norms and
    up-projections in backward instead of storing their (large, per-head) outputs."""

    def __init__(self, cfg: ModelConfig, recompute_up_proj: bool = False):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, cfg.n_heads * qk_dim)
        else:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim)
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim)
        self.recompute_up_proj = recompute_up_proj

    def q_up(self, q_latent: torch.Tensor) -> torch.Tensor:
        return self.wq_b(self.q_norm(q_latent))

    def kv_up(self, kv_latent: torch.Tensor) -> torch.Tensor:
        return self.wkv_b(self.kv_norm(kv_latent))

    def _up(self, fn, latent: torch.Tensor) -> torch.Tensor:
        if self.recompute_up_proj and torch.is_grad_enabled():
            return checkpoint(fn, latent, use_reentrant=False)
        return fn(latent)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self._up(self.q_up, self.wq_a(x))
        q = q.view(bsz, seq, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, rope)

        kv_latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), rope)  # one rotary key shared by all heads
        kv = self._up(self.kv_up, kv_latent).view(bsz, seq, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)

        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )
        return self.wo(out.transpose(1, 2).flatten(2))
