"""ModelConfig: every DeepSeek-V3 architecture field, with validation.

Presets live in configs/model/*.yaml; the field names follow DeepSeek's reference
inference code (and map one-to-one onto Hugging Face's DeepseekV3Config in
launch/convert.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


# The run-time numerics options of a model (train.recompute, precision), named here once: the
# model and trainer validate against them and the torch-free planner enumerates them.
RECOMPUTE_MODES = ("none", "norm_and_up_proj", "full")
PRECISIONS = ("fp32", "bf16", "fp8")


def unknown_keys(cls, d: dict) -> list:
    """Keys of `d` that are not fields of the dataclass `cls`, sorted (for one named error)."""
    return sorted(set(d) - {f.name for f in fields(cls)})


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the offending key."""


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432  # dense SwiGLU hidden size (first n_dense_layers)
    moe_inter_dim: int = 2048  # per-expert hidden size
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    route_scale: float = 2.5
    score_func: str = "sigmoid"  # sigmoid | softmax
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight
    bias_update_gamma: float = 1e-3  # aux-loss-free bias update speed
    max_nodes_per_token: int = 0  # node-limited routing (0 = off); nodes come from the Topology
    # MLA
    q_lora_rank: int = 1536  # 0 = no q compression
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # positions
    max_seq_len: int = 4096
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # YaRN factor; 1 = plain RoPE
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # YaRN mscale coefficient (0.1*mscale*ln(s)+1 applied to the softmax scale)
    # multi-token prediction
    mtp_depth: int = 1
    mtp_lambda: float = 0.3
    # numerics / init
    norm_eps: float = 1e-6
    init_std: float = 0.006

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def yarn_enabled(self) -> bool:
        return self.rope_factor > 1.0 and self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn_enabled:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = unknown_keys(cls, d)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> "ModelConfig":
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and f.name not in (
                "n_dense_layers", "n_shared_experts", "q_lora_rank", "max_nodes_per_token",
                "mtp_depth", "balance_alpha", "bias_update_gamma", "mtp_lambda",
            ):
                need(v > 0, f.name, f"must be > 0, got {v}")
        need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers",
             f"must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        need(self.score_func in ("sigmoid", "softmax"), "score_func",
             f"must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        need(self.n_routed_experts % self.n_expert_groups == 0, "n_expert_groups",
             f"n_routed_experts={self.n_routed_experts} is not divisible by n_expert_groups={self.n_expert_groups}")
        need(1 <= self.n_limited_groups <= self.n_expert_groups, "n_limited_groups",
             f"must be in [1, n_expert_groups={self.n_expert_groups}], got {self.n_limited_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        need(self.n_activated_experts <= self.n_limited_groups * per_group, "n_activated_experts",
             f"top-{self.n_activated_experts} cannot be chosen from {self.n_limited_groups} groups of {per_group} experts")
        need(self.n_expert_groups == 1 or per_group >= 2, "n_expert_groups",
             "group scores sum the top-2 experts of a group, so each group needs >= 2 experts")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotary pairs)")
        need(self.mtp_depth >= 0, "mtp_depth", f"must be >= 0, got {self.mtp_depth}")
        need(self.q_lora_rank >= 0, "q_lora_rank", f"must be >= 0 (0 = no q compression), got {self.q_lora_rank}")
        for key in ("n_shared_experts", "max_nodes_per_token", "balance_alpha", "bias_update_gamma", "mtp_lambda"):
            need(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        return self
