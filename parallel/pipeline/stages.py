"""Split the model into pipeline stages and build the stage modules a rank holds.

``split_layers(cfg, n_stages)`` cuts the ``n_layers`` transformer blocks into ``n_stages``
contiguous slices balanced by per-token forward cost: an MoE block costs its attention plus the
*activated* experts (top-k + shared) and the router, a dense block its attention plus the dense
SwiGLU, the first stage also carries the embedding (a lookup: nearly free) and the last stage the
final norm, the output head and the MTP depths (eh_proj + one MoE block + the head again, each).
With DeepSeek-V3's sizes the head + MTP weigh about three blocks, so the last stage gets fewer
layers.

``build_stage_modules(cfg, schedule, pp_rank)`` returns one :class:`model.DeepSeekV3` per chunk
the rank holds (``schedule.placement[pp_rank]``), each built only for its stage's layers. When a
rank holds both the embedding stage and the head stage (DualPipe ranks 0 and pp-1, DualPipeV rank
0), the two modules SHARE one ``nn.Embedding`` object: the MTP modules of the head stage use the
very tensor the first stage embeds with, as in the paper. Under 1F1B (pp > 1) the first and the
last stage live on different ranks and each holds a copy of the embedding (the last one for MTP):
the copies start equal (seeded by name) and the engine sums their gradients over the stage-pair
group of ranks 0 and pp-1 (Megatron's "embedding group"), so they stay equal.

``plan_pipeline`` does every static check (schedule shape: even pp, micro-batch count; layer
split) without touching torch.distributed, so the trainer can call it before any process group
exists.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from model.config import ConfigError, ModelConfig
from model.moe import ExpertPlacement
from model.transformer import DeepSeekV3
from parallel.dispatch import AllToAllDispatcher, shard_experts

from . import get_schedule
from .schedule import Schedule


class StageError(ConfigError):
    """An impossible stage split. The message names the offending key (parallel.pp /
    parallel.layers_per_stage)."""


# ------------------------------------------------------------------------------------ costs
def _attention_cost(cfg: ModelConfig, seq_len: int) -> float:
    h = cfg.n_heads
    if cfg.q_lora_rank:
        q = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = cfg.dim * h * cfg.qk_head_dim
    kv = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = h * cfg.v_head_dim * cfg.dim
    core = h * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)  # causal: half the keys on average
    return q + kv + out + core


def _moe_cost(cfg: ModelConfig) -> float:
    return 3 * cfg.dim * cfg.moe_inter_dim * (cfg.n_activated_experts + cfg.n_shared_experts) + cfg.dim * cfg.n_routed_experts


def layer_cost(cfg: ModelConfig, layer_id: int, seq_len: Optional[int] = None) -> float:
    """Per-token forward multiply-adds of block ``layer_id`` (backward is ~2x for every kind)."""
    seq = seq_len or cfg.max_seq_len
    ffn = _moe_cost(cfg) if cfg.is_moe_layer(layer_id) else 3 * cfg.dim * cfg.inter_dim
    return _attention_cost(cfg, seq) + ffn


def embed_cost(cfg: ModelConfig) -> float:
    """The embedding lookup (and its scatter-add backward): memory-bound, ~dim per token."""
    return float(cfg.dim)


def head_cost(cfg: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Final norm + output head + every MTP depth (eh_proj, one MoE block, the shared head)."""
    seq = seq_len or cfg.max_seq_len
    head = cfg.dim * cfg.vocab_size
    mtp = 2 * cfg.dim * cfg.dim + _attention_cost(cfg, seq) + _moe_cost(cfg) + head
    return head + cfg.mtp_depth * mtp


def stage_costs(cfg: ModelConfig, split: Sequence[Sequence[int]], seq_len: Optional[int] = None) -> list[float]:
    costs = []
    for s, layers in enumerate(split):
        c = sum(layer_cost(cfg, i, seq_len) for i in layers)
        if s == 0:
            c += embed_cost(cfg)
        if s == len(split) - 1:
            c += head_cost(cfg, seq_len)
        costs.append(c)
    return costs


# ------------------------------------------------------------------------------------ split
def split_layers(cfg: ModelConfig, n_stages: int, layers_per_stage: Optional[Sequence[int]] = None,
                 seq_len: Optional[int] = None) -> list[list[int]]:
    """Contiguous layer ids per stage. ``layers_per_stage`` (one count per stage) overrides the
    cost-balanced split (min over splits of the most expensive stage; ties → earlier cuts)."""
    n = cfg.n_layers
    if not isinstance(n_stages, int) or n_stages < 1:
        raise StageError(f"parallel.pp: need at least one pipeline stage, got {n_stages}")
    if layers_per_stage is not None:
        counts = list(layers_per_stage)
        if len(counts) != n_stages:
            raise StageError(f"parallel.layers_per_stage: {len(counts)} entries for {n_stages} pipeline stages")
        if any((not isinstance(c, int)) or c < 1 for c in counts):
            raise StageError(f"parallel.layers_per_stage: every stage needs >= 1 layer, got {counts}")
        if sum(counts) != n:
            raise StageError(f"parallel.layers_per_stage: {counts} sums to {sum(counts)}, "
                             f"model.n_layers={n}")
    else:
        if n < n_stages:
            raise StageError(f"parallel.pp: {n_stages} pipeline stages need at least one layer each, "
                             f"but model.n_layers={n}")
        counts = _balanced_counts(cfg, n_stages, seq_len)
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def _balanced_counts(cfg: ModelConfig, n_stages: int, seq_len: Optional[int]) -> list[int]:
    n = cfg.n_layers
    w = [layer_cost(cfg, i, seq_len) for i in range(n)]
    w[0] += embed_cost(cfg)
    w[-1] += head_cost(cfg, seq_len)
    prefix = [0.0]
    for x in w:
        prefix.append(prefix[-1] + x)
    inf = float("inf")
    # best[s][j]: minimal max-stage cost of layers [0, j) in s stages; cut[s][j]: start of stage s-1
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], prefix[j] - prefix[i])
                if v < best[s][j] - 1e-9 * max(1.0, v):
                    best[s][j], cut[s][j] = v, i
    counts, j = [], n
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


# ------------------------------------------------------------------------------------ modules
def build_stage_modules(cfg: ModelConfig, schedule: Schedule, pp_rank: int,
                        layers_per_stage: Optional[Sequence[int]] = None,
                        split: Optional[Sequence[Sequence[int]]] = None,
                        device: Optional[torch.device] = None, *,
                        experts: ExpertPlacement = ExpertPlacement(),
                        dispatchers: Optional[Sequence] = None) -> list[DeepSeekV3]:
    """One DeepSeekV3 per chunk of ``pp_rank`` (index = chunk), each holding only its stage.

    ``experts``: this rank's expert placement; ``dispatchers``: one per chunk
    (``stage_dispatchers``), None = in-process experts.

    Modules on the same rank that both need an embedding share ONE ``nn.Embedding`` object.
    Parameters are uninitialised: call ``init_weights(seed)`` on every module (it seeds by global
    name, so each copy of a stage — and each copy of the embedding — gets identical values)."""
    n_stages = schedule.n_stages
    if split is None:
        split = split_layers(cfg, n_stages, layers_per_stage)
    if len(split) != n_stages:
        raise StageError(f"parallel.layers_per_stage: split has {len(split)} stages, schedule {n_stages}")
    modules = []
    for c, stage in enumerate(schedule.placement[pp_rank]):
        with torch.device(device) if device is not None else _nullcontext():
            m = DeepSeekV3(cfg, layer_ids=split[stage], has_embed=stage == 0, has_head=stage == n_stages - 1,
                           experts=experts, dispatcher=dispatchers[c] if dispatchers else None,
                           init_seed=None)  # the trainer initialises every module after building
        m.pipeline_stage = stage
        modules.append(m)
    shared = next((m.embed for m in modules if m.embed is not None), None)
    for m in modules:
        if m.embed is not None:
            m.embed = shared  # one tensor: the head stage's MTP uses the first stage's embedding
    return modules


def stage_dispatchers(topo, n_chunks: int, n_experts: int) -> list:
    """One AllToAllDispatcher per chunk of this rank (call on EVERY rank; [] when ep == 1: the
    LocalDispatcher runs every expert in process).

    Chunk 0 uses ``topo.ep_group``; every further chunk gets its OWN EP process group over the
    same ranks (built here with ``topo.new_group_of`` for every EP group, in the same order on all
    ranks: a collective over the default group). DualPipe's FB pairs run a forward on one chunk
    concurrently with a backward on the other; with one group per chunk their all-to-alls never
    interleave on a single communicator, and each group sees the same collective order on every
    EP rank (the order of the schedule's actions on that chunk)."""
    if topo.ep == 1:
        return []
    dispatchers = []
    for c in range(n_chunks):
        group = topo.ep_group if c == 0 else topo.new_group_of(topo.layout.ep_groups())
        dispatchers.append(AllToAllDispatcher(group, n_experts, topo.gpus_per_node))
    return dispatchers


def shard_stage_experts(modules: Sequence[DeepSeekV3], topo) -> list:
    """Expert-parallel sharding of already built (full) stage modules, one ``stage_dispatchers``
    dispatcher per chunk (call on EVERY rank, before ``init_weights`` and before building the
    optimizer). Training builds the modules sharded instead (``build_stage_modules(experts=...,
    dispatchers=...)``); this converts full modules, as tests do. Returns the dispatchers."""
    dispatchers = stage_dispatchers(topo, len(modules), modules[0].cfg.n_routed_experts if modules else 0)
    for m, disp in zip(modules, dispatchers):
        shard_experts(m, topo.ep_rank, topo.ep, disp.group, topo.gpus_per_node, dispatcher=disp)
    return dispatchers


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def plan_pipeline(cfg: ModelConfig, schedule_name: str, pp: int, n_microbatches: int,
                  layers_per_stage: Optional[Sequence[int]] = None) -> tuple[Schedule, list[list[int]]]:
    """Every static pipeline check, with no process group: returns (schedule, layer split).

    Raises ``ScheduleError`` (unknown schedule, odd pp or a bad micro-batch count for DualPipe,
    ...) or ``StageError`` (fewer layers than stages, bad ``parallel.layers_per_stage``)."""
    schedule = get_schedule(schedule_name, pp, n_microbatches)
    split = split_layers(cfg, schedule.n_stages, layers_per_stage)
    return schedule, split
