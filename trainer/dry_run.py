"""debug.dry_run: build, in one CPU process, what ranks of a (possibly 2048-GPU) job build — and stop.

For each visited rank the real build path runs against torch's fake process-group backend (as
torchtitan's fake-backend mode and Megatron's fake process group do: every collective returns at
once, nothing is sent): the same validation as a real run (so a layout or config error is the
same named error line), the Topology and every process group, the rank's stage modules on the
meta device (shapes and dtypes, no storage: a 671B model costs no memory), its expert shards, the
ZeRO-1 optimizer partition (states materialised on the meta device) and the pipeline schedule of
every micro-batch count the run uses, replay-checked for deadlock. It then prints the rank's
weight, gradient, optimizer-state and activation bytes, counted from the built objects.

Visited: one rank per distinct pipeline position (dp index 0 of each pp index) plus
``debug.dry_run_ranks``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
# registers torch's "fake" backend (dist.Backend.FAKE): torch 2.13 has the backend name but no public
# registration; the store is the public HashStore (the fake group never reads it)
import torch.testing._internal.distributed.fake_pg  # noqa: F401

from model import ConfigError, ModelConfig
from parallel.grads import count_bytes, grad_nbytes
from parallel.pipeline import get_schedule, validate as validate_schedule
from parallel.pipeline.stages import engine_named_parameters
from parallel.planner import rank_activation_bytes
from parallel.topology import Topology
from parallel.zero import build_optimizer, moment_dtype_for
from trainer.precision import numerics_for
from trainer.trainer import build_modules, expert_dispatch, expert_nodes, plan_stages, schedules, validate

WORLD_ENV = "DSV3_DRY_RUN_WORLD"


@dataclass
class RankBytes:
    """What one rank holds, counted from its built objects."""
    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    stages: list
    layers: list  # layers of each held stage
    param_count: int
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int


def ranks_to_visit(cfg, layout) -> list[int]:
    extra = [int(r) for r in (cfg.debug.dry_run_ranks or [])]
    for r in extra:
        if not 0 <= r < layout.world_size:
            raise ConfigError(f"debug.dry_run_ranks: rank {r} outside the world of {layout.world_size} ranks")
    return sorted(set(layout.rank_of(p, 0) for p in range(layout.pp)) | set(extra))


def world_size(cfg) -> int:
    """The job's world: parallel.pp × parallel.dp (the dry run has no torchrun to say it)."""
    p = cfg.parallel
    if not p.dp:
        raise ConfigError("parallel.dp: a dry run needs the data-parallel size (it has no WORLD_SIZE)")
    return int(p.pp) * int(p.dp)


def build_rank(cfg, model_cfg: ModelConfig, layout, schedule, split, rank: int):
    """(modules, named parameters, optimizer) of global `rank`, built as the trainer builds them,
    on the meta device, under a fake process group of the job's world size."""
    p = cfg.parallel
    dist.init_process_group(dist.Backend.FAKE, store=dist.HashStore(), rank=rank, world_size=layout.world_size)
    try:
        topo = Topology(layout.world_size, rank, p.pp, layout.dp, p.ep, p.gpus_per_node, backend="fake")
        modules = build_modules(model_cfg, topo, schedule, split, expert_nodes(cfg, model_cfg, layout),
                                *expert_dispatch(cfg, model_cfg, layout), device=torch.device("meta"),
                                numerics=numerics_for(cfg.precision), recompute=cfg.train.recompute, gpus_per_node=p.gpus_per_node)
        named = engine_named_parameters(modules, pipelined=schedule is not None)
        # this rank's ZeRO-1 states, allocated on the meta device with the parameters (no memory)
        optimizer = build_optimizer(named, cfg.train, topo, zero=p.zero,
                                    moment_dtype=moment_dtype_for(cfg.optim.moment_dtype, cfg.precision))
        return topo, modules, named, optimizer
    finally:
        dist.destroy_process_group()


def rank_bytes(cfg, model_cfg: ModelConfig, layout, schedule, split, rank: int) -> RankBytes:
    topo, modules, named, optimizer = build_rank(cfg, model_cfg, layout, schedule, split, rank)
    params = [p for _, p in named]
    stages = [getattr(m, "pipeline_stage", 0) for m in modules]
    activations = 0
    if schedule is not None:  # the planner's per-layer activation model (tests/test_plan_vs_run.py
        # checks it against saved tensors of real runs) for this rank's layers and schedule
        t = cfg.train
        activations = int(rank_activation_bytes(model_cfg, split, schedule, topo.pp_rank, cfg.precision,
                                                t.recompute, t.micro_batch, t.seq_len, cfg.parallel.ep)[0])
    return RankBytes(
        rank=rank, pp_rank=topo.pp_rank, dp_rank=topo.dp_rank, ep_rank=topo.ep_rank, stages=stages,
        layers=[len(m.layers) for m in modules],
        param_count=sum(p.numel() for p in params),
        param_bytes=count_bytes(params),
        grad_bytes=grad_nbytes(params),  # fp32 under every precision (BF16 weights: main_grad)
        optimizer_state_bytes=optimizer.state_bytes(),
        activation_bytes=activations,
    )


def dry_run(cfg) -> list[RankBytes]:
    """Validate as a real run, build every visited rank, print a table (or JSON lines), return it."""
    t0 = time.perf_counter()
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    layout, n_micro = validate(cfg, model_cfg, world_size(cfg))
    schedule, split = plan_stages(cfg, model_cfg, layout, n_micro)
    sched, steps = schedules(cfg, layout, model_cfg)
    visit = ranks_to_visit(cfg, layout)
    sizes = sched.batch.sizes()
    if schedule is not None:  # every micro-batch count of the run, replayed for deadlock
        for b in sizes:
            validate_schedule(get_schedule(cfg.parallel.schedule, layout.pp, b // (layout.dp * cfg.train.micro_batch)),
                              check_deadlock=True)
    print(f"dry run: world {layout.world_size} = pp {layout.pp} × dp {layout.dp} (ep {layout.ep}, expert-DP "
          f"{layout.edp}), schedule {cfg.parallel.schedule if schedule is not None else 'none'}, "
          f"{len(sizes)} global batch size(s) {sizes[0]}..{sizes[-1]} → {sizes[0] // (layout.dp * cfg.train.micro_batch)}.."
          f"{n_micro} micro-batches per rank, all replay-checked; {steps} steps; layers per stage "
          f"{[len(s) for s in split] if split else [model_cfg.n_layers]}", flush=True)
    out = []
    for rank in visit:
        rb = rank_bytes(cfg, model_cfg, layout, schedule, split, rank)
        out.append(rb)
        print("dry run rank " + json.dumps(asdict(rb)), flush=True)
    print(f"dry run: {len(out)} rank(s) built in {time.perf_counter() - t0:.1f} s", flush=True)
    return out
