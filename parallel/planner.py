"""The planner's model of memory and time for a PP × DP (× EP inside DP) layout. Pure functions
that count with the runtime's own code: parameter and FLOP counts from model/flops.py (the model's
parts built on the meta device), a rank's parameters from the modules training builds for it
(parallel/pipeline/stages.py, on the meta device), the layer split training cuts
(stages.split_layers, with split_layers here as its cost model), layout checks from
parallel/topology.py, the ZeRO-1 share from parallel/partition.py, schedules and their timing
from parallel/pipeline (the action lists the runtime executes, replayed by the simulator).
Nothing here starts a process.

Entry points
------------
* ``split_layers(cfg, placement, ...)``      layers per pipeline stage, balanced per rank
* ``predict_rank_bytes(cfg, layout, ...)``   parameter / gradient / optimizer bytes of one rank
* ``rank_parameters(cfg, layout, split, rank)`` the parameters a rank trains, in its engine's order
* ``activation_table(cfg, ...)``             what one layer stores per token for its backward
                                             (parallel/activations.py)
* ``plan(cfg, layout, recipe, hw, ...)``     the whole plan: memory per rank, step time, validity

Counting (model/flops.count_params)
-----------------------------------
params_total: main model (embedding, 61 blocks, final norm, head), MTP excluded. params_activated:
per token, every non-expert weight + shared experts + top-k/E of the routed experts, EXCLUDING
the embedding table (a lookup: no FLOPs); the head counts. 671B config: 671.03B total, 36.63B
activated (37.55B with the embedding) — the paper's "37B" rounded to a whole billion. params_mtp:
MTP parameters not shared with the main model (embedding and head are shared): 11.61B.

Stages: stage 0 = embedding + first layers, last stage = last layers + final norm + head + MTP
depths (DualPipe / DualPipeV rank 0 holds both, so MTP shares embedding and head physically).
Layers per stage: ``split_layers`` here balances what a RANK runs (DualPipe: stage r + stage
pp-1-r) and breaks ties by memory; parallel/pipeline/stages.split_layers cuts the runtime's stages
with it and the planner asks stages.split_layers, so it plans the split training builds. Under
DualPipe rank r holds stages r and pp-1-r: its per-rank weights are both copies, its gradients
are summed with the partner's before the DP reduction.

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
parallel/partition.zero_partition, the function the trainer's optimizer (parallel/zero.py) runs
(partition.rank_state_elements: over optimizer_param_groups, as ShardedAdamW groups them): each
part's parameters end to end, cut into equal ranges (within one element), so predict_rank_bytes
is exact per rank (tests/test_plan_vs_run.py compares it with real runs) and plan() reports the
fullest rank of each DP group (its last: ceil(n / group) elements).
The parameter EMA lives in CPU memory (not counted).

Activations (``recompute``): parallel/activations.py lists, per part and micro-batch, each tensor
autograd keeps for backward. ``Recipe.device`` (``plan.device``) picks the list: cpu = what this
runtime's modules save there (tests/test_plan_vs_run_activations.py: within 5% of real runs' saved-
tensor meter); cuda = the paper's kernels (fused norms and attention, FP8-cached GEMM inputs, under
fp8 SwiGLU outputs recomputed and the gate weight folded into the SwiGLU) — the GPU planning
target, which the current modules do not implement (see parallel/activations.py). Per rank:
``saved_activation_bytes`` = the held peak over its schedule (``peak_live_bytes``), plus one
layer's recompute transient in the totals.
none:             every tensor the modules keep for backward.
norm_and_up_proj: the paper's recompute: RMSNorm outputs and the MLA up-projection outputs
                  (per-head q, k, v) are recomputed in backward from the kept latents.
full:             only each block's input is kept; one block is rematerialised at a time.

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
from dataclasses import asdict, dataclass, fields, replace

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from model.config import RECOMPUTE_MODES, ConfigError, ModelConfig, unknown_keys  # torch-free
from model.naming import is_expert_param  # torch-free
from parallel.a2a_bytes import two_hop_bytes  # torch-free
from parallel.activations import DEVICES, ActivationError, activation_table, part_saved_bytes  # torch-free
from parallel.pipeline import Costs, Kind, ScheduleError, get_schedule, simulate  # torch-free

if TYPE_CHECKING:
    from model.flops import Part

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


# ----------------------------------------------------------------------------------- the model's parts
def _cfg_key(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def _parts(cfg):
    """The model's parts (embed, layer.<i>…, mtp.<k>…, head) with their parameter and FLOP counts:
    model/flops.py, the trainer's count, from the modules built on the meta device."""
    from model.flops import model_parts  # torch-backed, as every such import here

    return model_parts(cfg)


def param_counts(cfg) -> dict:
    """model/flops.count_params under the run contract's keys."""
    from model.flops import count_params

    c = count_params(cfg)
    return {"params_total": c.total, "params_activated": c.activated - c.embedding,
            "params_activated_with_embedding": c.activated, "params_mtp": c.mtp, "params_embedding": c.embedding}

# ----------------------------------------------------------------------------------- activations
# parallel/activations.py lists what the runtime keeps for backward (part_saved_bytes, per
# micro-batch); the split's balance heuristic wants it per token.
def part_activation_bytes(cfg, kind: str, precision: str, recompute: str, *, micro_batch: int = 1,
                          seq_len: int = 4096, ep: int = 1, device: str = "cuda") -> Tuple[float, float]:
    """part_saved_bytes per token: (kept until backward, rematerialised during this part's backward)."""
    if recompute not in RECOMPUTE_MODES:
        raise PlanError(f"train.recompute: expected one of {RECOMPUTE_MODES}, got {recompute!r}")
    try:
        kept, transient = part_saved_bytes(cfg, kind, precision, recompute, micro_batch=micro_batch,
                                           seq_len=seq_len, ep=ep, device=device)
    except ActivationError as err:
        raise PlanError(str(err)) from None
    tokens = micro_batch * seq_len
    return kept / tokens, transient / tokens


# ----------------------------------------------------------------------------------- stages
def _any_schedule(schedule: str, pp: int):
    """The schedule at the smallest even micro-batch count >= 2·pp (its placement, any count)."""
    n = max(2 * pp, 2)
    return get_schedule(schedule, pp, n + n % 2)


def _part_cost(p, seq: int, lp_speed: float) -> float:
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
                 live: Optional[Sequence[Sequence[Tuple[int, ...]]]] = None, ep: int = 1) -> List[int]:
    """Layers per stage (contiguous, in order, >= 1 each; needs n_layers >= n_stages): first so
    that the heaviest rank — the sum of the stages it holds (DualPipe pairs stage r with pp-1-r) —
    is as light as possible; among equally fast splits the one whose fullest rank holds the fewest
    bytes (weights + gradients + activations of the in-flight micro-batches, `live` =
    live_points(schedule)); then the most even stages (smallest Σ stage cost²).

    Stage 0 also holds the embedding, the last stage the final norm, head and MTP depths (forward
    cost proxy: FP8 GEMMs at half the BF16 cost under fp8). Deterministic local search over
    single-layer moves from an even start. parallel/pipeline/stages.split_layers cuts the
    runtime's stages with it."""
    parts = _parts(cfg)
    layers = [p for p in parts if p.name.startswith("layer.")]
    seq = seq_len or cfg.original_seq_len
    num = numerics(precision)
    lp = 2.0 if num.lp_gemms else 1.0
    cost = [_part_cost(p, seq, lp) for p in layers]
    act = [part_activation_bytes(cfg, p.kind, precision, recompute)[0] * seq for p in layers]
    par = [(p.dense_params + p.expert_params / ep) * (num.weight + num.grad) for p in layers]
    ends = {"first": [parts[0]], "last": [p for p in parts if p.kind in ("mtp", "head")]}
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
            if counts[a] <= 1:
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


def stage_parts(cfg, counts: Sequence[int]) -> List[list]:
    """The model's parts (model/flops.py) on every stage for `counts` layers per stage: stage 0
    also the embedding, the last stage also the MTP depths and the head (+ final norm)."""
    parts = _parts(cfg)
    layers = [p for p in parts if p.name.startswith("layer.")]
    out, pos = [], 0
    for s, c in enumerate(counts):
        out.append(([parts[0]] if s == 0 else []) + layers[pos:pos + c]
                   + ([p for p in parts if p.kind in ("mtp", "head")] if s == len(counts) - 1 else []))
        pos += c
    return out


def _layer_range(parts: list) -> str:
    ids = [int(p.name.split(".")[1]) for p in parts if p.name.startswith("layer.")]
    extra = [p.name.split(".")[0] for p in parts if not p.name.startswith("layer.")]
    txt = f"{min(ids)}-{max(ids)}" if ids else "-"
    tags = sorted({"embed" if e == "embed" else "head" if e == "head" else "mtp" for e in extra})
    return txt + ("+" + "+".join(tags) if tags else "")


# ----------------------------------------------------------------------------------- bytes per rank
@dataclass(frozen=True)
class PlanLayout:
    """The layout being planned. Unlike parallel/topology.Layout it may be invalid (plan() lists
    why) and carries the schedule and the stage split; `ranks` is its rank arithmetic."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    world_size: int = 1
    gpus_per_node: int = 8
    schedule: str = "1f1b"
    layers_per_stage: Optional[Tuple[int, ...]] = None

    @property
    def ranks(self):
        """Rank arithmetic (coords, edp, n_nodes_ep) of the pp × dp ranks (EP groups must be whole)."""
        from parallel.topology import Layout  # torch-backed module

        return Layout(self.pp * self.dp, self.pp, self.dp, self.ep, self.gpus_per_node)


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
    """(layers per stage, placement, parts per stage) as training cuts them: parallel/pipeline/
    stages.split_layers (parallel.layers_per_stage checked, else the cost-balanced split) for the
    schedule at n_micro (an invalid n_micro → the smallest valid count)."""
    from parallel.pipeline.stages import split_layers as runtime_split  # torch-backed (the model)

    try:
        sched = get_schedule(lay.schedule, lay.pp, n_micro)
    except ScheduleError:
        sched = _any_schedule(lay.schedule, lay.pp)
    try:
        split = runtime_split(cfg, sched, lay.layers_per_stage, precision=precision, seq_len=seq_len,
                              recompute=recompute, ep=lay.ep)
    except ConfigError as err:
        raise PlanError(str(err)) from None
    counts = [len(x) for x in split]
    return counts, sched.placement, stage_parts(cfg, counts)


def rank_parameters(cfg, lay: PlanLayout, counts: Sequence[int], rank: int) -> list:
    """Global `rank`'s parameters (meta-device tensors) as its engine lists them: the modules the
    trainer builds for it (its stages, DualPipe both, one shared embedding; its EP rank's experts)."""
    if not 0 <= rank < lay.pp * lay.dp:
        raise PlanError(f"rank {rank} outside world size {lay.pp * lay.dp}")
    c = lay.ranks.coords(rank)
    return _built(_cfg_key(cfg), lay.schedule, lay.pp, tuple(counts), c["pp_rank"], lay.ep, c["ep_rank"])


@functools.lru_cache(maxsize=256)
def _built(key: str, schedule: str, pp: int, counts: Tuple[int, ...], pp_rank: int, ep: int, ep_rank: int) -> list:
    import torch

    from model.moe import ExpertPlacement
    from model.transformer import DeepSeekV3
    from parallel.pipeline.stages import build_stage_modules, engine_named_parameters

    cfg, meta, experts = ModelConfig.from_dict(json.loads(key)), torch.device("meta"), ExpertPlacement(ep_rank, ep)
    if pp == 1:  # the whole model, as the trainer builds it without a pipeline
        with meta:
            modules = [DeepSeekV3(cfg, experts=experts, init_seed=None)]
    else:
        starts = [sum(counts[:s]) for s in range(len(counts))]
        split = [list(range(a, a + c)) for a, c in zip(starts, counts)]
        modules = build_stage_modules(cfg, _any_schedule(schedule, pp), pp_rank, split=split, device=meta,
                                      experts=experts)
    return engine_named_parameters(modules, pipelined=pp > 1)


def _rank_bytes(cfg, lay: PlanLayout, counts: Sequence[int], rank: int, num: Numerics, zero: bool,
                count_step: bool) -> dict:
    """Bytes of global `rank`'s built parameters under `num`; the optimizer state is its share by
    the trainer's ZeRO-1 partition (parallel/partition.py; zero=False: everything it trains) ×
    (master + moments), plus with count_step one fp32 AdamW step per piece."""
    from parallel.partition import rank_state_elements

    named = rank_parameters(cfg, lay, counts, rank)
    held = sum(p.numel() for _, p in named)
    expert = sum(p.numel() for n, p in named if is_expert_param(n))
    c = lay.ranks.coords(rank)
    elems, pieces = rank_state_elements(named, lay.dp, lay.ranks.edp, c["dp_rank"], c["edp_rank"], zero)
    return {
        "param_count": held, "dense_param_count": held - expert, "expert_param_count": expert,
        "param_tensors": len(named),
        "param_bytes": int(held * num.weight),
        "grad_bytes": int(held * num.grad),
        "optimizer_state_bytes": int(elems * num.optimizer) + (4 * pieces if count_step else 0),
        "optimizer_state_elems": elems, "optimizer_state_pieces": pieces,
    }


def predict_rank_bytes(model_cfg, layout: Any, rank: int = 0, *, precision: str = "fp32",
                       zero: bool = False, count_step: bool = True, seq_len: Optional[int] = None,
                       recompute: str = "none", n_microbatches: int = 0, moment_dtype: str = "auto") -> dict:
    """Parameter, gradient and optimizer-state bytes held by global `rank` of `layout`.

    layout: a PlanLayout, parallel.topology.Layout or any object/dict with pp, dp (or
    world_size), ep and optionally schedule, gpus_per_node, layers_per_stage. The rank's
    parameters are the modules training builds for it (rank_parameters), on the stage split
    training cuts (parallel/pipeline/stages.split_layers(model_cfg, schedule at n_microbatches,
    precision=, seq_len=, recompute=, ep=)). Bytes per element follow `precision` (NUMERICS:
    fp32 = FP32 weights, no separate master; bf16/fp8 = BF16 weights + FP32 master), the moments
    `moment_dtype` (auto = the precision's: fp32 under fp32, bf16 otherwise).
    Returns dict(param_bytes, grad_bytes, optimizer_state_bytes, param_count, stages, ...)."""
    from parallel.zero import MOMENT_DTYPES, moment_dtype_for  # the optimizer's choice (torch-backed)

    lay = _as_layout(layout)
    if moment_dtype not in ("auto", *MOMENT_DTYPES):
        raise PlanError(f"optim.moment_dtype: expected auto|{'|'.join(MOMENT_DTYPES)}, got {moment_dtype!r}")
    # exp_avg + exp_avg_sq per element
    num = replace(numerics(precision), moments=2 * moment_dtype_for(moment_dtype, precision).itemsize)
    counts, placement, _ = _stages_for(model_cfg, lay, precision, seq_len, recompute, n_microbatches)
    out = _rank_bytes(model_cfg, lay, counts, rank, num, zero, count_step)
    out["stages"] = list(placement[rank // lay.dp])
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
    device: str = "cuda"  # cuda | cpu: how the runtime stores activations there (parallel/activations.py)

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
    n_nodes = lay.ranks.n_nodes_ep
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
                           micro_batch: int, seq_len: int, ep: int = 1, device: str = "cuda",
                           kernels: str = "paper") -> Tuple[List[float], List[float]]:
    """Per stage: (activation bytes one micro-batch of `micro_batch` × `seq_len` tokens leaves saved
    for backward, the largest one-layer transient of the backward's recompute)."""
    kept, transient = [], []
    for parts in stages:
        k = t = 0.0
        for p in parts:
            k_, t_ = part_saved_bytes(cfg, p.kind, precision, recompute, micro_batch=micro_batch,
                                      seq_len=seq_len, ep=ep, device=device, kernels=kernels)
            k += k_
            t = max(t, t_)
        kept.append(k)
        transient.append(t)
    return kept, transient


def rank_activation_bytes(cfg, split: Sequence[Sequence[int]], schedule, pp_rank: int, precision: str,
                          recompute: str, micro_batch: int, seq_len: int, ep: int = 1,
                          device: str = "cuda") -> Tuple[float, List[int]]:
    """Peak activation bytes of pipeline rank `pp_rank` running `schedule` with the layer `split`
    (the runtime's): saved activations of its in-flight micro-batches at their peak plus one
    layer's recompute transient; and the live micro-batches per chunk at that peak. The trainer's
    dry run and plan() both count with it."""
    stages = stage_parts(cfg, [len(x) for x in split])
    kept, transient = stage_activation_bytes(cfg, stages, precision, recompute, micro_batch, seq_len, ep, device)
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
    if recipe.device not in DEVICES:
        raise PlanError(f"plan.device: expected one of {DEVICES}, got {recipe.device!r}")
    num = numerics(recipe.precision)
    if not 0 < fraction <= 1:
        raise PlanError(f"plan.achievable_fraction must be in (0, 1], got {fraction}")
    reasons: List[str] = []

    def invalid() -> dict:  # no per-rank figures: the ranks cannot be built
        return {**param_counts(cfg), "valid": False, "reasons": reasons, "hardware": hw.name,
                "layout": {"pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "world_size": lay.world_size,
                           "schedule": lay.schedule}, "recipe": asdict(recipe),
                "peak_memory_per_rank_gb": None, "bubble_fraction": None, "step_time_s": None,
                "gpu_hours_per_trillion_tokens": None}

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
    if lay.dp % lay.ep or cfg.n_routed_experts % lay.ep:
        return invalid()  # no whole EP groups / expert shards (layout_problems said which)
    try:
        counts, placement, stages = _stages_for(cfg, lay, recipe.precision, recipe.seq_len,
                                                recipe.recompute, n_micro)
    except (ScheduleError, PlanError) as err:
        if str(err) not in reasons:
            reasons.append(str(err))
        return invalid()
    n_stages = len(stages)

    tokens_mb = recipe.micro_batch * recipe.seq_len
    shape = dict(micro_batch=recipe.micro_batch, seq_len=recipe.seq_len, ep=lay.ep, device=recipe.device)
    # per stage, under every recompute mode (the run's is what the ranks hold), and (planning CUDA's
    # paper kernels, not yet this runtime's modules) what these modules would keep under the run's
    by_mode = {m: stage_activation_bytes(cfg, stages, recipe.precision, m, **shape) for m in RECOMPUTE_MODES}
    stage_act, stage_transient = by_mode[recipe.recompute]
    runtime_modules = stage_activation_bytes(cfg, stages, recipe.precision, recipe.recompute, **shape,
                                             kernels="runtime") if recipe.device == "cuda" else None

    def live_for(rank: int, acts_per_stage: Sequence[float]) -> Tuple[float, List[int]]:
        if sched is not None:
            chunk_bytes = [acts_per_stage[s] for s in sched.placement[rank]]
            return peak_live_bytes(sched.actions[rank], chunk_bytes)
        return 0.0, [0] * len(placement[rank])

    # ---- memory per rank
    ranks = []
    for r, held in enumerate(placement):
        # the DP group's fullest rank: its last (zero_partition gives it ceil(n / group) elements
        # of both the DP and the expert-DP part)
        rb = _rank_bytes(cfg, lay, counts, r * lay.dp + lay.dp - 1, num, recipe.zero, count_step=False)
        act, live = live_for(r, stage_act)
        transient = max(stage_transient[s] for s in held)
        state = rb["param_bytes"] + rb["grad_bytes"] + rb["optimizer_state_bytes"]

        def total_gb(kept_and_transient: Tuple[List[float], List[float]]) -> float:
            kept, trans = kept_and_transient
            return (live_for(r, kept)[0] + max(trans[s] for s in held) + state) / GB

        alt = {m: total_gb(v) for m, v in by_mode.items()}
        runtime_gb = total_gb(runtime_modules) if runtime_modules is not None else None
        total = state + act + transient
        ranks.append({
            "rank": r, "stages": list(held), "layers": " | ".join(_layer_range(stages[s]) for s in held),
            "params_b": rb["param_count"] / 1e9,
            # bytes, as the trainer's metrics.jsonl names them (optimizer: the DP group's fullest rank)
            "param_bytes": rb["param_bytes"], "grad_bytes": rb["grad_bytes"],
            "optimizer_state_bytes": rb["optimizer_state_bytes"],
            # what autograd holds at the peak (the trainer's saved-tensor meter); the recompute's
            # transient is rematerialised inside backward, counted in the totals only
            "saved_activation_bytes": int(round(act)), "recompute_transient_bytes": int(round(transient)),
            "params_gb": rb["param_bytes"] / GB, "grads_gb": rb["grad_bytes"] / GB,
            "optimizer_gb": rb["optimizer_state_bytes"] / GB,
            "activations_gb": (act + transient) / GB, "live_microbatches": live,
            "total_gb": total / GB, "total_gb_by_recompute": alt, "total_gb_runtime_modules": runtime_gb,
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
            edf = (lay.ranks.edp - 1) / lay.ranks.edp
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
        **param_counts(cfg),
        "valid": not reasons, "reasons": reasons,
        "hardware": hw.name, "hbm_gb": hw.hbm_gb,
        "layout": {"pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "edp": lay.ranks.edp, "world_size": lay.world_size,
                   "gpus_per_node": lay.gpus_per_node, "schedule": lay.schedule, "n_stages": n_stages,
                   "layers_per_stage": counts},
        "recipe": asdict(recipe), "microbatches": n_micro, "tokens_per_step": tokens_step,
        "peak_memory_per_rank_gb": peak_rank["total_gb"], "peak_memory_rank": peak_rank["rank"],
        "per_rank": ranks,
        "activation_bytes_per_token": {
            mode: {kind: part_activation_bytes(cfg, kind, recipe.precision, mode, **shape)[0]
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
