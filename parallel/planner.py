"""The planner's model of memory and time for a PP × DP (× EP inside DP) layout. Pure functions:
parameter shapes come from the real modules built on the meta device (no storage), schedules and
their timing from parallel/pipeline (the same action lists the runtime executes, replayed by the
simulator), nothing here starts a process.

Entry points
------------
* ``param_inventory(cfg)``                   per-part parameter / FLOP counts from the modules
* ``split_layers(cfg, placement, ...)``      layers per pipeline stage, balanced per rank (the
                                             runtime's split too: parallel/pipeline/stages.py)
* ``predict_rank_bytes(cfg, layout, ...)``   parameter / gradient / optimizer bytes of one rank
* ``rank_tensors`` / ``zero_state_elements`` the tensors a rank trains / its share of their AdamW state
* ``optimizer_param_groups``, ``zero_partition`` the trainer's AdamW groups and ZeRO-1 partition
* ``activation_table(cfg, ...)``             what one layer stores per token for its backward
* ``plan(cfg, layout, recipe, hw, ...)``     the whole plan: memory per rank, step time, validity

Counting
--------
params_total: main model (embedding, 61 blocks, final norm, head), MTP excluded. params_activated:
per token, every non-expert weight + shared experts + top-k/E of the routed experts, EXCLUDING
the embedding table (a lookup: no FLOPs); the head counts. 671B config: 671.03B total, 36.63B
activated (37.55B with the embedding) — the paper's "37B" rounded to a whole billion. params_mtp:
MTP parameters not shared with the main model (embedding and head are shared): 11.61B.

Stages: stage 0 = embedding + first layers, last stage = last layers + final norm + head + MTP
depths (DualPipe / DualPipeV rank 0 holds both, so MTP shares embedding and head physically).
Layers per stage: ``split_layers`` here, which balances what a RANK runs (DualPipe: stage r +
stage pp-1-r) and breaks ties by memory; parallel/pipeline/stages.split_layers cuts the runtime's
stages with it, so the planner plans the split training builds. Under DualPipe rank r holds stages r and pp-1-r: its per-rank
weights are both copies, its gradients are summed with the partner's before the DP reduction.

Numerics (``precision``)
------------------------
fp32: weights, gradients and AdamW moments in fp32 (what the trainer does today on CPU; no
      separate master copy): 4 + 4 + 8 bytes per parameter.
bf16 / fp8: the DeepSeek-V3 recipe (§3.3): BF16 weights used by the kernels (2 B), FP32
      gradient accumulation (4 B), ZeRO-1 optimizer = FP32 master copy (4 B) + BF16 AdamW
      moments (2 + 2 B). fp8 additionally runs the GEMMs of attention projections and
      experts/MLPs in FP8 and caches their inputs in FP8 (1 B + one fp32 scale per 1×128 tile);
      embedding, head, router, norms and the attention core stay BF16.
ZeRO-1: optimizer states of non-expert parameters sharded over DP, of expert parameters over
expert-DP (dp/ep); weights and gradients are held whole. The share of a rank is
parallel/partition.zero_partition, the function the trainer's optimizer (parallel/zero.py) runs:
each part's parameters end to end, cut into equal ranges (within one element), so
predict_rank_bytes is exact per rank (tests/test_plan_vs_run.py compares it with real runs) and
plan() reports the fullest rank of each DP group (ceil(n / group) elements).
The parameter EMA lives in CPU memory (not counted).

Activations (``recompute``) — per token per layer, see ``activation_table`` for the list:
none:             every tensor the modules keep for backward (fused kernels: a norm keeps its
                  input, a GEMM its input, the attention core q, k, v, out and logsumexp).
norm_and_up_proj: the paper's recompute: RMSNorm outputs and the MLA up-projection outputs
                  (per-head q, k, v) are recomputed in backward from the kept latents.
full:             only each block's input is kept; one block is rematerialised at a time.
With fp8 also the paper's §3.3.2 storage: SwiGLU inputs cached in FP8, SwiGLU outputs
recomputed, the gate weight folded into the SwiGLU (so the combine keeps no expert outputs).

Time
----
Per micro-batch and stage: F = forward GEMM FLOPs (2 per activated weight per token; FP8 or
BF16 peak) + attention core (H·T·(d_qk + d_v) per token, BF16); backward = input-grad
(GEMMs ≈ F, attention core 2×) + weight-grad W (GEMMs ≈ F) + recomputed forward pieces. Rates =
peak × achievable_fraction × (1 − comm_sms/sms when the all-to-all runs on SMs).
All-to-all per MoE layer (node-limited, two hops): a token crosses IB once per *remote*
destination node (E[remote nodes] = M·(1 − 1/N) for M = max_nodes_per_token of the N nodes of an
EP group, uniform routing), then fans out over NVLink to its k experts; time = max(IB, NVLink)
(the hops pipeline). Dispatch FP8 under fp8 (else the activation dtype), combine BF16; backward
moves BF16 both ways. Chunk costs: F = F_comp + F_comm, B = B_comp + B_comm (no overlap),
F&B = max(F_comp + B_comp, F_comm + B_comm) (the paper's overlap of one micro-batch's
all-to-all with the other's compute). Stages differ (embedding, head + MTP), the simulator takes
one cost per action kind: each rank's costs are the mean over the stages it holds (its chunks
see equally many micro-batches), and the slowest rank's costs are used for all (conservative).
Step = simulated makespan + exposed DP gradient reduce-scatter / parameter all-gather over IB +
optimizer update (HBM-bound).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields

from typing import Any, Dict, List, Optional, Sequence, Tuple

from model.config import RECOMPUTE_MODES, ConfigError, ModelConfig, unknown_keys  # torch-free
from model.naming import is_expert_param  # torch-free
from parallel.param_groups import optimizer_param_groups  # torch-free
from parallel.a2a_bytes import two_hop_bytes  # torch-free
from parallel.partition import rank_elements, zero_partition  # torch-free
from parallel.pipeline import Costs, Kind, ScheduleError, get_schedule, simulate  # torch-free

GB = 1e9  # decimal: memory in GB, bandwidths in GB/s
HARDWARE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "hardware")
PAPER_GPU_HOURS_PER_T = 180_000.0  # DeepSeek-V3 report: H800 GPU-hours per trillion tokens


class PlanError(ValueError):
    """A planner input is malformed (unknown hardware, bad recompute mode, ...)."""


# ----------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    name: str = "H800"
    bf16_tflops: float = 989.0
    fp8_tflops: float = 1979.0
    tf32_tflops: float = 494.0
    hbm_gb: float = 80.0
    hbm_gbps: float = 3350.0
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    gpus_per_node: int = 8
    sms: int = 132
    comm_sms: int = 20

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        unknown = unknown_keys(cls, d)
        if unknown:
            raise PlanError(f"hardware: unknown key(s) {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**d)


def load_hardware(name: str) -> Hardware:
    """configs/hardware/<name>.yaml (or a path to a yaml file)."""
    import yaml

    path = name if name.endswith((".yaml", ".yml")) else os.path.join(HARDWARE_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        have = sorted(f[:-5] for f in os.listdir(HARDWARE_DIR) if f.endswith(".yaml"))
        raise PlanError(f"plan.hardware={name!r}: no {path}; choose one of {have}")
    with open(path) as f:
        return Hardware.from_dict(yaml.safe_load(f) or {})


# ----------------------------------------------------------------------------------- numerics
@dataclass(frozen=True)
class Numerics:
    weight: float  # bytes per parameter held for the kernels
    grad: float  # gradient accumulation
    master: float  # optimizer's master copy (0: the weights are the master)
    moments: float  # AdamW exp_avg + exp_avg_sq
    act: float  # a stored activation element
    gemm_in: float  # a cached GEMM-input element (FP8 + 1×128 scales under fp8)
    lp_gemms: bool  # attention/MLP/expert GEMMs at the FP8 rate

    @property
    def optimizer(self) -> float:
        return self.master + self.moments


NUMERICS = {
    "fp32": Numerics(weight=4, grad=4, master=0, moments=8, act=4, gemm_in=4, lp_gemms=False),
    "bf16": Numerics(weight=2, grad=4, master=4, moments=4, act=2, gemm_in=2, lp_gemms=False),
    "fp8": Numerics(weight=2, grad=4, master=4, moments=4, act=2, gemm_in=1 + 4 / 128, lp_gemms=True),
}


def numerics(precision: str) -> Numerics:
    try:
        return NUMERICS[precision]
    except KeyError:
        raise PlanError(f"precision: expected one of {list(NUMERICS)}, got {precision!r}") from None


# ----------------------------------------------------------------------------------- inventory
@dataclass(frozen=True)
class Part:
    """One placeable piece of the model: a block, the embedding, the head (+final norm), an MTP
    depth. Counts come from the real module's parameters; FLOPs are forward, per token."""

    name: str
    kind: str  # embed | dense | moe | head | mtp
    dense_params: int  # non-expert parameters (replicated over DP)
    expert_params: int  # routed-expert parameters, all experts (a rank holds 1/ep of them)
    dense_tensors: int
    expert_tensors: int
    gemm_lp: float  # forward GEMM FLOPs/token eligible for FP8 (activated experts only)
    gemm_hp: float  # forward GEMM FLOPs/token kept in BF16 (router, head)
    attn_coef: float  # attention-core forward FLOPs/token = attn_coef · seq_len
    up_proj: float  # forward FLOPs/token of the MLA up-projections (recomputed in backward)
    n_moe: int  # MoE layers inside (all-to-all pairs per micro-batch)

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor of the full model (experts unsharded), in named_parameters() order."""

    name: str
    shape: Tuple[int, ...]
    part: str  # the Part it belongs to: embed | layer.<i> | mtp.<k> | head

    def numel(self) -> int:
        n = 1
        for x in self.shape:
            n *= x
        return n

    def dim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Inventory:
    layers: Tuple[Part, ...]
    embed: Part
    head: Part
    mtp: Tuple[Part, ...]
    total: int  # main model (excl. MTP)
    activated: int  # per token, excl. the embedding (a lookup, no FLOPs) — the paper's "37B"
    activated_with_embedding: int
    mtp_unique: int  # MTP parameters not shared with the main model
    embedding: int
    tensors: Tuple[TensorSpec, ...] = ()  # every parameter tensor, model.named_parameters() order


def _cfg_key(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def param_inventory(cfg) -> Inventory:
    return _inventory(_cfg_key(cfg))


@functools.lru_cache(maxsize=16)
def _inventory(key: str) -> Inventory:
    import torch  # deferred, as every torch-backed import here: the planner itself needs no torch

    from model.transformer import DeepSeekV3

    cfg = ModelConfig.from_dict(json.loads(key))
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    frac = cfg.n_activated_experts / cfg.n_routed_experts
    acc: Dict[str, dict] = {}

    def slot(name: str) -> dict:
        return acc.setdefault(name, dict(dp=0, ep=0, dt=0, et=0, lp=0.0, hp=0.0, up=0.0))

    tensors: List[TensorSpec] = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            key_ = f"layer.{parts[1]}"
        elif parts[0] == "mtp":
            key_ = f"mtp.{parts[1]}"
        elif parts[0] == "embed":
            key_ = "embed"
        else:  # final norm, head
            key_ = "head"
        s = slot(key_)
        n = p.numel()
        tensors.append(TensorSpec(name, tuple(p.shape), key_))
        if is_expert_param(name):
            s["ep"] += n
            s["et"] += 1
            s["lp"] += 2 * n * frac
            continue
        s["dp"] += n
        s["dt"] += 1
        if p.dim() < 2 or key_ == "embed":
            continue  # norms (elementwise) and the embedding lookup
        if name.endswith("gate.weight") or key_ == "head":
            # router and head stay high precision; the head runs once per prediction depth
            s["hp"] += 2 * n * (1 + cfg.mtp_depth if key_ == "head" else 1)
        else:
            s["lp"] += 2 * n
        if name.endswith(("attn.wq_b.weight", "attn.wkv_b.weight")):
            s["up"] += 2 * n

    attn_coef = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)

    def part(name: str, kind: str, attn: bool, n_moe: int) -> Part:
        s = acc.get(name) or slot(name)
        return Part(name, kind, s["dp"], s["ep"], s["dt"], s["et"], s["lp"], s["hp"],
                    attn_coef if attn else 0.0, s["up"], n_moe)

    layers = tuple(part(f"layer.{i}", "moe" if cfg.is_moe_layer(i) else "dense", True,
                        int(cfg.is_moe_layer(i))) for i in range(cfg.n_layers))
    mtp = tuple(part(f"mtp.{k}", "mtp", True, int(cfg.is_moe_layer(cfg.n_layers + k)))
                for k in range(cfg.mtp_depth))
    embed, head = part("embed", "embed", False, 0), part("head", "head", False, 0)
    total = embed.params + head.params + sum(p.params for p in layers)
    routed = sum(p.expert_params for p in layers)
    activated_emb = total - routed + round(routed * frac)
    return Inventory(layers=layers, embed=embed, head=head, mtp=mtp, total=total,
                     activated=activated_emb - embed.params, activated_with_embedding=activated_emb,
                     mtp_unique=sum(p.params for p in mtp), embedding=embed.params,
                     tensors=tuple(tensors))


# ----------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActItem:
    name: str
    elems: float  # elements per token
    dtype: str  # act | gemm | f32
    drop: Optional[str] = None  # norm | up_proj | fp8_recipe: when this recompute/recipe applies


def _block_items(cfg, moe: bool) -> List[ActItem]:
    d, h = cfg.dim, cfg.n_heads
    qk, nope, rope, v = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    items = [ActItem("block input x (attn_norm input)", d, "act"),
             ActItem("attn_norm output (wq_a / wkv_a input)", d, "gemm", "norm")]
    if cfg.q_lora_rank:
        items += [ActItem("q latent (wq_a output, q_norm input)", cfg.q_lora_rank, "act"),
                  ActItem("q_norm output (wq_b input)", cfg.q_lora_rank, "gemm", "norm")]
    items += [
        ActItem("q with rope (attention input)", h * qk, "act", "up_proj"),
        ActItem("kv latent + shared k_pe (wkv_a output)", cfg.kv_lora_rank + rope, "act"),
        ActItem("kv_norm output (wkv_b input)", cfg.kv_lora_rank, "gemm", "norm"),
        ActItem("k_nope, v (wkv_b output; v is an attention input)", h * (nope + v), "act", "up_proj"),
        ActItem("k with shared rope (attention input)", h * qk, "act", "up_proj"),
        ActItem("attention output (wo input)", h * v, "act"),
        ActItem("softmax logsumexp", h, "f32"),
        ActItem("residual after attention (ffn_norm input)", d, "act"),
        ActItem("ffn_norm output (router / shared / dispatch input)", d, "gemm", "norm"),
    ]
    if moe:
        k, inter = cfg.n_activated_experts, cfg.moe_inter_dim
        sh = cfg.n_shared_experts * inter
        items += [
            ActItem("router scores (sigmoid output, fp32)", cfg.n_routed_experts, "f32"),
            ActItem(f"dispatched tokens, {k} copies (expert w1/w3 input)", k * d, "gemm"),
            ActItem("expert w1/w3 outputs (SwiGLU input)", k * 2 * inter, "gemm"),
            ActItem("expert SwiGLU output (w2 input)", k * inter, "gemm", "fp8_recipe"),
            ActItem("expert outputs kept by the combine (gate-weight grad)", k * d, "act", "fp8_recipe"),
        ]
        if sh:
            items += [ActItem("shared expert w1/w3 outputs (SwiGLU input)", 2 * sh, "gemm"),
                      ActItem("shared expert SwiGLU output (w2 input)", sh, "gemm", "fp8_recipe")]
    else:
        items += [ActItem("MLP w1/w3 outputs (SwiGLU input)", 2 * cfg.inter_dim, "gemm"),
                  ActItem("MLP SwiGLU output (w2 input)", cfg.inter_dim, "gemm", "fp8_recipe")]
    return items


def _items(cfg, kind: str) -> List[ActItem]:
    if kind in ("dense", "moe"):
        return _block_items(cfg, kind == "moe")
    if kind == "mtp":
        d = cfg.dim
        return ([ActItem("MTP enorm / hnorm inputs (embedding, h)", 2 * d, "act"),
                 ActItem("MTP normalised concat (eh_proj input)", 2 * d, "gemm", "norm")]
                + [ActItem("MTP " + i.name, i.elems, i.dtype, i.drop)
                   for i in _block_items(cfg, cfg.is_moe_layer(cfg.n_layers))]
                + [ActItem("MTP final norm input", d, "act"),
                   ActItem("MTP final norm output (head input)", d, "act", "norm")])
    if kind == "head":
        d, depths = cfg.dim, 1 + cfg.mtp_depth
        return [ActItem("final norm input", d, "act"),
                ActItem("final norm output (head input)", d, "act", "norm"),
                ActItem(f"logits ×{depths} prediction depths (bf16 for cross-entropy)", depths * cfg.vocab_size, "act"),
                ActItem("cross-entropy logsumexp", depths, "f32")]
    return []  # embedding: the token ids only


def _item_bytes(item: ActItem, num: Numerics) -> float:
    return {"act": num.act, "gemm": num.gemm_in, "f32": 4.0}[item.dtype] * item.elems


def _kept(item: ActItem, recompute: str, precision: str) -> bool:
    if item.drop == "fp8_recipe":
        return precision != "fp8"
    if item.drop in ("norm", "up_proj"):
        return recompute == "none"
    return True


def part_activation_bytes(cfg, kind: str, precision: str, recompute: str) -> Tuple[float, float]:
    """(bytes kept per token until backward, extra bytes per token rematerialised while this part's
    backward runs) for one part under `recompute`."""
    if recompute not in RECOMPUTE_MODES:
        raise PlanError(f"train.recompute: expected one of {RECOMPUTE_MODES}, got {recompute!r}")
    num = numerics(precision)
    items = _items(cfg, kind)
    every = sum(_item_bytes(i, num) for i in items if _kept(i, "none", precision))
    if recompute == "full" and kind in ("dense", "moe", "mtp"):
        # only the block input stays (plus, for MTP, what surrounds its block)
        kept = sum(_item_bytes(i, num) for i in items
                   if i.name in ("block input x (attn_norm input)", "MTP enorm / hnorm inputs (embedding, h)",
                                 "MTP final norm input"))
    else:
        kept = sum(_item_bytes(i, num) for i in items if _kept(i, recompute, precision))
    return kept, every - kept


def activation_table(cfg, precision: str = "fp8") -> List[dict]:
    """Per token per MoE / dense layer: every stored tensor with its bytes under each recompute mode."""
    num = numerics(precision)
    rows = []
    for kind in ("dense", "moe"):
        for it in _items(cfg, kind):
            rows.append({"layer": kind, "tensor": it.name, "elements": it.elems,
                         "bytes": _item_bytes(it, num),
                         **{f"kept_{m}": _kept(it, m, precision) for m in ("none", "norm_and_up_proj")}})
    return rows


# ----------------------------------------------------------------------------------- stages
def schedule_placement(schedule: str, pp: int) -> Tuple[int, Tuple[Tuple[int, ...], ...]]:
    """(n_stages, placement[rank] = stages) of a schedule, from its generator."""
    n = max(2 * pp, 2)
    n += n % 2
    s = get_schedule(schedule, pp, n)
    return s.n_stages, s.placement


def _part_cost(p: Part, seq: int, lp_speed: float) -> float:
    """Hardware-free forward cost proxy of a part (BF16-FLOP equivalents per token)."""
    return p.gemm_lp / lp_speed + p.gemm_hp + p.attn_coef * seq


def live_points(schedule) -> List[List[Tuple[int, ...]]]:
    """Per rank: the (micro-batch count per chunk) vectors of in-flight activations that can be a
    peak for some per-chunk sizes (the Pareto-maximal ones over the rank's replay)."""
    out = []
    for r, acts in enumerate(schedule.actions):
        live = [0] * schedule.n_chunks(r)
        pts = set()
        for act in acts:
            for a in act.parts():
                if a.kind is Kind.F:
                    live[a.chunk] += 1
                    pts.add(tuple(live))
                elif a.kind is Kind.B:
                    live[a.chunk] -= 1
        pts_l = sorted(pts)
        out.append([p for p in pts_l if not any(q != p and all(x >= y for x, y in zip(q, p)) for q in pts_l)])
    return out


def split_layers(cfg, placement: Sequence[Sequence[int]], n_stages: int, precision: str = "fp8",
                 seq_len: Optional[int] = None, recompute: str = "none",
                 live: Optional[Sequence[Sequence[Tuple[int, ...]]]] = None, ep: int = 1,
                 min_end_layers: int = 1) -> List[int]:
    """Layers per stage (contiguous, in order): first so that the heaviest rank — the sum of the
    stages it holds (DualPipe pairs stage r with pp-1-r) — is as light as possible; among equally
    fast splits the one whose fullest rank holds the fewest bytes (weights + gradients +
    activations of the in-flight micro-batches, `live` = live_points(schedule)); then the most
    even stages (smallest Σ stage cost²).

    Stage 0 also holds the embedding, the last stage the final norm, head and MTP depths (forward
    cost proxy: FP8 GEMMs at half the BF16 cost under fp8). Every stage gets >= 1 layer when there
    are enough layers (the end stages >= min_end_layers). Deterministic local search over
    single-layer moves from an even start."""
    inv = param_inventory(cfg)
    seq = seq_len or cfg.original_seq_len
    num = numerics(precision)
    lp = 2.0 if num.lp_gemms else 1.0
    cost = [_part_cost(p, seq, lp) for p in inv.layers]
    act = [part_activation_bytes(cfg, p.kind, precision, recompute)[0] * seq for p in inv.layers]
    par = [(p.dense_params + p.expert_params / ep) * (num.weight + num.grad) for p in inv.layers]
    ends = {"first": [inv.embed], "last": list(inv.mtp) + [inv.head]}
    end_cost = {k: sum(_part_cost(p, seq, lp) for p in v) for k, v in ends.items()}
    end_act = {k: sum(part_activation_bytes(cfg, p.kind, precision, recompute)[0] * seq for p in v)
               for k, v in ends.items()}
    end_par = {k: sum(p.dense_params * (num.weight + num.grad) for p in v) for k, v in ends.items()}
    L, S = len(cost), n_stages

    def cum(xs):
        out = [0.0]
        for x in xs:
            out.append(out[-1] + x)
        return out

    pc, pa, pw = cum(cost), cum(act), cum(par)
    # every stage gets a layer (end stages with only the embedding / head + MTP: min_end_layers=0)
    minimum = [0 if L < S else min_end_layers if s in (0, S - 1) else 1 for s in range(S)]
    counts = [L // S + (1 if s < L % S else 0) for s in range(S)]

    def score(cnt: List[int]) -> Tuple[float, float, float]:
        c_, a_, w_, pos = [], [], [], 0
        for s, n in enumerate(cnt):
            end = "first" if s == 0 else "last" if s == S - 1 else None
            c_.append(pc[pos + n] - pc[pos] + (end_cost[end] if end else 0.0) + (end_cost["last"] if S == 1 else 0.0))
            a_.append(pa[pos + n] - pa[pos] + (end_act[end] if end else 0.0) + (end_act["last"] if S == 1 else 0.0))
            w_.append(pw[pos + n] - pw[pos] + (end_par[end] if end else 0.0) + (end_par["last"] if S == 1 else 0.0))
            pos += n
        load = [sum(c_[s] for s in set(st)) for st in placement]
        mem = 0.0
        if live is not None:
            for r, st in enumerate(placement):
                peak = max(sum(k * a_[s] for k, s in zip(pt, st)) for pt in live[r])
                mem = max(mem, peak + sum(w_[s] for s in set(st)))
        return (round(max(load) / 1e6, 3), round(mem / 1e6), round(sum(x * x for x in c_) / 1e18, 6))

    best = score(counts)
    while True:
        cand = None
        for a in range(S):
            if counts[a] <= minimum[a]:
                continue
            for b in range(S):
                if a == b:
                    continue
                counts[a] -= 1
                counts[b] += 1
                sc = score(counts)
                if sc < best and (cand is None or sc < cand[0]):
                    cand = (sc, a, b)
                counts[a] += 1
                counts[b] -= 1
        if cand is None:
            return counts
        best, a, b = cand
        counts[a] -= 1
        counts[b] += 1


def stage_parts(cfg, counts: Sequence[int]) -> List[List[Part]]:
    """The parts of every stage for `counts` layers per stage."""
    inv = param_inventory(cfg)
    if sum(counts) != len(inv.layers) or any(c < 0 for c in counts):
        raise PlanError(f"parallel.layers_per_stage={list(counts)} must be >= 0 and sum to "
                        f"model.n_layers={len(inv.layers)}")
    out, pos = [], 0
    for s, c in enumerate(counts):
        parts = ([inv.embed] if s == 0 else []) + list(inv.layers[pos:pos + c])
        if s == len(counts) - 1:
            parts += list(inv.mtp) + [inv.head]
        out.append(parts)
        pos += c
    return out


def _rank_parts(cfg, stages: List[List[Part]], held: Sequence[int]) -> List[Part]:
    """Unique parts on a rank. The MTP depths need the embedding: a rank holding the last stage
    holds it too, shared with stage 0's when both are on the rank (DualPipe / DualPipeV rank 0)."""
    parts: Dict[str, Part] = {}
    for s in held:
        for p in stages[s]:
            parts[p.name] = p
    inv = param_inventory(cfg)
    if inv.mtp and "head" in parts:
        parts.setdefault("embed", inv.embed)
    return list(parts.values())


def _layer_range(parts: List[Part]) -> str:
    ids = [int(p.name.split(".")[1]) for p in parts if p.name.startswith("layer.")]
    extra = [p.name.split(".")[0] for p in parts if not p.name.startswith("layer.")]
    txt = f"{min(ids)}-{max(ids)}" if ids else "-"
    tags = sorted({"embed" if e == "embed" else "head" if e == "head" else "mtp" for e in extra})
    return txt + ("+" + "+".join(tags) if tags else "")


# ----------------------------------------------------------------------------------- bytes per rank
@dataclass(frozen=True)
class PlanLayout:
    pp: int = 1
    dp: int = 1
    ep: int = 1
    world_size: int = 1
    gpus_per_node: int = 8
    schedule: str = "1f1b"
    layers_per_stage: Optional[Tuple[int, ...]] = None

    @property
    def edp(self) -> int:
        return max(self.dp // self.ep, 1)

    @property
    def n_nodes_ep(self) -> int:
        return -(-self.ep // self.gpus_per_node)


def _as_layout(layout: Any) -> PlanLayout:
    if isinstance(layout, PlanLayout):
        return layout
    get = (lambda k, d=None: layout.get(k, d)) if isinstance(layout, dict) else \
        (lambda k, d=None: getattr(layout, k, d))
    pp, ep = int(get("pp", 1)), int(get("ep", 1))
    dp = int(get("dp", 0) or 0)
    world = int(get("world_size", 0) or 0)
    if not dp:
        dp = max(world // pp, 1) if world else 1
    lps = get("layers_per_stage", None)
    return PlanLayout(pp=pp, dp=dp, ep=ep, world_size=world or pp * dp,
                      gpus_per_node=int(get("gpus_per_node", 8)), schedule=str(get("schedule", "1f1b")),
                      layers_per_stage=tuple(lps) if lps else None)


def _stages_for(cfg, lay: PlanLayout, precision: str, seq_len: Optional[int] = None,
                recompute: str = "none", n_micro: int = 0):
    """(layers per stage, placement, parts per stage): parallel.layers_per_stage, else the split
    the runtime builds (parallel/pipeline/stages.split_layers, which cuts with split_layers here)
    for the schedule at n_micro (an invalid n_micro → the smallest valid count)."""
    from parallel.pipeline.stages import split_layers as runtime_split  # torch-backed (the model)

    n_stages, placement = schedule_placement(lay.schedule, lay.pp)
    if lay.layers_per_stage:
        counts = list(lay.layers_per_stage)
    else:
        try:
            sched = get_schedule(lay.schedule, lay.pp, n_micro)
        except ScheduleError:
            sched = get_schedule(lay.schedule, lay.pp, 2 * lay.pp)
        try:
            counts = [len(x) for x in runtime_split(cfg, sched, precision=precision, seq_len=seq_len,
                                                    recompute=recompute, ep=lay.ep)]
        except ConfigError as err:
            raise PlanError(str(err)) from None
    if len(counts) != n_stages:
        raise PlanError(f"parallel.layers_per_stage has {len(counts)} entries; schedule "
                        f"{lay.schedule} with pp={lay.pp} has {n_stages} stages")
    return counts, placement, stage_parts(cfg, counts)


def _rank_bytes(cfg, parts: List[Part], lay: PlanLayout, num: Numerics, zero: bool,
                count_step: bool) -> dict:
    n_local = -(-cfg.n_routed_experts // lay.ep)
    dense = sum(p.dense_params for p in parts)
    expert = sum(p.expert_params * n_local // cfg.n_routed_experts for p in parts)
    tensors = sum(p.dense_tensors + p.expert_tensors for p in parts)
    held = dense + expert
    if zero:  # the fullest rank of the DP / expert-DP group (parallel/partition.py)
        opt_elems = _fullest_share(dense, lay.dp) + _fullest_share(expert, lay.edp)
        step = 0
    else:
        opt_elems = held
        step = 4 * tensors if count_step else 0  # torch AdamW: one fp32 'step' per parameter tensor
    return {
        "param_count": held, "dense_param_count": dense, "expert_param_count": expert,
        "param_tensors": tensors,
        "param_bytes": int(held * num.weight),
        "grad_bytes": int(held * num.grad),
        "optimizer_state_bytes": int(opt_elems * num.optimizer) + step,
        "optimizer_state_elems": opt_elems,
    }


# ----------------------------------------------------------------------------------- ZeRO-1 as run
def _fullest_share(numel: int, group: int) -> int:
    """Elements of the fullest rank when `numel` elements are partitioned over `group` ranks."""
    return max(rank_elements([numel], group, r) for r in range(max(group, 1)))


def rank_tensors(model_cfg, layout: Any, rank: int = 0, **split: Any) -> List[TensorSpec]:
    """The parameter tensors global `rank` trains, as its engine's named_parameters() lists them:
    pp = 1 (trainer.local_engine.LocalEngine) in model.named_parameters() order; pp > 1
    (parallel.pipeline.runtime.PipelineEngine) every stage's parameters once, sorted by name.
    Expert tensors are this EP rank's slice (n_routed_experts // ep experts). `split`: precision,
    seq_len, recompute, n_microbatches of the layer split (see predict_rank_bytes)."""
    lay = _as_layout(layout)
    return _held_tensors(model_cfg, lay, _rank_parts(model_cfg, *_rank_stages(model_cfg, lay, rank, **split)))


def _rank_stages(cfg, lay: PlanLayout, rank: int, precision: str = "fp32", seq_len: Optional[int] = None,
                 recompute: str = "none", n_microbatches: int = 0) -> Tuple[List[List[Part]], Tuple[int, ...]]:
    """(parts per stage, the stages `rank` holds)."""
    _, placement, stages = _stages_for(cfg, lay, precision, seq_len, recompute, n_microbatches)
    pp_rank = rank // lay.dp
    if not 0 <= rank < lay.pp * lay.dp:
        raise PlanError(f"rank {rank} outside world size {lay.pp * lay.dp}")
    return stages, tuple(placement[pp_rank])


def _held_tensors(cfg, lay: PlanLayout, parts: Sequence[Part]) -> List[TensorSpec]:
    held = {p.name for p in parts}
    n, n_local = cfg.n_routed_experts, cfg.n_routed_experts // lay.ep
    out = []
    for t in param_inventory(cfg).tensors:
        if t.part not in held:
            continue
        if is_expert_param(t.name):
            t = TensorSpec(t.name, (t.shape[0] // n * n_local,) + tuple(t.shape[1:]), t.part)
        out.append(t)
    return sorted(out, key=lambda t: t.name) if lay.pp > 1 else out


def zero_state_elements(tensors: Sequence[TensorSpec], layout: Any, rank: int = 0,
                        zero: bool = True) -> Tuple[int, int]:
    """(elements, pieces) of optimizer state global `rank` holds for `tensors` (rank_tensors: what
    it trains, in its engine's order) under parallel/zero.ShardedAdamW: each part (non-expert over
    its DP group, group rank = dp_rank; expert over its expert-DP group, group rank = edp_rank) in
    optimizer_param_groups order, split by zero_partition when zero, whole otherwise. A piece is
    one parameter's range on this rank (it carries one AdamW step counter)."""
    lay = _as_layout(layout)
    dp_rank = rank % lay.dp
    edp_rank = dp_rank // lay.ep
    elems = pieces = 0
    for is_expert, groups in optimizer_param_groups([(t.name, t) for t in tensors], 0.0):
        world, me = (lay.edp, edp_rank) if is_expert else (lay.dp, dp_rank)
        if not zero or world <= 1:
            world, me = 1, 0
        mine = zero_partition([t.numel() for g in groups for t in g["params"]], world)[me]
        elems += sum(b - a for _, a, b in mine)
        pieces += len(mine)
    return elems, pieces


MOMENT_BYTES = {"fp32": 8, "bf16": 4}  # exp_avg + exp_avg_sq per element


def predict_rank_bytes(model_cfg, layout: Any, rank: int = 0, *, precision: str = "fp32",
                       zero: bool = False, count_step: bool = True, seq_len: Optional[int] = None,
                       recompute: str = "none", n_microbatches: int = 0, moment_dtype: str = "auto") -> dict:
    """Parameter, gradient and optimizer-state bytes held by global `rank` of `layout`.

    layout: a PlanLayout, parallel.topology.Layout or any object/dict with pp, dp (or
    world_size), ep and optionally schedule, gpus_per_node, layers_per_stage. Ranks follow
    parallel/topology.py (rank = pp_rank·dp + dp_rank, dp_rank = edp_rank·ep + ep_rank); a rank
    holds the stages the schedule places on its pipeline index (DualPipe: r and pp-1-r), expert
    tensors sliced to n_routed_experts/ep experts. Bytes per element follow `precision` (NUMERICS:
    fp32 = FP32 weights, no separate master; bf16/fp8 = BF16 weights + FP32 master), the moments
    `moment_dtype` (auto = the precision's: fp32 under fp32, bf16 otherwise). The optimizer state
    is this rank's share by zero_state_elements (the trainer's partition; zero=False: everything
    it trains) × (master + moments), plus with count_step one fp32 AdamW step per piece.
    With pp > 1 and no layers_per_stage, the stage split is the runtime's
    (parallel/pipeline/stages.split_layers(model_cfg, schedule at n_microbatches, precision=,
    seq_len=, recompute=, ep=)). A rank's stages share one embedding (stages.build_stage_modules).
    Returns dict(param_bytes, grad_bytes, optimizer_state_bytes, param_count, ...)."""
    lay = _as_layout(layout)
    num = numerics(precision)
    if moment_dtype != "auto":
        if moment_dtype not in MOMENT_BYTES:
            raise PlanError(f"optim.moment_dtype: expected auto|fp32|bf16, got {moment_dtype!r}")
        num = Numerics(**{**asdict(num), "moments": MOMENT_BYTES[moment_dtype]})
    stages, held = _rank_stages(model_cfg, lay, rank, precision, seq_len, recompute, n_microbatches)
    parts = _rank_parts(model_cfg, stages, held)
    out = _rank_bytes(model_cfg, parts, lay, num, zero, count_step)
    out["stages"] = list(held)
    elems, pieces = zero_state_elements(_held_tensors(model_cfg, lay, parts), lay, rank, zero=zero)
    out.update(optimizer_state_elems=elems, optimizer_state_pieces=pieces,
               optimizer_state_bytes=int(elems * num.optimizer) + (4 * pieces if count_step else 0))
    return out


# ----------------------------------------------------------------------------------- time
@dataclass(frozen=True)
class Recipe:
    """The training shape and numerics being planned."""

    precision: str = "fp8"
    recompute: str = "norm_and_up_proj"
    zero: bool = True
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per micro-batch
    global_batch: int = 15360  # sequences per step
    microbatches: int = 0  # per DP rank per step; 0 = global_batch / (dp · micro_batch)

    def n_micro(self, dp: int) -> int:
        return self.microbatches or self.global_batch // max(dp * self.micro_batch, 1)


@dataclass(frozen=True)
class ChunkTime:
    """Seconds for one micro-batch through one stage."""

    f_comp: float
    b_comp: float  # full backward (input grads + weight grads + recompute)
    w_comp: float  # weight-grad part of b_comp
    f_comm: float
    b_comm: float


def _a2a_seconds(cfg, lay: PlanLayout, hw: Hardware, tokens: int, precision: str) -> tuple:
    """(dispatch, combine, backward) seconds of one MoE layer's two_hop all-to-alls of `tokens`
    tokens per rank (forward dispatch, forward combine, the backward's reverse exchanges; split
    sizes included): the bytes come from parallel/a2a_bytes.py, the formula the runtime's counts
    obey."""
    if lay.ep <= 1:
        return 0.0, 0.0, 0.0
    from model.wire import resolve_wire  # torch-backed (the payload formats)

    d, k = cfg.dim, cfg.n_activated_experts
    n_nodes = lay.n_nodes_ep
    g = min(lay.gpus_per_node, lay.ep)
    m = min(cfg.max_nodes_per_token or n_nodes, n_nodes)
    remote = m * (1 - 1 / n_nodes) if n_nodes > 1 else 0.0  # expected remote nodes per token
    on_other_gpus = k * (g - 1) / g
    b = two_hop_bytes(tokens * remote, tokens * on_other_gpus, tokens * on_other_gpus, d, k,
                      resolve_wire("auto", precision), calls=1, n_nodes=n_nodes, gpus=g)
    ib, nvl = hw.ib_gbps * GB, hw.nvlink_gbps * GB
    splits = b["splits_inter"] / ib + b["splits_intra"] / nvl
    return (max(b["dispatch_inter"] / ib, b["dispatch_intra"] / nvl) + splits,
            max(b["combine_inter"] / ib, b["combine_intra"] / nvl),
            max(b["backward_inter"] / ib, b["backward_intra"] / nvl))


def chunk_time(cfg, parts: List[Part], lay: PlanLayout, recipe: Recipe, hw: Hardware,
               fraction: float) -> ChunkTime:
    num = numerics(recipe.precision)
    tokens = recipe.micro_batch * recipe.seq_len
    sm = (1 - hw.comm_sms / hw.sms) if lay.ep > 1 else 1.0
    hp_peak = hw.tf32_tflops if recipe.precision == "fp32" else hw.bf16_tflops
    lp_peak = hw.fp8_tflops if num.lp_gemms else hp_peak
    lp_rate, hp_rate = lp_peak * 1e12 * fraction * sm, hp_peak * 1e12 * fraction * sm
    gemm = sum(p.gemm_lp for p in parts) / lp_rate + sum(p.gemm_hp for p in parts) / hp_rate
    attn = sum(p.attn_coef for p in parts) * recipe.seq_len / hp_rate
    if recipe.recompute == "full":
        recompute = sum((p.gemm_lp / lp_rate + p.gemm_hp / hp_rate + p.attn_coef * recipe.seq_len / hp_rate)
                        for p in parts if p.kind in ("dense", "moe", "mtp"))
    elif recipe.recompute == "norm_and_up_proj":
        recompute = sum(p.up_proj for p in parts) / lp_rate
    else:
        recompute = 0.0
    f = tokens * (gemm + attn)
    w = tokens * gemm
    b = tokens * (gemm + 2 * attn + recompute) + w
    n_moe = sum(p.n_moe for p in parts)
    dispatch, combine, backward = _a2a_seconds(cfg, lay, hw, tokens, recipe.precision)
    return ChunkTime(f_comp=f, b_comp=b, w_comp=w, f_comm=n_moe * (dispatch + combine),
                     b_comm=n_moe * backward)


def rank_costs(chunks: Sequence[ChunkTime]) -> Dict[str, float]:
    """Simulator costs (seconds) of a rank holding these chunks: means over its chunks."""
    n = len(chunks)
    f = sum(c.f_comp + c.f_comm for c in chunks) / n
    b = sum(c.b_comp + c.b_comm for c in chunks) / n
    w = sum(c.w_comp for c in chunks) / n
    pairs = [(a, c) for a in chunks for c in chunks if a is not c] or [(chunks[0], chunks[0])]
    fb = sum(max(a.f_comp + c.b_comp, a.f_comm + c.b_comm) for a, c in pairs) / len(pairs)
    return {"f": f, "b": b, "w": w, "fb": fb}


# ----------------------------------------------------------------------------------- the plan
def peak_live_bytes(actions, chunk_bytes: Sequence[float]) -> Tuple[float, List[int]]:
    """Replay one rank's action list: peak of Σ bytes of (micro-batch, chunk) whose F ran and B has
    not (FB: F half first), as the simulator counts them; also the live count per chunk then."""
    live = [0] * len(chunk_bytes)
    peak, at = 0.0, list(live)
    for act in actions:
        for a in act.parts():
            if a.kind is Kind.F:
                live[a.chunk] += 1
                cur = sum(l * b for l, b in zip(live, chunk_bytes))
                if cur > peak:
                    peak, at = cur, list(live)
            elif a.kind is Kind.B:
                live[a.chunk] -= 1
    return peak, at


def stage_activation_bytes(cfg, stages: Sequence[Sequence[Part]], precision: str, recompute: str,
                           tokens_mb: int) -> Tuple[List[float], List[float]]:
    """Per stage: (activation bytes one micro-batch of `tokens_mb` tokens leaves saved for backward,
    the largest one-layer transient of the backward's recompute)."""
    kept, transient = [], []
    for parts in stages:
        k = t = 0.0
        for p in parts:
            k_, t_ = part_activation_bytes(cfg, p.kind, precision, recompute)
            k += k_ * tokens_mb
            t = max(t, t_ * tokens_mb)
        kept.append(k)
        transient.append(t)
    return kept, transient


def rank_activation_bytes(cfg, split: Sequence[Sequence[int]], schedule, pp_rank: int, precision: str,
                          recompute: str, tokens_mb: int) -> Tuple[float, List[int]]:
    """Peak activation bytes of pipeline rank `pp_rank` running `schedule` with the layer `split`
    (the runtime's): saved activations of its in-flight micro-batches at their peak plus one
    layer's recompute transient; and the live micro-batches per chunk at that peak. The trainer's
    dry run and plan() both count with it."""
    stages = stage_parts(cfg, [len(x) for x in split])
    kept, transient = stage_activation_bytes(cfg, stages, precision, recompute, tokens_mb)
    held = schedule.placement[pp_rank]
    live_bytes, live = peak_live_bytes(schedule.actions[pp_rank], [kept[s] for s in held])
    return live_bytes + max(transient[s] for s in held), live


def plan(model_cfg, layout: Any, recipe: Recipe = Recipe(), hw: Hardware = Hardware(),
         fraction: float = 0.4, sensitivity: Sequence[float] = (0.3, 0.4, 0.5, 0.6)) -> dict:
    """Memory per rank, step time, GPU-hours and validity of `layout` for `recipe` on `hw`."""
    from model.flops import train_flops_per_token  # torch-backed (counts a meta-device model)

    cfg, lay = model_cfg, _as_layout(layout)
    if recipe.recompute not in RECOMPUTE_MODES:
        raise PlanError(f"train.recompute: expected one of {RECOMPUTE_MODES}, got {recipe.recompute!r}")
    num = numerics(recipe.precision)
    if not 0 < fraction <= 1:
        raise PlanError(f"plan.achievable_fraction must be in (0, 1], got {fraction}")
    inv = param_inventory(cfg)
    reasons: List[str] = []

    # ---- layout checks (all of them, not just the first): the trainer's (parallel/topology.py)
    if lay.pp < 1 or lay.dp < 1 or lay.ep < 1:
        raise PlanError(f"parallel.pp/dp/ep must be >= 1, got pp={lay.pp} dp={lay.dp} ep={lay.ep}")
    from parallel.topology import layout_problems, model_fields  # torch-backed module

    reasons += layout_problems(lay.world_size, lay.pp, lay.dp, lay.ep, lay.gpus_per_node, **model_fields(cfg))
    if recipe.seq_len > cfg.max_seq_len:
        reasons.append(f"train.seq_len={recipe.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    if recipe.micro_batch < 1:
        reasons.append(f"train.micro_batch={recipe.micro_batch} must be >= 1")
    elif not recipe.microbatches and recipe.global_batch % (lay.dp * recipe.micro_batch):
        reasons.append(f"train.global_batch={recipe.global_batch} is not a multiple of parallel.dp × "
                       f"train.micro_batch = {lay.dp} × {recipe.micro_batch}")
    n_micro = recipe.n_micro(lay.dp)
    sched = None
    try:
        sched = get_schedule(lay.schedule, lay.pp, n_micro)
    except ScheduleError as err:
        reasons.append(f"{err}")
    try:
        counts, placement, stages = _stages_for(cfg, lay, recipe.precision, recipe.seq_len,
                                                recipe.recompute, n_micro)
    except (ScheduleError, PlanError) as err:
        if str(err) not in reasons:
            reasons.append(str(err))
        return {**_counts(inv), "valid": False, "reasons": reasons, "hardware": hw.name,
                "layout": {"pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "world_size": lay.world_size,
                           "schedule": lay.schedule}, "recipe": asdict(recipe),
                "peak_memory_per_rank_gb": None, "bubble_fraction": None, "step_time_s": None,
                "gpu_hours_per_trillion_tokens": None}
    n_stages = len(stages)
    if n_stages > 2 and min(counts[1:-1]) < 1:
        reasons.append(f"{n_stages} pipeline stages for {cfg.n_layers} layers: an inner stage holds no layer")
    elif cfg.n_layers < n_stages:
        reasons.append(f"{n_stages} pipeline stages for {cfg.n_layers} layers: a stage holds no layer")

    tokens_mb = recipe.micro_batch * recipe.seq_len
    stage_act, stage_transient = stage_activation_bytes(cfg, stages, recipe.precision, recipe.recompute, tokens_mb)

    def live_for(rank: int, acts_per_stage: Sequence[float]) -> Tuple[float, List[int]]:
        if sched is not None:
            chunk_bytes = [acts_per_stage[s] for s in sched.placement[rank]]
            return peak_live_bytes(sched.actions[rank], chunk_bytes)
        return 0.0, [0] * len(placement[rank])

    # ---- memory per rank
    ranks = []
    for r, held in enumerate(placement):
        parts = _rank_parts(cfg, stages, held)
        rb = _rank_bytes(cfg, parts, lay, num, recipe.zero, count_step=False)
        act, live = live_for(r, stage_act)
        transient = max(stage_transient[s] for s in held)
        alt = {}
        for mode in RECOMPUTE_MODES:
            per_stage, trans_m = [], 0.0
            for s, ps in enumerate(stages):
                tot = 0.0
                for p in ps:
                    k_, t_ = part_activation_bytes(cfg, p.kind, recipe.precision, mode)
                    tot += k_ * tokens_mb
                    if s in held:
                        trans_m = max(trans_m, t_ * tokens_mb)
                per_stage.append(tot)
            alt[mode] = (live_for(r, per_stage)[0] + trans_m + rb["param_bytes"] + rb["grad_bytes"]
                         + rb["optimizer_state_bytes"]) / GB
        total = rb["param_bytes"] + rb["grad_bytes"] + rb["optimizer_state_bytes"] + act + transient
        ranks.append({
            "rank": r, "stages": list(held), "layers": " | ".join(_layer_range(stages[s]) for s in held),
            "params_b": rb["param_count"] / 1e9,
            # bytes, as the trainer's metrics.jsonl names them (optimizer: the DP group's fullest rank)
            "param_bytes": rb["param_bytes"], "grad_bytes": rb["grad_bytes"],
            "optimizer_state_bytes": rb["optimizer_state_bytes"], "saved_activation_bytes": int(act + transient),
            "params_gb": rb["param_bytes"] / GB, "grads_gb": rb["grad_bytes"] / GB,
            "optimizer_gb": rb["optimizer_state_bytes"] / GB,
            "activations_gb": (act + transient) / GB, "live_microbatches": live,
            "total_gb": total / GB, "total_gb_by_recompute": alt,
            "_rb": rb,
        })
    peak_rank = max(ranks, key=lambda x: x["total_gb"])
    over = [x["rank"] for x in ranks if x["total_gb"] > hw.hbm_gb]
    if over:
        reasons.append(f"memory: pipeline rank {peak_rank['rank']} needs {peak_rank['total_gb']:.1f} GB > "
                       f"{hw.name} HBM {hw.hbm_gb:g} GB ({len(over)} of {len(ranks)} pipeline ranks over: {over})")

    # ---- time
    flops_token = train_flops_per_token(cfg, recipe.seq_len)
    tokens_step = recipe.global_batch * recipe.seq_len if not recipe.microbatches else \
        recipe.microbatches * recipe.micro_batch * lay.dp * recipe.seq_len

    mfu_peak = hw.tf32_tflops if recipe.precision == "fp32" else hw.bf16_tflops  # the usual MFU basis

    def timing(frac: float) -> Optional[dict]:
        if sched is None:
            return None
        chunks = [chunk_time(cfg, stages[s], lay, recipe, hw, frac) for s in range(n_stages)]
        per_rank = [rank_costs([chunks[s] for s in held]) for held in placement]
        c = {k: max(pr[k] for pr in per_rank) for k in ("f", "b", "w", "fb")}
        act_bytes = tokens_mb * cfg.dim * max(num.act, 2.0)
        p2p = act_bytes / (hw.ib_gbps * GB) if lay.pp > 1 else 0.0
        sim = simulate(sched, Costs(f=c["f"], b=c["b"], w=c["w"], fb=c["fb"], p2p=p2p))
        # DP: reduce-scatter fp32 grads + all-gather weights, over IB; optimizer update HBM-bound
        sync = opt = 0.0
        for x in ranks:
            rb = x["_rb"]
            dpf = (lay.dp - 1) / lay.dp
            edf = (lay.edp - 1) / lay.edp
            s_ = (rb["dense_param_count"] * dpf + rb["expert_param_count"] * edf) * (num.grad + num.weight)
            sync = max(sync, s_ / (hw.ib_gbps * GB))
            opt = max(opt, rb["optimizer_state_elems"] * (num.grad + 2 * num.optimizer + num.weight)
                      / (hw.hbm_gbps * GB))
        step = sim.makespan + sync + opt
        busy_frac = sum(sim.busy_per_rank) / (len(sim.busy_per_rank) * sim.makespan)
        tps = tokens_step / step
        return {
            "achievable_fraction": frac,
            "costs_ms": {**{k: v * 1e3 for k, v in c.items()}, "p2p": p2p * 1e3},
            "stage_ms": [{"stage": s, "f_comp": ch.f_comp * 1e3, "b_comp": ch.b_comp * 1e3,
                          "w_comp": ch.w_comp * 1e3, "f_comm": ch.f_comm * 1e3, "b_comm": ch.b_comm * 1e3}
                         for s, ch in enumerate(chunks)],
            "pipeline_s": sim.makespan, "dp_sync_s": sync, "optimizer_s": opt, "step_time_s": step,
            "bubble_s": sim.bubble, "bubble_fraction": 1 - busy_frac,
            "tokens_per_s": tps,
            "mfu": tps * flops_token / (lay.world_size * mfu_peak * 1e12),
            "gpu_hours_per_trillion_tokens": lay.world_size * step / 3600 * 1e12 / tokens_step,
        }

    main = timing(fraction)
    sens = [timing(f) for f in sensitivity] if main is not None else []
    for x in ranks:
        del x["_rb"]
    out = {
        **_counts(inv),
        "valid": not reasons, "reasons": reasons,
        "hardware": hw.name, "hbm_gb": hw.hbm_gb,
        "layout": {"pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "edp": lay.edp, "world_size": lay.world_size,
                   "gpus_per_node": lay.gpus_per_node, "schedule": lay.schedule, "n_stages": n_stages,
                   "layers_per_stage": counts},
        "recipe": asdict(recipe), "microbatches": n_micro, "tokens_per_step": tokens_step,
        "peak_memory_per_rank_gb": peak_rank["total_gb"], "peak_memory_rank": peak_rank["rank"],
        "per_rank": ranks,
        "activation_bytes_per_token": {
            mode: {kind: part_activation_bytes(cfg, kind, recipe.precision, mode)[0]
                   for kind in ("dense", "moe", "head", "mtp")} for mode in RECOMPUTE_MODES},
        "flops_per_token": flops_token,
    }
    if main is not None:
        out.update({k: main[k] for k in ("step_time_s", "bubble_fraction", "tokens_per_s", "mfu",
                                         "gpu_hours_per_trillion_tokens", "pipeline_s", "dp_sync_s",
                                         "optimizer_s", "bubble_s", "costs_ms", "stage_ms")})
        out["achievable_fraction"] = fraction
        out["sensitivity"] = [{k: s[k] for k in ("achievable_fraction", "step_time_s", "bubble_fraction",
                                                 "mfu", "gpu_hours_per_trillion_tokens")} for s in sens]
    else:
        out.update({"step_time_s": None, "bubble_fraction": None, "gpu_hours_per_trillion_tokens": None})
    return out


def _counts(inv: Inventory) -> dict:
    return {"params_total": inv.total, "params_activated": inv.activated,
            "params_activated_with_embedding": inv.activated_with_embedding,
            "params_mtp": inv.mtp_unique, "params_embedding": inv.embedding}


def model_counts(cfg) -> dict:
    return _counts(param_inventory(cfg))


def schedule_figures(schedule: str, pp: int, n_microbatches: int, costs: dict) -> dict:
    """Schedule mode: the simulator's figures for `costs` (f, b, w, fb, p2p)."""
    known = {f.name for f in fields(Costs)}
    unknown = sorted(set(costs) - known)
    if unknown:
        raise PlanError(f"plan.cost: unknown key(s) {unknown}; known: {sorted(known)}")
    s = get_schedule(schedule, pp, n_microbatches)
    r = simulate(s, Costs(**{k: (float(v) if v is not None else None) for k, v in costs.items()}))
    return {"schedule": schedule, "pp": pp, "microbatches": n_microbatches,
            "costs": {k: costs[k] for k in costs}, "makespan": r.makespan, "bubble": r.bubble,
            "bubble_per_rank": list(r.bubble_per_rank), "peak_activations": r.peak_activations,
            "peak_activations_per_rank": list(r.peak_activations_per_rank),
            "busy_per_rank": list(r.busy_per_rank)}
