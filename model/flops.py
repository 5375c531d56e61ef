"""Parameter and FLOP counts from the real module shapes (works on the meta device)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.naming import is_expert_param
from model.transformer import DeepSeekV3


@dataclass
class ParamCounts:
    total: int  # main model (embedding, blocks, final norm, head); excludes MTP
    activated: int  # per token: non-expert params + shared experts + top-k of the routed experts
    mtp: int  # MTP parameters not shared with the main model (embedding and head are shared)
    embedding: int
    routed_expert: int  # all routed-expert parameters of the main model


def count_params(cfg: ModelConfig) -> ParamCounts:
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    total = mtp = routed = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if is_expert_param(name):
            routed += p.numel()
    emb = model.embed.weight.numel()
    activated = total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
    return ParamCounts(total=total, activated=activated, mtp=mtp, embedding=emb, routed_expert=routed)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 × forward), incl. MTP depths.

    Matmul FLOPs: 6 per activated weight that multiplies (the embedding is a lookup, excluded);
    attention core: causal QKᵀ and AV, 3 · n_heads · seq_len · (qk_head_dim + v_head_dim) per layer.
    """
    counts = count_params(cfg)
    per_layer_mtp = counts.mtp / max(cfg.mtp_depth, 1) if cfg.mtp_depth else 0.0
    # an MTP depth activates like one MoE block (+ its eh_proj) plus the shared head again
    expert_frac = cfg.n_activated_experts / cfg.n_routed_experts
    mtp_routed = 3 * cfg.dim * cfg.moe_inter_dim * cfg.n_routed_experts
    mtp_active = (per_layer_mtp - mtp_routed * (1 - expert_frac)) + cfg.dim * cfg.vocab_size
    matmul_params = (counts.activated - counts.embedding) + cfg.mtp_depth * mtp_active
    attn = 3 * cfg.n_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim) * (cfg.n_layers + cfg.mtp_depth)
    return 6.0 * matmul_params + attn
