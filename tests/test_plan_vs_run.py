"""The planner against real runs: parallel/planner.predict_rank_bytes on the tiny config predicts,
to the byte, the parameter, gradient and optimizer-state bytes of rank 0 of a real (tiny, 1-step)
run and their max and min over all ranks, as metrics.jsonl reports them — ZeRO-1 included: the
planner and the optimizer share one partition (parallel/partition.zero_partition)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from model.config import ModelConfig
from parallel import planner as P

from tests.helpers import compose, read_metrics, run_cli


def _tiny_cfg() -> ModelConfig:
    return ModelConfig.from_dict(OmegaConf.to_container(compose(["model=tiny"]).model, resolve=True))


# ----------------------------------------------------------------------------- the partition rule
@pytest.mark.parametrize("numels,group", [([7, 1, 30, 5], 4), ([3], 8), ([100, 1, 1, 64], 3), ([5, 5], 1)])
def test_zero_partition_is_balanced_and_covers_every_element(numels, group):
    from parallel.partition import rank_elements, zero_partition

    parts = zero_partition(numels, group)
    seen = [[0] * n for n in numels]
    for r, pieces in enumerate(parts):
        assert sum(b - a for _, a, b in pieces) == rank_elements(numels, group, r)
        for i, a, b in pieces:
            for k in range(a, b):
                seen[i][k] += 1
    assert all(c == 1 for row in seen for c in row)  # every element on exactly one rank
    sizes = [rank_elements(numels, group, r) for r in range(group)]
    assert max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------- real runs
# (id, nproc, overrides, layout); DualPipe needs >= 2·pp micro-batches per rank
DUALPIPE = ["parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batch=1"]
RUNS = [
    ("single", 1, [], dict(pp=1, dp=1, ep=1)),
    ("dp2_ep2_nozero", 2, ["parallel.ep=2", "parallel.zero=false"], dict(pp=1, dp=2, ep=2)),
    ("dp4_ep2", 4, ["parallel.ep=2"], dict(pp=1, dp=4, ep=2)),
    ("dp4_ep2_fp8", 4, ["parallel.ep=2", "precision=fp8"], dict(pp=1, dp=4, ep=2)),
    ("pp2_dp2_ep2_dualpipe", 4, DUALPIPE + ["parallel.ep=2"], dict(pp=2, dp=2, ep=2, schedule="dualpipe")),
    ("pp2_dp2_ep2_dualpipe_fp8", 4, DUALPIPE + ["parallel.ep=2", "precision=fp8", "optim.moment_dtype=fp32"],
     dict(pp=2, dp=2, ep=2, schedule="dualpipe")),
    ("pp2_dp4_ep4_dualpipe_fp8", 8, DUALPIPE + ["parallel.ep=4", "precision=fp8", "train.global_batch=16"],
     dict(pp=2, dp=4, ep=4, schedule="dualpipe")),
    ("dp4_ep2_bf16", 4, ["parallel.ep=2", "precision=bf16"], dict(pp=1, dp=4, ep=2)),
    ("pp2_dp2_ep2_dualpipe_bf16", 4, DUALPIPE + ["parallel.ep=2", "precision=bf16"],
     dict(pp=2, dp=2, ep=2, schedule="dualpipe")),
]


@pytest.mark.parametrize("nproc,overrides,layout", [r[1:] for r in RUNS], ids=[r[0] for r in RUNS])
def test_planned_bytes_equal_run(tmp_path, nproc, overrides, layout):
    """Rank 0's param/grad/optimizer bytes and their max and min over all ranks equal the plan of
    the run's precision: fp32 = FP32 weights, grads and moments; bf16/fp8 = BF16 weights, FP32
    grads, FP32 master + moments (auto: BF16) in the ZeRO-1 range (the runtime holds exactly that
    on CPU too: BF16 storage, fp32 compute)."""
    zero = "parallel.zero=false" not in overrides
    precision = next((o.split("=")[1] for o in overrides if o.startswith("precision=")), "fp32")
    moments = next((o.split("=")[1] for o in overrides if o.startswith("optim.moment_dtype=")),
                   "fp32" if precision == "fp32" else "bf16")
    out = run_cli(overrides + ["train.steps=1", f"run.dir={tmp_path}"], nproc=nproc, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    row = read_metrics(str(tmp_path))[0]
    assert row["step"] == 1
    preds = [P.predict_rank_bytes(_tiny_cfg(), layout, rank=r, precision=precision, zero=zero, moment_dtype=moments)
             for r in range(nproc)]
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
        want = [p[key] for p in preds]
        assert (row[key], row[f"{key}_max"], row[f"{key}_min"]) == (want[0], max(want), min(want)), key
    if zero and layout["dp"] > 1:  # the state really is sharded, and evenly over a DP group
        full = P.predict_rank_bytes(_tiny_cfg(), layout, rank=0, precision=precision, zero=False, moment_dtype=moments)
        assert preds[0]["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    if layout == dict(pp=1, dp=4, ep=2):  # one DP group: max / min of the state over its ranks
        assert row["optimizer_state_bytes_max"] / row["optimizer_state_bytes_min"] <= 1.01
