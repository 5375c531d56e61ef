"""The DeepSeek-V3 model, buildable whole or as one pipeline stage.

Layers live in a ModuleDict keyed by their global index, so a stage that holds layers 4..7
names its parameters exactly as the whole model does ("layers.5.attn.wq_a.weight"). That makes
per-name seeded initialisation, checkpoints and gradient comparisons layout-independent.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.block import Block
from model.config import RECOMPUTE_MODES, ConfigError, ModelConfig
from model.layers import Embedding, Linear, RMSNorm, rope_cache
from model.mixed import Numerics, cast_parameters
from model.moe import Dispatcher, ExpertPlacement, MoE, Experts, Router, bias_update
from model.mtp import MTPModule


@dataclass
class LossOutput:
    loss: torch.Tensor  # lm_loss + λ·mtp_loss (balance losses reach the gradient inside the MoE layers)
    lm_loss: torch.Tensor
    mtp_loss: Optional[torch.Tensor]


class DeepSeekV3(nn.Module):
    """Embedding → blocks → final norm → head, plus MTP depths that share embedding and head.

    `layer_ids`, `has_embed`, `has_head` select one pipeline stage; the defaults build the whole
    model. The head stage also holds the MTP modules and (for them) the embedding.
    `init_seed`: the weights are initialised (init_weights, seeded per global name) unless it is
    None or the model is built on the meta device: the cheap paths for the planner and for code
    that loads or re-initialises the weights itself.
    `experts` (which routed experts this process holds, over how many nodes) and `dispatcher`
    (shared by every MoE layer; None = in-process) come from the parallel layout, so the model
    built here is the model that runs: nothing is swapped in afterwards.
    `recompute` (train.recompute): 'none' | 'norm_and_up_proj' (recompute MLA's latent norms and
    up-projections in backward) | 'full' (keep only each block's input).
    `numerics` (model/mixed.py) likewise: the parameters' storage dtype (BF16 under bf16/fp8,
    every weight read through model.mixed.weight) and the FP8 switch of the projections.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_ids: Optional[Iterable[int]] = None,
        has_embed: bool = True,
        has_head: bool = True,
        *,
        experts: ExpertPlacement = ExpertPlacement(),
        dispatcher: Optional[Dispatcher] = None,
        recompute: str = "none",
        init_seed: Optional[int] = 0,
        numerics: Numerics = Numerics(),
    ):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"train.recompute: expected {'|'.join(RECOMPUTE_MODES)}, got {recompute!r}")
        self.cfg = cfg
        self.has_embed, self.has_head = has_embed, has_head
        ids = range(cfg.n_layers) if layer_ids is None else list(layer_ids)
        needs_embed = has_embed or (has_head and cfg.mtp_depth > 0)
        self.embed = Embedding(cfg.vocab_size, cfg.dim) if needs_embed else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, experts, dispatcher, recompute) for i in ids})
        if has_head:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = Linear(cfg.dim, cfg.vocab_size)
            self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k, experts, dispatcher, recompute)
                                     for k in range(cfg.mtp_depth))
        else:
            self.norm = self.head = self.mtp = None
        self.register_buffer("rope", rope_cache(cfg), persistent=False)
        self.numerics = numerics
        cast_parameters(self, numerics.param_dtype)  # init_weights' fp32 values are rounded into them
        if numerics.fp8:
            enable_fp8(self)
        if init_seed is not None and not self.rope.is_meta:
            self.init_weights(init_seed)

    # ----- forward pieces (the pipeline runtime calls these per stage) -----
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def forward_layers(self, h: torch.Tensor, aux_scale: float = 1.0) -> torch.Tensor:
        """aux_scale: the MoE balance losses' weight in the step (1/#micro-batches, passed by
        the step engine like the LM loss's scale; the default is one micro-batch)."""
        rope = self.rope[: h.shape[1]]
        for layer in self.layers.values():
            h = layer(h, rope, aux_scale=aux_scale)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def head_loss(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                  aux_scale: float = 1.0, mtp_lambda: Optional[float] = None) -> LossOutput:
        """Main next-token loss plus the MTP losses, from the last block's output h [B, T, dim].
        mtp_lambda: this step's λ (train.mtp_lambda's schedule); None = the config's."""
        rep = self.norm(h)
        lm_loss = F.cross_entropy(self.head(rep).flatten(0, 1).float(), labels.flatten())
        if not self.mtp:
            return LossOutput(lm_loss, lm_loss, None)
        seq = h.shape[1]
        mtp_losses = []
        for k, module in enumerate(self.mtp, start=1):
            # depth k at position i: h^{k-1}_i and Emb(t_{i+k}) → predict t_{i+k+1} = labels[i+k]
            rep = module(rep[:, :-1], self.embed(input_ids[:, k:]), self.rope[: seq - k], aux_scale=aux_scale)
            logits = self.head(rep)
            mtp_losses.append(F.cross_entropy(logits.flatten(0, 1).float(), labels[:, k:].flatten()))
        mtp_loss = torch.stack(mtp_losses).mean()
        lam = self.cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
        return LossOutput(lm_loss + lam * mtp_loss, lm_loss, mtp_loss)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, aux_scale: float = 1.0,
                mtp_lambda: Optional[float] = None):
        """Whole model: token ids [B, T] → logits [B, T, V], or a LossOutput when labels are given."""
        h = self.forward_layers(self.embed_tokens(input_ids), aux_scale)
        return self.logits(h) if labels is None else self.head_loss(h, input_ids, labels, aux_scale, mtp_lambda)

    # ----- MoE bookkeeping -----
    def moe_layers(self) -> dict[str, MoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    def set_expert_nodes(self, n_nodes: int) -> None:
        """How many nodes the routed experts are spread over (for node-limited routing). Training
        builds the model with it (ExpertPlacement.n_nodes); this is for experiments on a built model."""
        for m in self.moe_layers().values():
            m.gate.n_nodes = n_nodes

    def update_router_biases(self, loads: dict[str, torch.Tensor], gamma: Optional[float] = None) -> None:
        """Apply the aux-loss-free bias rule with each MoE layer's GLOBAL load of the step and this
        step's γ (train.bias_update_gamma's schedule; None = the config's)."""
        gamma = self.cfg.bias_update_gamma if gamma is None else gamma
        for name, m in self.moe_layers().items():
            bias_update(m.gate.bias, loads[name], gamma)

    # ----- initialisation -----
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seed every parameter (every expert) by its global name, so any sharding or stage split
        reproduces the single-process values. Norm weights are 1, biases 0, the rest N(0, init_std),
        drawn in fp32 and rounded to the parameters' storage dtype (BF16 under mixed precision)."""
        std = self.cfg.init_std
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if isinstance(mod, RMSNorm):
                    p.fill_(1.0)
                elif isinstance(mod, Experts):
                    for e in range(mod.n_local):
                        p[e].copy_(_seeded_normal(p[e].shape, std, seed, f"{name}[{mod.first_expert + e}]"))
                elif p_name == "bias" and not isinstance(mod, Router):
                    p.zero_()
                else:
                    p.copy_(_seeded_normal(p.shape, std, seed, name))
            if isinstance(mod, Router):
                mod.bias.zero_()


def _seeded_normal(shape, std: float, seed: int, key: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.randn(shape, generator=gen) * std


def enable_fp8(model: nn.Module) -> int:
    """Run attention and expert/MLP projections in FP8 (the paper's split): embedding, head,
    router, norms and the attention core stay in high precision. Returns how many were switched."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (Linear, Experts)) and not name.endswith("head"):
            mod.fp8 = True
            n += 1
    return n
