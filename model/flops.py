"""Parameter and FLOP counts of the model's parts, read from the real modules built on the meta
device: the one count the trainer (MFU), the planner (stage costs, the layer split, the counts
launch.plan prints) and the tests share.

A part is one placeable piece: the embedding, a block, an MTP depth, the head (+ final norm).
Forward FLOPs per token: 2 per weight of a GEMM (routed experts: the activated k/E share; the head
once per prediction depth); RMSNorm gains (elementwise) and the embedding (a lookup) do none. A
GEMM is low precision when model.transformer.enable_fp8 switches its module to FP8. Attention
core (causal QKᵀ and AV): n_heads · (qk_head_dim + v_head_dim) · seq_len per token per block.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.naming import is_expert_param
from model.transformer import DeepSeekV3, enable_fp8

UP_PROJ = ("attn.wq_b.weight", "attn.wkv_b.weight")  # what recompute=norm_and_up_proj recomputes


@dataclass(frozen=True)
class Part:
    """One part's parameters and forward FLOPs per token."""

    name: str  # embed | layer.<i> | mtp.<k> | head
    kind: str  # embed | dense | moe | mtp | head
    dense_params: int  # non-expert parameters (replicated over DP)
    expert_params: int  # routed-expert parameters, all experts (an EP rank holds 1/ep of them)
    gemm_lp: float  # GEMM FLOPs that enable_fp8 runs in FP8 (attention projections, MLPs, experts)
    gemm_hp: float  # GEMM FLOPs kept in BF16 (router, head)
    attn_coef: float  # attention-core FLOPs = attn_coef · seq_len
    up_proj: float  # FLOPs of the MLA up-projections (recomputed in backward by norm_and_up_proj)
    n_moe: int  # MoE layers inside (all-to-all pairs per micro-batch)

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params


@dataclass
class ParamCounts:
    total: int  # main model (embedding, blocks, final norm, head); excludes MTP
    activated: int  # per token: non-expert params + shared experts + top-k of the routed experts
    mtp: int  # MTP parameters not shared with the main model (embedding and head are shared)
    embedding: int
    routed_expert: int  # all routed-expert parameters of the main model


def model_parts(cfg: ModelConfig) -> tuple[Part, ...]:
    """embed, layer.0 … layer.<n-1>, mtp.0 …, head."""
    return _parts(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


def _part_of(name: str) -> str:
    top = name.split(".")
    if top[0] in ("layers", "mtp"):
        return f"{'layer' if top[0] == 'layers' else 'mtp'}.{top[1]}"
    return "embed" if top[0] == "embed" else "head"  # final norm, head


@functools.lru_cache(maxsize=16)
def _parts(key: str) -> tuple[Part, ...]:
    cfg = ModelConfig.from_dict(json.loads(key))
    with torch.device("meta"):
        model = DeepSeekV3(cfg, init_seed=None)
    enable_fp8(model)
    fp8 = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if getattr(mod, "fp8", False)
           for p, _ in mod.named_parameters(recurse=False)}
    frac = cfg.n_activated_experts / cfg.n_routed_experts
    acc: dict = {}
    for name, p in model.named_parameters():
        s = acc.setdefault(_part_of(name), dict(dp=0, ep=0, lp=0.0, hp=0.0, up=0.0))
        n = p.numel()
        s["ep" if is_expert_param(name) else "dp"] += n
        if p.dim() < 2 or name.startswith("embed."):
            continue  # norm gains (elementwise) and the embedding lookup
        flops = 2 * n * (frac if is_expert_param(name) else 1) * (1 + cfg.mtp_depth if name == "head.weight" else 1)
        s["lp" if name in fp8 else "hp"] += flops
        if name.endswith(UP_PROJ):
            s["up"] += flops
    attn = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)

    def part(name: str, kind: str, blocks: int, n_moe: int) -> Part:
        s = acc.get(name, dict(dp=0, ep=0, lp=0.0, hp=0.0, up=0.0))
        return Part(name, kind, s["dp"], s["ep"], s["lp"], s["hp"], attn * blocks, s["up"], n_moe)

    moe = [cfg.is_moe_layer(i) for i in range(cfg.n_layers + cfg.mtp_depth)]
    return (part("embed", "embed", 0, 0),
            *(part(f"layer.{i}", "moe" if moe[i] else "dense", 1, int(moe[i])) for i in range(cfg.n_layers)),
            *(part(f"mtp.{k}", "mtp", 1, int(moe[cfg.n_layers + k])) for k in range(cfg.mtp_depth)),
            part("head", "head", 0, 0))


def count_params(cfg: ModelConfig) -> ParamCounts:
    parts = model_parts(cfg)
    main = [p for p in parts if p.kind != "mtp"]
    total = sum(p.params for p in main)
    routed = sum(p.expert_params for p in main)
    # routed = (MoE layers) · E · (one expert's weights): the k/E share is a whole number
    activated = total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
    return ParamCounts(total=total, activated=activated, mtp=sum(p.params for p in parts if p.kind == "mtp"),
                       embedding=parts[0].params, routed_expert=routed)


def forward_flops_per_token(parts, seq_len: int) -> float:
    return sum(p.gemm_lp + p.gemm_hp + p.attn_coef * seq_len for p in parts)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token, MTP depths included: forward + backward = 3 × forward."""
    return 3.0 * forward_flops_per_token(model_parts(cfg), seq_len)
