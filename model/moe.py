"""DeepSeekMoE: sigmoid router with selection-only bias, grouped experts, and the Dispatcher seam.

The MoE layer never asks where its experts live. It routes tokens, then hands
(tokens, top-k ids, gate weights, local experts) to `self.dispatcher`:
`LocalDispatcher` (here) runs every expert in-process; parallel/dispatch.py's
`AllToAllDispatcher` sends tokens to the expert-parallel rank that owns each expert.
Both share `permute_by_expert` and `combine_topk`, so they sum in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ConfigError, ModelConfig
from model.fp8 import fp8_linear, fp8_linear_prequantized
from model.layers import MLP
from model.mixed import weight
from model.wire import FP32, Wire, encode_rows, round_trip


@dataclass(frozen=True)
class ExpertPlacement:
    """Where a model's routed experts live, fixed when the model is built (the default: all of
    them in this process, one node). Under expert parallelism EP rank `ep_rank` of `ep` holds the
    experts [ep_rank·n/ep, (ep_rank+1)·n/ep) of every MoE layer; `n_nodes` is how many node blocks
    the n experts are laid out over, for node-limited routing (model.max_nodes_per_token). The
    single-process reference of an EP run uses the same `n_nodes` so that it routes identically."""

    ep_rank: int = 0
    ep: int = 1
    n_nodes: int = 1


class Router(nn.Module):
    """s = sigmoid(x Wᵀ); pick top-k on s + bias inside the best groups (and nodes); gate on s.

    `bias` is the aux-loss-free balancing bias: it changes which experts are selected, never
    the gate weights. It is a buffer (no gradient), moved by `bias_update` after each step.
    """

    def __init__(self, cfg: ModelConfig, n_nodes: int = 1):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.max_nodes = cfg.max_nodes_per_token
        # Experts are laid out contiguously over `n_nodes` nodes (ExpertPlacement.n_nodes).
        self.n_nodes = n_nodes
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _limit(self, scores: torch.Tensor, n_blocks: int, keep: int, per_block_topk: int) -> torch.Tensor:
        """Mask out all but the `keep` blocks whose top-`per_block_topk` scores sum highest."""
        n = scores.shape[0]
        blocks = scores.view(n, n_blocks, scores.shape[1] // n_blocks)  # explicit: n may be 0
        block_score = blocks.topk(per_block_topk, dim=-1).values.sum(-1)
        chosen = block_score.topk(keep, dim=-1).indices
        drop = torch.ones(n, n_blocks, dtype=torch.bool, device=scores.device).scatter_(1, chosen, False)
        return blocks.masked_fill(drop.unsqueeze(-1), float("-inf")).view(n, -1)

    def forward(self, x: torch.Tensor):
        """x [N, dim] → (gate weights [N, k], expert ids [N, k], scores [N, E] for the balance loss)."""
        logits = F.linear(x.float(), weight(self.weight).float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores + self.bias
        if self.n_groups > 1:  # group-limited: group score = sum of its top-2 biased scores
            biased = self._limit(biased, self.n_groups, self.topk_groups, 2)
        if self.max_nodes and self.n_nodes > self.max_nodes:  # node-limited: top k/M per node
            per_node = max(1, self.topk // self.max_nodes)
            biased = self._limit(biased, self.n_nodes, self.max_nodes, per_node)
        ids = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), ids, scores


class Experts(nn.Module):
    """A block of routed experts held as stacked weights [n_local, out, in].

    `first_expert` is the global id of expert 0 of this block (non-zero under expert
    parallelism); initialisation seeds every expert by its global id.
    """

    def __init__(self, n_local: int, dim: int, inter_dim: int, first_expert: int = 0):
        super().__init__()
        self.n_local, self.first_expert = n_local, first_expert
        self.w1 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_local, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.fp8 = False

    def forward(self, x: torch.Tensor, counts: list[int], x_fp8: Optional[tuple] = None) -> torch.Tensor:
        """x [M, dim], rows grouped by local expert (counts[e] rows for expert e) → [M, dim].

        x_fp8: x's FP8 tiles (E4M3 [M, dim], scales [M, ⌈dim/128⌉]) when x arrived as an FP8
        all-to-all payload (x is then their dequantised value): with FP8 experts the w1/w3
        GEMMs consume them directly instead of quantising x again."""
        linear = fp8_linear if self.fp8 else F.linear
        # unbind once: indexing w[e] per expert would make backward allocate a zero [E, out, in]
        # gradient for every expert; unbind's backward is a single stack.
        w1, w2, w3 = weight(self.w1).unbind(0), weight(self.w2).unbind(0), weight(self.w3).unbind(0)
        tiles = [None] * len(counts)
        if x_fp8 is not None and self.fp8:
            tiles = list(zip(torch.split(x_fp8[0], counts), torch.split(x_fp8[1], counts)))
        outs = []
        for e, chunk in enumerate(torch.split(x, counts)):
            if chunk.shape[0] == 0:
                outs.append(chunk)
                continue
            if tiles[e] is not None:
                h = F.silu(fp8_linear_prequantized(chunk, tiles[e], w1[e])) * fp8_linear_prequantized(chunk, tiles[e], w3[e])
            else:
                h = F.silu(linear(chunk, w1[e])) * linear(chunk, w3[e])
            outs.append(linear(h, w2[e]))
        return torch.cat(outs) if outs else x


def permute_by_expert(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the N·k (token, slot) pairs grouped by expert (stable), and tokens per expert."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def combine_topk(y_sorted: torch.Tensor, inv_order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Undo `permute_by_expert` (a gather with the inverse of its order: a cheaper backward than a
    scatter) and sum each token's k expert outputs, weighted by its gates, in slot order.
    The row width is explicit so that a rank with no tokens (n = 0) works."""
    n, k = weights.shape
    y = y_sorted.index_select(0, inv_order)
    return (y.view(n, k, y_sorted.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)


class Dispatcher(Protocol):
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
        """x [N, dim], ids/weights [N, k] → Σ_k weights · expert_ids(x), shape [N, dim]. Dropless."""
        ...


def take_rows(parts: Optional[tuple], index: torch.Tensor) -> Optional[tuple]:
    """Select rows of every tensor of an encoded payload (None stays None)."""
    return None if parts is None else tuple(t.index_select(0, index) for t in parts)


def node_partials_sum(y: torch.Tensor, weights: torch.Tensor, node_of: torch.Tensor, n_nodes: int,
                      fmt: str, bwd: str) -> torch.Tensor:
    """Σ over nodes of (Σ over the token's slots on that node of gate · y, in slot order), each
    node's partial rounded to the combine wire format — what two_hop's combine computes.
    y [N, k, dim] (slot order), weights / node_of [N, k]."""
    parts = []
    for m in range(n_nodes):
        w = weights * (node_of == m).to(weights.dtype)
        parts.append(round_trip((y * w.unsqueeze(-1)).sum(dim=1), fmt, bwd))
    return torch.stack(parts, dim=1).sum(dim=1)


class LocalDispatcher:
    """All experts live in this process: permute, grouped expert compute, combine.

    With a rounding `wire` (model/wire.py), values and gradients are rounded where an EP layout
    would send them, so that one process computes what the EP dispatchers (parallel/dispatch.py,
    parallel/two_hop.py) compute with that wire, node count and GPUs per node. Forward: each
    token's dispatch row once (an FP8 row feeds the experts as is), each expert output, and —
    under `two_hop` — each node's partial sum. Backward (the gradient rows the reverse exchanges
    send): flat rounds each (token, expert) pair's input gradient; two_hop rounds each (token,
    GPU) sum (hop 2 back) and each (token, node) sum (hop 1 back), summing in the same order.
    `n_nodes` × `gpus_per_node` GPUs hold the experts in equal consecutive blocks (gpus_per_node
    is capped to divide a node's experts)."""

    def __init__(self, wire: Wire = FP32, two_hop: bool = False, n_nodes: int = 1, gpus_per_node: int = 1):
        self.wire, self.two_hop, self.n_nodes = wire, two_hop, n_nodes
        self.gpus_per_node = max(1, gpus_per_node)

    def __call__(self, x, ids, weights, experts: Experts):
        order, counts = permute_by_expert(ids, experts.n_local)
        n, k = ids.shape
        if self.wire.exact:
            y_sorted = experts(x[order // k], counts.tolist())
            return combine_topk(y_sorted, inverse_permutation(order), weights)
        wire = self.wire
        xd, tiles = encode_rows(x, wire.dispatch, "fp32")  # gradients are rounded per exchange row below
        rows = order // k
        y_sorted = experts(self._pair_rows(xd, ids, order, experts.n_local), counts.tolist(), take_rows(tiles, rows))
        y_sorted = round_trip(y_sorted, wire.combine, wire.backward)
        inv = inverse_permutation(order)
        if not self.two_hop:
            return combine_topk(y_sorted, inv, weights)
        y = y_sorted.index_select(0, inv).view(n, k, y_sorted.shape[-1])
        node_of = ids // (experts.n_local // self.n_nodes)
        weights = round_trip(weights, "fp32", wire.backward)  # they travel with hop 1: their grads come back
        return node_partials_sum(y, weights, node_of, self.n_nodes, wire.combine, wire.backward)

    def _pair_rows(self, xd: torch.Tensor, ids: torch.Tensor, order: torch.Tensor, n_experts: int) -> torch.Tensor:
        """xd's rows for the (token, expert) pairs in `order` (values unchanged), whose gradients
        are rounded to wire.backward as the EP backward exchanges round them."""
        bwd, k = self.wire.backward, ids.shape[1]
        if not self.two_hop:  # flat: one exchange row per pair
            return round_trip(xd.index_select(0, order // k), "fp32", bwd)
        per_node = n_experts // self.n_nodes
        gpus = math.gcd(self.gpus_per_node, per_node)
        n = ids.shape[0]
        node_of, gpu_of = ids // per_node, ids // (per_node // gpus)  # gpu: global index node·gpus + l
        # hop 1: one row per (token, node), ordered by node then token (as two_hop sends them)
        hit = torch.zeros(n, self.n_nodes, dtype=torch.bool, device=ids.device).scatter_(1, node_of, True)
        node1, tok1 = hit.t().nonzero().unbind(1)
        x1 = round_trip(xd.index_select(0, tok1), "fp32", bwd)
        at1 = torch.zeros(n, self.n_nodes, dtype=torch.long, device=ids.device)
        at1[tok1, node1] = torch.arange(tok1.numel(), device=ids.device)
        # hop 2: one row per (token, GPU), ordered by GPU then token
        hit = torch.zeros(n, self.n_nodes * gpus, dtype=torch.bool, device=ids.device).scatter_(1, gpu_of, True)
        gpu2, tok2 = hit.t().nonzero().unbind(1)
        x2 = round_trip(x1.index_select(0, at1[tok2, gpu2 // gpus]), "fp32", bwd)
        at2 = torch.zeros(n, self.n_nodes * gpus, dtype=torch.long, device=ids.device)
        at2[tok2, gpu2] = torch.arange(tok2.numel(), device=ids.device)
        tok, slot = order // k, order % k
        return x2.index_select(0, at2[tok, gpu_of[tok, slot]])


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss α·Σ_i f_i·P_i, averaged over sequences (DeepSeek-V3 eq. 17–20).

    scores [B, T, E] (unbiased affinities), ids [B, T, k]. f_i = E/(k·T)·#tokens of the sequence
    routed to i (no gradient); P_i = mean over the sequence of the normalised affinity s_i/Σ_j s_j.
    """
    bsz, seq, n_exp = scores.shape
    k = ids.shape[-1]
    if bsz == 0 or seq == 0:
        return scores.sum() * 0.0
    counts = torch.zeros(bsz, n_exp, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, ids.view(bsz, -1), torch.ones(bsz, seq * k, device=scores.device, dtype=scores.dtype))
    f = counts * (n_exp / (k * seq))
    p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)
    return alpha * (f * p).sum(-1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out` whose backward also sends gradient 1 into `aux`.

    Lets every MoE layer contribute its balance loss to the gradient wherever the layer lives
    (any pipeline stage), without threading aux losses through the stage outputs.
    """

    @staticmethod
    def forward(ctx, out, aux):
        ctx.save_for_backward(aux)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


def in_recompute() -> bool:
    """True while autograd re-runs a forward for activation recompute (don't count stats twice)."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Router, this process's share of the routed experts (`placement`), the shared experts, and
    the dispatcher that moves tokens to their experts (None: LocalDispatcher, every expert here)."""

    def __init__(self, cfg: ModelConfig, placement: ExpertPlacement = ExpertPlacement(),
                 dispatcher: Optional[Dispatcher] = None):
        super().__init__()
        self.n_experts, self.alpha = cfg.n_routed_experts, cfg.balance_alpha
        if self.n_experts % placement.ep:
            raise ConfigError(f"model.n_routed_experts={self.n_experts} not divisible by parallel.ep={placement.ep}")
        n_local = self.n_experts // placement.ep
        self.gate = Router(cfg, placement.n_nodes)
        self.experts = Experts(n_local, cfg.dim, cfg.moe_inter_dim, first_expert=placement.ep_rank * n_local)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        # Step statistics, read and reset by the trainer: routed tokens per expert (global ids) and
        # the summed balance loss of this step's forwards.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor, aux_scale: float = 1.0) -> torch.Tensor:
        """aux_scale: the balance loss's weight in the step (the step engine passes
        1/#micro-batches, as it scales the LM loss); it scales both its gradient and aux_loss_sum."""
        bsz, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        weights, ids, scores = self.gate(flat)
        aux = None
        if self.training and self.alpha > 0:
            aux = sequence_balance_loss(scores.view(bsz, seq, -1), ids.view(bsz, seq, -1), self.alpha)
        if self.training and not in_recompute():
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(ids.flatten(), minlength=self.n_experts).to(self.tokens_per_expert)
                if aux is not None:
                    self.aux_loss_sum += aux.detach() * aux_scale
        y = self.dispatcher(flat, ids, weights, self.experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        y = y.view(bsz, seq, dim)
        if aux is not None and torch.is_grad_enabled():
            y = _AttachAuxLoss.apply(y, aux * aux_scale)
        return y


@torch.no_grad()
def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing: b_i += γ·sign(mean_load − load_i) (overloaded experts lose bias)."""
    bias += gamma * torch.sign(load.float().mean() - load.float())
