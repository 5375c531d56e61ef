"""Layout invariance (docs/architecture.md invariant 1): the same seed, data and global batch give the same
per-step losses for every layout, to fp32 round-off (rel. 1e-5 over 10 steps).

Every run also evaluates (steps 5 and 10, one held-out global batch) with a CPU EMA of the
parameters, so the validation losses of the weights and of the EMA weights are compared too:
evaluation runs through each layout's own forward path (forward-only pipeline schedule, expert
all-to-all) and must not disturb training."""
from __future__ import annotations

import pytest

from tests.helpers import read_metrics, run_cli
from tests.shared_runs import (LAYOUT_EVAL as EVAL, LAYOUT_PIPE as PIPE, LAYOUT_STEPS as STEPS, PP2_DP2_EP2_DUALPIPE,
                               layout_job)

VAL_KEYS = ("val_loss", "val_lm_loss", "val_mtp_loss", "val_loss_ema")


def _losses(tmp_path, name, nproc, args, evaluate=True, timeout=300):
    run_dir = tmp_path / name
    res = run_cli([f"run.dir={run_dir}"] + layout_job(args, evaluate), nproc=nproc, timeout=timeout)
    return _rows(run_dir, res, evaluate)


def _shared_losses(shared_runs, nproc, args):
    """_losses of a run other tests check too (tests/shared_runs.py: test_plan_vs_run's bytes)."""
    run_dir, res = shared_runs.get(nproc, layout_job(args), timeout=300)
    return _rows(run_dir, res, True)


def _rows(run_dir, res, evaluate):
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == ([5, 10] if evaluate else [])
    return rows


def _assert_same(name, reference, rows, keys=("loss", "lm_loss", "mtp_loss", "grad_norm")):
    for ref, got in zip(reference, rows):
        for key in keys + (VAL_KEYS if "val_loss" in ref else ()):
            assert got[key] == pytest.approx(ref[key], rel=1e-5), (name, ref["step"], key, ref[key], got[key])


@pytest.fixture(scope="module")
def reference(shared_runs):
    return _shared_losses(shared_runs, 1, [])


@pytest.mark.parametrize(
    "name, nproc, args",
    [
        ("dp2", 2, []),
        ("ep2", 2, ["parallel.ep=2"]),
        ("ep4", 4, ["parallel.ep=4"]),
        # parallel.dispatch=auto → two_hop: the EP group spans several simulated nodes
        # ... and the gradients reduce-scattered (each rank its ZeRO-1 range; parallel/grads.py)
        ("dp4_ep2_nodes_reduce_scatter", 4, ["parallel.ep=2", "parallel.gpus_per_node=1",
                                             "parallel.grad_reduce=reduce_scatter"]),
        ("ep4_two_hop_2nodes", 4, ["parallel.ep=4", "parallel.gpus_per_node=2"]),
        ("ep4_two_hop_4nodes", 4, ["parallel.ep=4", "parallel.gpus_per_node=1"]),
    ],
)
def test_losses_match_single_process(reference, shared_runs, name, nproc, args):
    rows = _shared_losses(shared_runs, nproc, args)
    _assert_same(name, reference, rows)
    for ref, got in zip(reference, rows):
        assert got["expert_load_cv"] == pytest.approx(ref["expert_load_cv"], rel=1e-4, abs=1e-6)


def test_node_limited_routing_is_layout_invariant(tmp_path):
    """With max_nodes_per_token=1 and experts over 2 nodes, one process told the same node count
    (parallel.expert_nodes=2) routes exactly like EP=2 over two 1-GPU nodes."""
    limit = ["model.max_nodes_per_token=1", "model.n_expert_groups=2", "model.n_limited_groups=2"]
    ref = _losses(tmp_path, "single_nodes2", 1, limit + ["parallel.expert_nodes=2"])
    ep = _losses(tmp_path, "ep2_nodes2", 2, limit + ["parallel.ep=2", "parallel.gpus_per_node=1"])
    free = _losses(tmp_path, "single_nodes1", 1, limit)
    for a, b in zip(ref, ep):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    assert any(abs(a["loss"] - c["loss"]) > 1e-6 for a, c in zip(ref, free)), "the node limit changed nothing"


# ---- pipeline layouts (issues: DualPipe/1F1B pipeline; composed PP x EP x DP trainer) ----
# DualPipe needs >= 2*pp micro-batches per rank (even), so these use global batch 16 and
# micro-batch 1 (PIPE) and compare against their own single-process reference.


@pytest.fixture(scope="module")
def pipe_reference(tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("pipe_ref"), "single", 1, PIPE)


@pytest.mark.parametrize(
    "name, nproc, args",
    [
        ("pp2_1f1b", 2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
        ("pp2_dualpipe", 2, ["parallel.pp=2", "parallel.schedule=dualpipe"]),
        ("pp4_dualpipe", 4, ["parallel.pp=4", "parallel.schedule=dualpipe"]),
        ("pp2_dp2_ep2_dualpipe", 4, PP2_DP2_EP2_DUALPIPE),
        ("pp2_dp2_ep2_1f1b", 4, ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=1f1b"]),
        ("pp2_dp2_dualpipev", 4, ["parallel.pp=2", "parallel.schedule=dualpipev"]),
        # reduce-scatter over DP (experts: expert-DP of 1, nothing to reduce); stage-pair norm
        ("pp2_dp4_ep4_dualpipe_two_hop_reduce_scatter", 8, [
            "parallel.pp=2", "parallel.ep=4", "parallel.schedule=dualpipe", "parallel.gpus_per_node=2",
            "parallel.grad_reduce=reduce_scatter"]),
    ],
)
def test_pipeline_losses_match_single_process(pipe_reference, shared_runs, name, nproc, args):
    rows = _shared_losses(shared_runs, nproc, PIPE + args)
    _assert_same(name, pipe_reference, rows)


def test_pipeline_checkpoint_reshards_to_expert_parallel(pipe_reference, tmp_path):
    """Save under (pp2, dp2, ep2) DualPipe, resume under (pp1, dp4, ep4): steps 6-10 equal the
    uninterrupted single-process run."""
    run_dir = tmp_path / "reshard"
    first = run_cli([f"run.dir={run_dir}", f"train.steps={STEPS}", "train.exit_after_steps=5", "parallel.pp=2",
                     "parallel.ep=2", "parallel.schedule=dualpipe"] + EVAL + PIPE, nproc=4, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _losses(tmp_path, "reshard", 4, PIPE + ["parallel.ep=4"])
    # the EMA too is resharded: step 10's EMA validation loss matches the uninterrupted run
    _assert_same("reshard", pipe_reference[5:], rows[5:], keys=("loss",))


def _worst(rows, ref, key):
    return max(abs(r[key] - q[key]) / abs(q[key]) for r, q in zip(rows, ref))


@pytest.mark.timeout(600)
def test_fp8_dispatch_two_hop_matches_single_process_to_round_off(tmp_path):
    """FP8 dispatch, BF16 combine and BF16 backward exchanges (parallel.a2a_dtype=fp8) with fp32
    compute: ep4 over two 2-GPU nodes (two_hop) against one process that rounds like that layout
    (parallel.expert_nodes=2, parallel.gpus_per_node=2: LocalDispatcher rounds the dispatch rows,
    the expert outputs, the node partials and the gradient rows where two_hop's exchanges do).
    Step 1 (same weights) agrees to fp32 round-off in loss AND gradient norm (measured 7e-13 and
    3e-10; 4 one-GPU nodes: 0 and 5e-10), so every rounding is emulated exactly; steps 2-3 stay
    within rel 1e-5 (measured ≤ 1e-7; 4 nodes: ≤ 2e-6). After that, fp32 summation-order
    differences (DP all-reduce vs micro-batch accumulation) flipped across FP8/BF16 rounding
    boundaries grow as they do between one process and itself under another micro-batching, the
    measured floor the run must stay within (here EP 1.6e-6 loss / 4.7e-5 grad norm over 10 steps,
    floor 6.6e-6 / 4.4e-4). The floor is one sample of a chaotic process: on 4 one-GPU nodes
    (not run here) EP stays ≤ 1e-7 for 6 steps, then one token's routing flips at step 7
    (expert_load_cv 1.0120 vs 1.0109) and the loss differs by 1.2e-4 at step 10, while that
    layout's micro-batching control flipped at step 6 and stayed within 4.9e-6."""
    wire = ["parallel.a2a_dtype=fp8", "parallel.expert_nodes=2", "parallel.gpus_per_node=2"]
    ref = _losses(tmp_path, "single_fp8_wire", 1, wire, evaluate=False)
    ep = _losses(tmp_path, "ep4_fp8_wire", 4, wire + ["parallel.ep=4"], evaluate=False)
    other_mb = _losses(tmp_path, "single_fp8_wire_mb1", 1, wire + ["train.micro_batch=1"], evaluate=False)
    for key in ("loss", "grad_norm"):
        assert ep[0][key] == pytest.approx(ref[0][key], rel=1e-6), key
        floor = _worst(other_mb, ref, key)
        assert _worst(ep, ref, key) <= floor, (key, _worst(ep, ref, key), floor)
    _assert_same("ep4_fp8_wire", ref[:3], ep[:3])


FP8_FLOOR_FACTOR = 3  # see the docstring below: FP8 weight-gradient tiles group other tokens on EP ranks


@pytest.mark.timeout(1200)  # three FP8-simulated runs (one with twice the micro-batches)
def test_fp8_two_hop_matches_single_process_to_the_fp8_floor(tmp_path):
    """precision=fp8 with the paper's payloads (parallel.a2a_dtype=auto: FP8 dispatch, BF16
    combine and backward), ep4 over two 2-GPU nodes (two_hop) against one process that rounds
    like that layout (parallel.expert_nodes=2, parallel.gpus_per_node=2).

    Step 1's loss is a forward of the same weights: it agrees to fp32 round-off (measured
    4.5e-13). Step 1's gradient does not, and cannot: an EP rank's expert GEMM holds the tokens
    of all 4 DP ranks' micro-batches, one process's only those of its micro-batch, so the FP8
    Wgrad tiles (128 tokens × 1 channel, amax-scaled) hold other tokens (measured 7.1e-6 in grad
    norm; the controls: the same wire at fp32 compute agrees to 3e-10 — the test above — and dp4
    without EP at fp8 to 4.9e-10). Training then amplifies these differences across FP8 rounding
    boundaries. The floor is MEASURED: one process against one process with another
    micro-batching (micro_batch=1: other Wgrad tiles, other summation order). Both the EP run's
    distance and the floor are single samples of the same tile effect amplified by training, so
    neither bounds the other run by run: with fp32 weights, worst over the 10 steps (loss / grad
    norm), seed 0 gave EP 9.1e-5 / 2.0e-2 vs floor 1.4e-4 / 3.2e-2 and seed 1 EP 2.0e-4 / 2.3e-2
    vs 3.3e-4 / 5.5e-2; with the recipe's BF16 weights and moments (precision=fp8 today) seed 0
    gave EP 2.0e-4 vs floor 1.3e-4 in loss (1.5x). The test asserts EP within FP8_FLOOR_FACTOR
    times the floor — the factor tests/test_mixed_precision.py uses for the same effect on the
    memory-recipe layouts (measured there: at most 2.2x)."""
    fp8 = ["precision=fp8", "parallel.expert_nodes=2", "parallel.gpus_per_node=2"]
    ref = _losses(tmp_path, "single_fp8", 1, fp8, evaluate=False, timeout=600)  # FP8 simulation: slower
    other_mb = _losses(tmp_path, "single_fp8_mb1", 1, fp8 + ["train.micro_batch=1"], evaluate=False, timeout=600)
    ep = _losses(tmp_path, "ep4_fp8_two_hop", 4, fp8 + ["parallel.ep=4"], evaluate=False, timeout=600)
    assert ep[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    for key in ("loss", "grad_norm"):
        floor = _worst(other_mb, ref, key)
        print(f"fp8 two_hop {key}: EP {_worst(ep, ref, key):.2e}, floor {floor:.2e}")
        assert 0 < _worst(ep, ref, key) <= FP8_FLOOR_FACTOR * floor, (key, _worst(ep, ref, key), floor)
