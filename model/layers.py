"""Building blocks: Linear (with an FP8 switch), Embedding, RMSNorm, RoPE with YaRN, SwiGLU MLP."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.fp8 import fp8_linear
from model.mixed import weight


class Linear(nn.Linear):
    """nn.Linear without bias by default; `fp8 = True` routes the GEMMs through model.fp8.

    The flag is flipped by `model.transformer.enable_fp8` for the projections the paper
    runs in FP8 (attention and expert/MLP projections), never for embedding, head or router.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = weight(self.weight), (weight(self.bias) if self.bias is not None else None)
        if self.fp8:
            return fp8_linear(x, w, b)
        return F.linear(x, w, b)


class Embedding(nn.Embedding):
    """nn.Embedding whose table is read through model.mixed.weight (BF16 storage, fp32 rows and
    an fp32 gradient under mixed precision)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, weight(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * weight(self.weight)).type_as(x)


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_cache(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """cos/sin table [seq_len, rope_dim/2, 2] for interleaved rotary pairs.

    With YaRN (rope_factor > 1 and max_seq_len > original_seq_len) the low frequencies are
    interpolated by `rope_factor` and the high ones kept, blended over the band between the
    beta_fast and beta_slow correction dimensions, exactly as DeepSeek-V3's reference code.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    seq_len = seq_len or cfg.max_seq_len
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.yarn_enabled:
        low = max(math.floor(_yarn_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
        high = min(math.ceil(_yarn_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [B, T, H, rope_dim] by cache [T, rope_dim/2, 2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos = cache[: x.shape[1], None, :, 0]
    sin = cache[: x.shape[1], None, :, 1]
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
