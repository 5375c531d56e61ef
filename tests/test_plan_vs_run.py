"""The planner against real runs: parallel/planner.predict_rank_bytes on the tiny config predicts,
to the byte, the parameter and optimizer-state bytes that rank 0 of a real (tiny, 1-step) run
reports in metrics.jsonl — ZeRO-1 included, where torch's ZeroRedundancyOptimizer owns whole
parameters (the planner replays its partitioning: parallel/planner.zero_owners)."""
from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf

from model.config import ModelConfig
from parallel import planner as P

from tests.helpers import compose, read_metrics, run_cli


def _tiny_cfg() -> ModelConfig:
    return ModelConfig.from_dict(OmegaConf.to_container(compose(["model=tiny"]).model, resolve=True))


# ----------------------------------------------------------------------------- the partition rule
def _torch_partition(groups: list[list[torch.Tensor]], world: int) -> list[list[int]]:
    """Owner ranks from torch's own ZeroRedundancyOptimizer._partition_parameters, run on an
    instance without a process group (only the attributes that method reads)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    z = ZeroRedundancyOptimizer.__new__(ZeroRedundancyOptimizer)
    z.world_size, z._partition_parameters_cache = world, []
    z.param_groups = [{"params": g} for g in groups]
    per_rank = z._partition_parameters()
    owner = {id(p): r for r in range(world) for g in per_rank[r] for p in g["params"]}
    return [[owner[id(p)] for p in g] for g in groups]


@pytest.mark.parametrize("layout", [dict(pp=1, dp=4, ep=2), dict(pp=1, dp=3, ep=1),
                                    dict(pp=2, dp=8, ep=2, schedule="dualpipe"),
                                    dict(pp=2, dp=4, ep=1, schedule="1f1b")])
def test_zero_owners_equal_torch_partition(layout):
    cfg = _tiny_cfg()
    lay = P._as_layout(layout)
    for rank in (0, lay.dp * (lay.pp - 1)):
        tensors = P.rank_tensors(cfg, lay, rank)
        for is_expert, groups in P.optimizer_param_groups([(t.name, t) for t in tensors], 0.1):
            world = lay.edp if is_expert else lay.dp
            specs = [g["params"] for g in groups]
            metas = [[torch.empty(t.shape, device="meta") for t in g] for g in specs]
            assert P.zero_owners(specs, world) == _torch_partition(metas, world)


def test_rank_tensors_equal_engine_order():
    """pp = 1: the model's named_parameters order after expert sharding; pp > 1: sorted names of
    the stage modules (PipelineEngine.named_parameters)."""
    from model.transformer import DeepSeekV3
    from parallel.dispatch import shard_experts
    from parallel.pipeline import get_schedule
    from parallel.pipeline.stages import build_stage_modules

    cfg = _tiny_cfg()
    with torch.device("meta"):
        m = DeepSeekV3(cfg)
    shard_experts(m, 0, 2, None, dispatcher=types.SimpleNamespace(ep=2))
    real = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
    assert [(t.name, t.shape) for t in P.rank_tensors(cfg, dict(pp=1, dp=2, ep=2), 0)] == real
    for schedule in ("dualpipe", "1f1b"):
        sched = get_schedule(schedule, 2, 4)
        for pp_rank in range(2):
            with torch.device("meta"):
                mods = build_stage_modules(cfg, sched, pp_rank)
            params = {}
            for mod in mods:
                shard_experts(mod, 0, 2, None, dispatcher=types.SimpleNamespace(ep=2))
                params.update({n: tuple(p.shape) for n, p in mod.named_parameters()})
            pred = P.rank_tensors(cfg, dict(pp=2, dp=2, ep=2, schedule=schedule), pp_rank * 2)
            assert [(t.name, t.shape) for t in pred] == sorted(params.items())


# ----------------------------------------------------------------------------- real runs
RUNS = [  # (id, nproc, overrides, layout)
    ("single", 1, [], dict(pp=1, dp=1, ep=1)),
    ("dp2_ep2", 2, ["parallel.ep=2"], dict(pp=1, dp=2, ep=2)),
    ("dp2_ep2_nozero", 2, ["parallel.ep=2", "parallel.zero=false"], dict(pp=1, dp=2, ep=2)),
    ("dp4_ep2", 4, ["parallel.ep=2"], dict(pp=1, dp=4, ep=2)),
    ("pp2_dualpipe", 2, ["parallel.pp=2", "parallel.schedule=dualpipe"], dict(pp=2, dp=1, ep=1, schedule="dualpipe")),
    # DualPipe needs >= 2·pp micro-batches per rank: global 8 / (dp 2 · micro 1) = 4
    ("pp2_dp2_ep2_dualpipe", 4, ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe", "train.micro_batch=1"],
     dict(pp=2, dp=2, ep=2, schedule="dualpipe")),
]


@pytest.mark.parametrize("nproc,overrides,layout", [r[1:] for r in RUNS], ids=[r[0] for r in RUNS])
def test_predicted_rank0_bytes_equal_run(tmp_path, nproc, overrides, layout):
    zero = "parallel.zero=false" not in overrides
    out = run_cli(overrides + ["train.steps=1", f"run.dir={tmp_path}"], nproc=nproc, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    row = read_metrics(str(tmp_path))[0]
    assert row["step"] == 1
    pred = P.predict_rank_bytes(_tiny_cfg(), layout, rank=0, precision="fp32", zero=zero)
    assert row["optimizer_state_bytes"] == pred["optimizer_state_bytes"], (row, pred)
    if "param_bytes" in row:
        assert row["param_bytes"] == pred["param_bytes"], (row, pred)
    if zero and layout["dp"] > 1:  # the state really is sharded
        full = P.predict_rank_bytes(_tiny_cfg(), layout, rank=0, precision="fp32", zero=False)
        assert pred["optimizer_state_bytes"] < full["optimizer_state_bytes"]
