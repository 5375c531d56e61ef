"""Split the model into pipeline stages and build the stage modules a rank holds.

``split_layers(cfg, schedule)`` cuts the ``n_layers`` transformer blocks into the schedule's
stages, contiguous, with the planner's cost model (parallel/planner.py: one split for the planner
and the runtime): the first stage also carries the embedding and the last stage the final norm,
the output head and the MTP depths, and what is balanced is each RANK's load (DualPipe: stage r +
stage pp-1-r). With DeepSeek-V3's sizes the head + MTP weigh about three blocks.

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
from model.mixed import Numerics
from model.moe import ExpertPlacement
from model.transformer import DeepSeekV3
from model.wire import FP32, Wire
from parallel import planner
from parallel.dispatch import build_dispatcher, shard_experts

from . import get_schedule
from .schedule import Schedule


class StageError(ConfigError):
    """An impossible stage split. The message names the offending key (parallel.pp /
    parallel.layers_per_stage)."""


# ------------------------------------------------------------------------------------ split
def split_layers(cfg: ModelConfig, schedule: Schedule, layers_per_stage: Optional[Sequence[int]] = None, *,
                 precision: str = "fp32", seq_len: Optional[int] = None, recompute: str = "none",
                 ep: int = 1) -> list[list[int]]:
    """Contiguous layer ids per stage of ``schedule``. ``layers_per_stage`` (one count per stage)
    overrides the default, the planner's split (parallel/planner.split_layers): the heaviest RANK
    — DualPipe holds stage r and pp-1-r — as light as possible, then the fewest bytes on the
    fullest rank; the planner and the trainer both cut with it, so planned shards are built ones."""
    n, n_stages = cfg.n_layers, schedule.n_stages
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
        counts = planner.split_layers(cfg, schedule.placement, n_stages, precision, seq_len, recompute,
                                      planner.live_points(schedule), ep)
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


# ------------------------------------------------------------------------------------ modules
def build_stage_modules(cfg: ModelConfig, schedule: Schedule, pp_rank: int,
                        layers_per_stage: Optional[Sequence[int]] = None,
                        split: Optional[Sequence[Sequence[int]]] = None,
                        device: Optional[torch.device] = None, *,
                        experts: ExpertPlacement = ExpertPlacement(),
                        dispatchers: Optional[Sequence] = None, recompute: str = "none",
                        numerics: Numerics = Numerics()) -> list[DeepSeekV3]:
    """One DeepSeekV3 per chunk of ``pp_rank`` (index = chunk), each holding only its stage.

    ``experts``: this rank's expert placement; ``dispatchers``: one per chunk
    (``stage_dispatchers``), None = in-process experts; ``recompute``: train.recompute;
    ``numerics``: weight storage dtype and FP8 switch (model/mixed.py).

    Modules on the same rank that both need an embedding share ONE ``nn.Embedding`` object.
    Parameters are uninitialised: call ``init_weights(seed)`` on every module (it seeds by global
    name, so each copy of a stage — and each copy of the embedding — gets identical values)."""
    n_stages = schedule.n_stages
    if split is None:
        split = split_layers(cfg, schedule, layers_per_stage)
    if len(split) != n_stages:
        raise StageError(f"parallel.layers_per_stage: split has {len(split)} stages, schedule {n_stages}")
    modules = []
    for c, stage in enumerate(schedule.placement[pp_rank]):
        with torch.device(device) if device is not None else _nullcontext():
            m = DeepSeekV3(cfg, layer_ids=split[stage], has_embed=stage == 0, has_head=stage == n_stages - 1,
                           experts=experts, dispatcher=dispatchers[c] if dispatchers else None,
                           recompute=recompute, init_seed=None, numerics=numerics)  # the trainer initialises every module after building
        m.pipeline_stage = stage
        modules.append(m)
    shared = next((m.embed for m in modules if m.embed is not None), None)
    for m in modules:
        if m.embed is not None:
            m.embed = shared  # one tensor: the head stage's MTP uses the first stage's embedding
    return modules


def engine_named_parameters(modules: Sequence[torch.nn.Module], pipelined: bool) -> list:
    """A rank's parameters as its engine lists them (the order its ZeRO-1 optimizer partitions):
    the whole model (pp = 1, trainer.local_engine.LocalEngine) in named_parameters() order; stage
    modules (parallel.pipeline.runtime.PipelineEngine) every parameter once (one shared
    embedding), sorted by name."""
    if not pipelined:
        return list(modules[0].named_parameters())
    named: dict = {}
    for m in modules:
        named.update(dict(m.named_parameters()))
    return sorted(named.items())


def stage_dispatchers(topo, n_chunks: int, n_experts: int, mode: str = "flat", wire: Wire = FP32) -> list:
    """One expert-parallel dispatcher (`parallel.dispatch` mode: flat | two_hop, payload `wire`)
    per chunk of this rank (call on EVERY rank; [] when ep == 1: the LocalDispatcher runs every
    expert in process).

    Chunk 0 uses the topology's EP groups (``ep_group`` and, for two_hop, ``ep_inter_group`` /
    ``ep_intra_group``); every further chunk gets its OWN groups over the same ranks (built here
    with ``topo.new_ep_groups``, in the same order on all ranks: a collective over the default
    group). DualPipe's FB pairs run a forward on one chunk concurrently with a backward on the
    other; with one set of groups per chunk their all-to-alls never interleave on a single
    communicator, and each group sees the same collective order on every EP rank (the order of
    the schedule's actions on that chunk)."""
    if topo.ep == 1:
        return []
    dispatchers = []
    for c in range(n_chunks):
        groups = (topo.ep_group, topo.ep_inter_group, topo.ep_intra_group) if c == 0 else topo.new_ep_groups()
        dispatchers.append(build_dispatcher(mode, groups, n_experts, topo.gpus_per_node, wire))
    return dispatchers


def shard_stage_experts(modules: Sequence[DeepSeekV3], topo, mode: str = "flat", wire: Wire = FP32) -> list:
    """Expert-parallel sharding of already built (full) stage modules, one ``stage_dispatchers``
    dispatcher per chunk (call on EVERY rank, before ``init_weights`` and before building the
    optimizer). Training builds the modules sharded instead (``build_stage_modules(experts=...,
    dispatchers=...)``); this converts full modules, as tests do. Returns the dispatchers."""
    dispatchers = stage_dispatchers(topo, len(modules), modules[0].cfg.n_routed_experts if modules else 0,
                                    mode, wire)
    for m, disp in zip(modules, dispatchers):
        shard_experts(m, topo.ep_rank, topo.ep, disp.group, topo.gpus_per_node, dispatcher=disp)
    return dispatchers


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def plan_pipeline(cfg: ModelConfig, schedule_name: str, pp: int, n_microbatches: int,
                  layers_per_stage: Optional[Sequence[int]] = None, **recipe) -> tuple[Schedule, list[list[int]]]:
    """Every static pipeline check, with no process group: returns (schedule, layer split).

    Raises ``ScheduleError`` (unknown schedule, odd pp or a bad micro-batch count for DualPipe,
    ...) or ``StageError`` (fewer layers than stages, bad ``parallel.layers_per_stage``).
    ``recipe``: precision, seq_len, recompute, ep of the run (split_layers' cost model)."""
    schedule = get_schedule(schedule_name, pp, n_microbatches)
    split = split_layers(cfg, schedule, layers_per_stage, **recipe)
    return schedule, split
