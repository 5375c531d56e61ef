"""Planned = measured for activations: launch.plan's per-rank ``saved_activation_bytes`` (the held
peak from parallel/activations.py's list of what the modules save, replayed over the rank's
schedule) against the trainer's saved-tensor meter (trainer/precision.LiveSavedActivations) in a
real multi-rank run (tiny model, one step), rank 0, within 5% — for fp32 and fp8 (and bf16 where
the CPU trainer runs it), recompute none and norm_and_up_proj, a DP×EP layout and a DualPipe one.

The plan is asked for device=cpu: there every precision computes in fp32 and the attention core
takes SDPA's math path (parallel/activations.py). The residual difference is routing: an EP rank
holds what its experts received, the plan assumes uniform routing."""
from __future__ import annotations

import pytest

from parallel import planner as P
from tests.helpers import TINY, compose, preset_model_cfg, read_metrics, run_cli

DUALPIPE = ["parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batch=1", "parallel.ep=2"]


def _bf16_on_cpu() -> bool:
    from model.config import ConfigError
    from trainer.precision import check_precision

    try:
        check_precision("bf16", "cpu")
    except ConfigError:
        return False
    return True


BF16 = pytest.mark.skipif(not _bf16_on_cpu(), reason="the CPU trainer refuses precision=bf16 in this branch")
RUNS = [
    pytest.param(2, ["parallel.ep=2", "precision=fp32", "train.recompute=none"], id="dp2_ep2_fp32_none"),
    pytest.param(2, ["parallel.ep=2", "precision=fp8", "train.recompute=norm_and_up_proj"], id="dp2_ep2_fp8_up_proj"),
    pytest.param(2, ["parallel.ep=2", "precision=bf16", "train.recompute=none"], id="dp2_ep2_bf16_none", marks=BF16),
    pytest.param(4, DUALPIPE + ["precision=fp32", "train.recompute=norm_and_up_proj"], id="pp2_dp2_ep2_dualpipe_fp32_up_proj"),
    pytest.param(4, DUALPIPE + ["precision=fp8", "train.recompute=none"], id="pp2_dp2_ep2_dualpipe_fp8_none"),
    pytest.param(4, DUALPIPE + ["precision=bf16", "train.recompute=norm_and_up_proj"],
                 id="pp2_dp2_ep2_dualpipe_bf16_up_proj", marks=BF16),
]


def planned_saved_bytes(overrides: list[str], world: int) -> int:
    """launch.plan's saved_activation_bytes of global rank 0 (pipeline rank 0) for the run `overrides` on CPU."""
    cfg = compose(TINY + overrides)
    p, t = cfg.parallel, cfg.train
    layout = P.PlanLayout(pp=p.pp, dp=world // p.pp, ep=p.ep, world_size=world, schedule=p.schedule)
    recipe = P.Recipe(precision=cfg.precision, recompute=t.recompute, seq_len=t.seq_len, micro_batch=t.micro_batch,
                      global_batch=t.global_batch, device="cpu")
    out = P.plan(preset_model_cfg("tiny"), layout, recipe, sensitivity=())
    return out["per_rank"][0]["saved_activation_bytes"]


@pytest.mark.parametrize("nproc,overrides", RUNS)
def test_saved_activation_bytes_equal_plan(tmp_path, nproc, overrides):
    out = run_cli(overrides + ["train.steps=1", f"run.dir={tmp_path}"], nproc=nproc, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    measured = read_metrics(str(tmp_path))[0]["saved_activation_bytes"]
    planned = planned_saved_bytes(overrides, nproc)
    assert measured > 0 and planned > 0
    print(f"{' '.join(overrides)}: measured {measured} planned {planned} ratio {measured / planned:.4f}")
    assert abs(measured / planned - 1) <= 0.05, (measured, planned)


def test_plan_tracks_precision_and_recompute():
    """Controls: the plan is not flat — fp8 keeps fewer bytes than fp32 (FP8 GEMM inputs), and
    norm_and_up_proj fewer than none (the q/kv norms' tensors)."""
    b = {(pr, r): planned_saved_bytes(["parallel.ep=2", f"precision={pr}", f"train.recompute={r}"], 2)
         for pr in ("fp32", "fp8") for r in ("none", "norm_and_up_proj")}
    assert b["fp8", "none"] < b["fp32", "none"] and b["fp8", "norm_and_up_proj"] < b["fp32", "norm_and_up_proj"]
    assert b["fp32", "norm_and_up_proj"] < b["fp32", "none"] and b["fp8", "norm_and_up_proj"] < b["fp8", "none"]
