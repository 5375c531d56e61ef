"""The activation plan's controls. Planned = measured for activations (launch.plan's per-rank
``saved_activation_bytes`` against every rank's saved-tensor meter in real runs, every precision,
three layouts) is tests/test_plan_vs_run.py, together with the other bytes.

The plan is asked for device=cpu: there every precision computes in fp32 and the attention core
takes SDPA's math path (parallel/activations.py). The residual difference is routing: an EP rank
holds what its experts received, the plan assumes uniform routing."""
from __future__ import annotations

from parallel import planner as P
from tests.helpers import TINY, compose, preset_model_cfg


def planned_saved_bytes(overrides: list[str], world: int) -> int:
    """launch.plan's saved_activation_bytes of global rank 0 (pipeline rank 0) for the run `overrides` on CPU."""
    cfg = compose(TINY + overrides)
    p, t = cfg.parallel, cfg.train
    layout = P.PlanLayout(pp=p.pp, dp=world // p.pp, ep=p.ep, world_size=world, schedule=p.schedule)
    recipe = P.Recipe(precision=cfg.precision, recompute=t.recompute, seq_len=t.seq_len, micro_batch=t.micro_batch,
                      global_batch=t.global_batch, device="cpu")
    out = P.plan(preset_model_cfg("tiny"), layout, recipe, sensitivity=())
    return out["per_rank"][0]["saved_activation_bytes"]


def test_plan_tracks_precision_and_recompute():
    """Controls: the plan is not flat — fp8 keeps fewer bytes than fp32 (FP8 GEMM inputs), and
    norm_and_up_proj fewer than none (the q/kv norms' tensors)."""
    b = {(pr, r): planned_saved_bytes(["parallel.ep=2", f"precision={pr}", f"train.recompute={r}"], 2)
         for pr in ("fp32", "fp8") for r in ("none", "norm_and_up_proj")}
    assert b["fp8", "none"] < b["fp32", "none"] and b["fp8", "norm_and_up_proj"] < b["fp32", "norm_and_up_proj"]
    assert b["fp32", "norm_and_up_proj"] < b["fp32", "none"] and b["fp8", "norm_and_up_proj"] < b["fp8", "none"]
