"""Gradient reduce-scatter (parallel.grad_reduce=reduce_scatter; auto on NCCL with ZeRO-1): each
rank receives exactly the range of the reduced gradient its ZeRO-1 optimizer updates, and a run
that reduce-scatters equals one that all-reduces. Layout invariance against one process with
reduce-scatter is in tests/test_layouts.py (dp4×ep2 over nodes; pp2×dp4×ep4 DualPipe)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.testing import run_distributed
from tests.helpers import read_metrics, run_cli
from tests.shared_runs import LOW_STEPS, low_job

# (shapes of one part's gradients, buckets in elements): an empty tensor, ranges that start and
# end inside tensors, fewer elements than ranks, buckets of 1 element, a few, and all at once
SHAPES = [[(7,), (3, 5), (0,), (1,), (11, 2)], [(2,)]]
BUCKETS = [1, 4, 7, 1000]


def _reduce_scatter_against_all_reduce(rank: int, world: int) -> int:
    from parallel.grads import _reduce_scatter_flat
    from parallel.partition import zero_partition

    checked = 0
    for shapes in SHAPES:
        gen = torch.Generator().manual_seed(rank)
        local = [torch.randn(s, generator=gen) for s in shapes]
        summed = [t.clone() for t in local]
        for t in summed:
            dist.all_reduce(t)
        mine = {i: (a, b) for i, a, b in zero_partition([t.numel() for t in local], world)[rank]}
        for bucket in BUCKETS:
            got = [t.clone() for t in local]
            _reduce_scatter_flat(got, dist.group.WORLD, bucket)
            for i, (g, want) in enumerate(zip(got, summed)):
                a, b = mine.get(i, (0, 0))
                g, want = g.view(-1), want.view(-1)
                torch.testing.assert_close(g[a:b], want[a:b], rtol=1e-6, atol=1e-6)
                outside = torch.cat([g[:a], g[b:]])
                assert torch.equal(outside, torch.zeros_like(outside)), (rank, bucket, i)  # zeroed, not stale
                checked += b - a
    return checked


def test_reduce_scatter_gives_each_rank_its_zero1_range():
    """Against a plain all-reduce on 3 ranks: this rank's zero_partition range holds the sum, the
    rest is zero; over the ranks every element is received exactly once per bucket size."""
    checked = run_distributed(_reduce_scatter_against_all_reduce, 3, timeout=60)
    total = sum(torch.Size(s).numel() for shapes in SHAPES for s in shapes)
    assert sum(checked) == total * len(BUCKETS)


def test_resolved_mode_and_bad_combination():
    from parallel.grads import resolve_grad_reduce

    assert resolve_grad_reduce("auto", "nccl", True) == "reduce_scatter"
    assert resolve_grad_reduce("auto", "gloo", True) == "all_reduce"
    assert resolve_grad_reduce("auto", "nccl", False) == "all_reduce"
    res = run_cli(["parallel.grad_reduce=reduce_scatter", "parallel.zero=false", "train.steps=1"], nproc=1)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and errors == [
        "error: parallel.grad_reduce: reduce_scatter needs ZeRO-1 (parallel.zero=true): without it every rank "
        "updates whole parameters and needs whole gradients (use all_reduce)"], res.stderr[-2000:]


@pytest.mark.timeout(900)
def test_reduce_scatter_run_equals_all_reduce_bf16_then_skips_a_nan_step(shared_runs, tmp_path):
    """dp4×ep2 under bf16 (FP32 masters and BF16 moments in the ZeRO-1 range), the low-precision
    job tests/test_mixed_precision.py and test_plan_vs_run.py check (its all-reduce run is shared
    with them): the reduce-scatter run equals it to fp32 round-off (the sums group differently over
    4 ranks), so the norm after a reduce-scatter counts each element once (a double count, or a
    stale unreduced range, would be far off); a NaN put into rank 1's gradient at the last step
    reaches the norm and, under on_nonfinite=skip, is skipped."""
    args = ["parallel.ep=2"]
    ref_dir, ref_res = shared_runs.get(4, low_job("bf16", args))
    assert ref_res.returncode == 0, ref_res.stderr[-3000:]
    assert "gradients all_reduce" in ref_res.stdout, ref_res.stdout[-2000:]  # auto on gloo
    res = run_cli(low_job("bf16", args) + [
        "parallel.grad_reduce=reduce_scatter", f"run.dir={tmp_path}", "train.on_nonfinite=skip",
        f"debug.inject_nonfinite_at_step={LOW_STEPS}", "debug.inject_nonfinite_rank=1"], nproc=4, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gradients reduce_scatter" in res.stdout, res.stdout[-2000:]  # the mode the trainer ran
    ref, rows = read_metrics(str(ref_dir)), read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, LOW_STEPS + 1))
    for a, b in zip(ref, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
        if a["step"] < LOW_STEPS:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), a["step"]
            assert b["skipped_steps"] == 0
        else:
            assert b["grad_norm"] != b["grad_norm"] and b["skipped_steps"] == 1  # NaN seen, step skipped
        print(f"step {a['step']}: loss rel. diff {abs(b['loss'] - a['loss']) / a['loss']:.1e}, grad norm "
              f"{abs(b['grad_norm'] - a['grad_norm']) / a['grad_norm']:.1e}")
