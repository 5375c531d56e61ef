"""Pipeline runtime on gloo: 1F1B and DualPipe reproduce the single-process model.

Each case spawns its processes once (spawning dominates on small machines) and, inside, runs:
one step whose losses and EVERY parameter gradient must equal the single-process model on the
same global batch split into the same micro-batches (rel. 1e-5, per-parameter norm-wise), then a
short training loop (grad norm, clipping, AdamW, router-bias update from the expert loads) whose
losses and final parameters must match. The DualPipe case also records a timeline and checks that
one micro-batch's communication overlaps another micro-batch's compute, and writes the Chrome
trace + PNG. Bad schedules fail with ScheduleError before any collective.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from model import DeepSeekV3, ModelConfig
from parallel.grads import clip_grads_, global_grad_norm
from parallel.pipeline import ScheduleError, get_schedule
from parallel.pipeline.stages import StageError, build_stage_modules, plan_pipeline, split_layers
from parallel.testing import run_distributed
from trainer.local_engine import LocalEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 7
MB, SEQ = 2, 16
LR, CLIP = 3e-3, 0.05  # a small clip so clipping is active and the grad norm matters
RTOL = 1e-5


def tiny_cfg(n_layers: int = 3) -> ModelConfig:
    with open(os.path.join(REPO, "configs/model/tiny.yaml")) as f:
        d = yaml.safe_load(f)
    d["n_layers"] = n_layers
    return ModelConfig.from_dict(d)


def batch(step: int, n_micro: int, vocab: int, mb: int = MB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return list(torch.randint(0, vocab, (n_micro, mb, SEQ + 1), generator=g).unbind(0))


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def train_reference(cfg: ModelConfig, n_micro: int, steps: int, mb: int = MB) -> dict:
    model = DeepSeekV3(cfg)
    model.init_weights(SEED)
    model.train()
    engine = LocalEngine(model)
    opt = _adamw(model.parameters())
    out = {"lm": [], "mtp": [], "norm": []}
    for step in range(steps):
        losses = engine.forward_backward(batch(step, n_micro, cfg.vocab_size, mb))
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = global_grad_norm(model.named_parameters())
        clip_grads_(model.parameters(), norm, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases({n: m.tokens_per_expert.clone() for n, m in model.moe_layers().items()})
        for m in model.moe_layers().values():
            m.tokens_per_expert.zero_()
            m.aux_loss_sum.zero_()
        out["lm"].append(float(losses.lm))
        out["mtp"].append(float(losses.mtp))
        out["norm"].append(norm)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["bias"] = {n: m.gate.bias.clone() for n, m in model.moe_layers().items()}
    return out


def _train_steps(engine, opt, out: dict, steps: int, micro_batches, reduce=None) -> None:
    """The trainer's step, on an engine: forward/backward, (DP reduction), clip by the global norm,
    AdamW, router-bias update. Records losses, norms, first-step grads and the final parameters."""
    for step in range(steps):
        losses = engine.forward_backward(micro_batches(step))
        if reduce is not None:
            reduce()
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in engine.named_parameters()}
        norm = engine.grad_norm()
        clip_grads_(engine.parameters(), norm, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        engine.update_router_biases(engine.expert_loads())
        engine.reset_moe_stats()
        out["lm"].append(float(losses.lm))
        out["mtp"].append(float(losses.mtp))
        out["norm"].append(norm)
    out["params"] = {n: p.detach().clone() for n, p in engine.named_parameters()}


def _pipeline_worker(rank, world, schedule_name, pp, n_micro, n_layers, steps, timeline_dir=None,
                     ordered_sends=False):
    from parallel.pipeline.runtime import PipelineEngine
    from parallel.pipeline.timeline import Timeline
    from parallel.topology import Topology

    cfg = tiny_cfg(n_layers)
    topo = Topology(world, rank, pp)
    sched, split = plan_pipeline(cfg, schedule_name, pp, n_micro)
    modules = build_stage_modules(cfg, sched, topo.pp_rank, split=split)
    for m in modules:
        m.init_weights(SEED)
        m.train()
    tl = Timeline(rank=rank, enabled=False)
    engine = PipelineEngine(sched, modules, topo, timeline=tl)
    engine.p2p.ordered_sends = ordered_sends  # the NCCL send discipline, exercised on gloo
    opt = _adamw(engine.parameters())
    out = {"lm": [], "mtp": [], "norm": [], "stages": list(sched.placement[topo.pp_rank]),
           "shared_embed": len(modules) == 2 and modules[0].embed is not None and modules[0].embed is modules[1].embed}
    _train_steps(engine, opt, out, steps, lambda step: batch(step, n_micro, cfg.vocab_size))
    out["bias"] = {n: m.gate.bias.clone() for n, m in engine.moe_layers().items()}
    if timeline_dir is not None:
        tl.enabled = True
        engine.forward_backward(batch(steps, n_micro, cfg.vocab_size))
        out["events"] = [(e.name, e.cat, e.start, e.end, e.tid, e.args) for e in tl.events]
        engine.save_timeline(timeline_dir)
    engine.close()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_against_reference(results: list[dict], ref: dict, steps: int) -> None:
    # losses: summed over the ranks of the pipeline (only loss-computing ranks contribute)
    for key in ("lm", "mtp"):
        for s in range(steps):
            got = sum(r[key][s] for r in results)
            assert math.isclose(got, ref[key][s], rel_tol=RTOL), (key, s, got, ref[key][s])
    # every parameter's step-0 gradient, on every rank that holds a copy of it
    covered = set()
    for rank, r in enumerate(results):
        for name, g in r["grads"].items():
            assert name in ref["grads"], name
            err = _rel(g, ref["grads"][name])
            assert err < RTOL, f"rank {rank}: grad of {name} off by rel {err:.2e}"
            covered.add(name)
    assert covered == set(ref["grads"]), set(ref["grads"]) - covered
    # grad norms (identical on every rank) and the trained parameters / router biases
    for r in results:
        for s in range(steps):
            assert math.isclose(r["norm"][s], ref["norm"][s], rel_tol=RTOL), (s, r["norm"][s], ref["norm"][s])
        for name, p in r["params"].items():
            assert _rel(p, ref["params"][name]) < RTOL, name
        for name, b in r["bias"].items():
            torch.testing.assert_close(b, ref["bias"][name], rtol=0, atol=1e-7)


@pytest.mark.timeout(180)
def test_one_f_one_b_pp2_matches_single_process():
    cfg, n_micro, steps = tiny_cfg(3), 4, 3
    ref = train_reference(cfg, n_micro, steps)
    results = run_distributed(_pipeline_worker, 2, "1f1b", 2, n_micro, 3, steps, timeout=170)
    assert [r["stages"] for r in results] == [[0], [1]]
    check_against_reference(results, ref, steps)
    # the tied embedding (first stage + MTP on the last) holds the same values on both ranks
    torch.testing.assert_close(results[0]["params"]["embed.weight"], results[1]["params"]["embed.weight"],
                               rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_dualpipe_pp2_matches_single_process(tmp_path):
    cfg, n_micro, steps = tiny_cfg(3), 4, 3
    ref = train_reference(cfg, n_micro, steps)
    results = run_distributed(_pipeline_worker, 2, "dualpipe", 2, n_micro, 3, steps, str(tmp_path), timeout=170)
    assert [r["stages"] for r in results] == [[0, 1], [1, 0]]
    assert all(r["shared_embed"] for r in results)
    check_against_reference(results, ref, steps)
    # the two copies of every stage stay identical
    for name, p in results[0]["params"].items():
        torch.testing.assert_close(p, results[1]["params"][name], rtol=0, atol=0)
    _check_timeline(results, tmp_path)


@pytest.mark.timeout(180)
def test_dualpipe_pp4_matches_single_process(tmp_path):
    cfg, n_micro, steps = tiny_cfg(4), 8, 2
    ref = train_reference(cfg, n_micro, steps)
    results = run_distributed(_pipeline_worker, 4, "dualpipe", 4, n_micro, 4, steps, str(tmp_path), True,
                              timeout=175)
    assert [r["stages"] for r in results] == [[0, 3], [1, 2], [2, 1], [3, 0]]
    check_against_reference(results, ref, steps)
    _check_timeline(results, tmp_path)


@pytest.mark.timeout(180)
def test_dualpipev_pp2_matches_single_process():
    """DualPipeV: 4 half-size stages on 2 ranks, the turn of the V is an in-memory hand-over."""
    cfg, n_micro, steps = tiny_cfg(4), 4, 2
    ref = train_reference(cfg, n_micro, steps)
    results = run_distributed(_pipeline_worker, 2, "dualpipev", 2, n_micro, 4, steps, timeout=170)
    assert [r["stages"] for r in results] == [[0, 3], [1, 2]]
    assert results[0]["shared_embed"]
    check_against_reference(results, ref, steps)


def _check_timeline(results: list[dict], tmp_path) -> None:
    """On some rank, a p2p transfer of one micro-batch is open while another micro-batch computes."""
    found = []
    for rank, r in enumerate(results):
        ev = r["events"]
        compute = [e for e in ev if e[1] in ("F", "B", "Bi", "W")]
        comm = [e for e in ev if e[1] in ("p2p", "a2a") and "microbatch" in e[5]]
        assert compute and comm
        for c in comm:
            for k in compute:
                if k[5]["microbatch"] != c[5]["microbatch"]:
                    ov = min(c[3], k[3]) - max(c[2], k[2])
                    if ov > 0:
                        found.append((rank, c[0], k[0], ov))
        kinds = {e[1] for e in compute}
        assert {"F", "Bi", "W"} <= kinds, kinds  # DualPipe splits some backwards into B + W
    assert found, "no communication interval overlaps another micro-batch's compute"
    import json

    with open(tmp_path / "timeline.json") as f:
        trace = json.load(f)["traceEvents"]
    assert {e["pid"] for e in trace if e.get("ph") == "X"} == set(range(len(results)))
    assert (tmp_path / "timeline.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- no processes
def test_bad_microbatch_counts_raise_before_any_collective():
    cfg = tiny_cfg(4)
    for name, pp, n in [("dualpipe", 2, 3), ("dualpipe", 2, 2), ("dualpipe", 4, 6), ("dualpipe", 3, 6),
                        ("dualpipe", 4, 9), ("dualpipev", 2, 3), ("1f1b", 2, 0), ("zb", 2, 4)]:
        with pytest.raises(ScheduleError):
            plan_pipeline(cfg, name, pp, n)
    import torch.distributed as dist

    assert not dist.is_initialized()  # nothing above touched torch.distributed


def test_engine_rejects_wrong_microbatch_count_before_communicating():
    from parallel.pipeline.runtime import PipelineEngine
    from parallel.topology import Topology

    cfg = tiny_cfg(3)
    sched = get_schedule("dualpipe", 2, 4)
    topo = Topology(2, 0, 2, build_groups=False)  # no process group: any collective would fail
    modules = build_stage_modules(cfg, sched, 0)
    engine = PipelineEngine(sched, modules, topo, overlap="none")
    with pytest.raises(ScheduleError):
        engine.forward_backward(batch(0, 6, cfg.vocab_size))
    engine.close()


def test_split_layers():
    from parallel import planner

    cfg = tiny_cfg(3)
    one = get_schedule("1f1b", 2, 4)
    assert split_layers(cfg, one) == [[0, 1], [2]]  # head + MTP make the last stage heavy
    assert split_layers(cfg, get_schedule("1f1b", 3, 6)) == [[0], [1], [2]]
    assert split_layers(cfg, one, [1, 2]) == [[0], [1, 2]]
    with pytest.raises(StageError, match="parallel.pp"):
        split_layers(cfg, get_schedule("1f1b", 4, 8))
    with pytest.raises(StageError, match="parallel.layers_per_stage"):
        split_layers(cfg, one, [3, 0])
    with pytest.raises(StageError, match="parallel.layers_per_stage"):
        split_layers(cfg, one, [1, 1])
    big = ModelConfig()  # DeepSeek-V3 671B: 61 layers; the last stage carries head + MTP
    d = get_schedule("dualpipe", 16, 120)
    split = split_layers(big, d, precision="fp8", seq_len=4096, recompute="norm_and_up_proj", ep=64)
    assert sum(len(s) for s in split) == 61 and all(split)
    assert len(split[-1]) < len(split[1])
    # one split function: the runtime cuts with the planner's
    assert [len(s) for s in split] == planner.split_layers(big, d.placement, 16, "fp8", 4096, "norm_and_up_proj",
                                                           planner.live_points(d), 64)


def test_stage_modules_share_the_embedding():
    cfg = tiny_cfg(4)
    d = get_schedule("dualpipe", 4, 8)
    for r in (0, 3):
        a, b = build_stage_modules(cfg, d, r)
        assert a.embed is b.embed
        names = {n for m in (a, b) for n, _ in m.named_parameters()}
        assert {"embed.weight", "head.weight", "mtp.0.eh_proj.weight"} <= names
    mid = build_stage_modules(cfg, d, 1)
    assert [sorted(m.layers) for m in mid] == [["1"], ["2"]] and all(m.embed is None for m in mid)
    f = get_schedule("1f1b", 2, 4)
    first, = build_stage_modules(cfg, f, 0)
    last, = build_stage_modules(cfg, f, 1)
    assert first.embed is not None and last.embed is not None and first.head is None and last.head is not None


# ---------------------------------------------------------------------------- pp x ep
def _ep_worker(rank, world, schedule_name, pp, ep, n_micro, steps):
    from parallel.grads import allreduce_gradients
    from parallel.pipeline.runtime import PipelineEngine
    from parallel.pipeline.stages import shard_stage_experts
    from parallel.topology import Topology

    cfg = tiny_cfg(3)
    topo = Topology(world, rank, pp, ep=ep)
    sched, split = plan_pipeline(cfg, schedule_name, pp, n_micro)
    modules = build_stage_modules(cfg, sched, topo.pp_rank, split=split)
    shard_stage_experts(modules, topo)
    for m in modules:
        m.init_weights(SEED)
        m.train()
    engine = PipelineEngine(sched, modules, topo)
    opt = _adamw(engine.parameters())
    out = {"lm": [], "mtp": [], "norm": [], "dp_rank": topo.dp_rank}
    first = {n: (m.first_expert, m.n_local) for m_ in modules for n, m in
             ((n, mod) for n, mod in m_.named_modules() if hasattr(mod, "first_expert"))}
    out["experts"] = first
    def my_share(step):  # this DP rank's slice of the global micro-batches [dp*MB, SEQ+1]
        full = batch(step, n_micro, cfg.vocab_size, MB * topo.dp)
        return [t[topo.dp_rank * MB:(topo.dp_rank + 1) * MB] for t in full]

    # DP mean after the engine step (the engine already summed the stage pair)
    _train_steps(engine, opt, out, steps, my_share, reduce=lambda: allreduce_gradients(engine.modules, topo))
    engine.close()
    return out


@pytest.mark.timeout(180)
def test_dualpipe_pp2_ep2_matches_single_process():
    """4 processes: pp=2 x dp=2 with ep=2 — the FB pairs' concurrent halves run their all-to-alls
    on per-chunk EP groups; grads after the DP reduction equal the single-process model's on the
    global batch (each reference micro-batch = both DP ranks' micro-batches)."""
    cfg, n_micro, steps, dp = tiny_cfg(3), 4, 2, 2
    ref = train_reference(cfg, n_micro, steps, mb=MB * dp)
    results = run_distributed(_ep_worker, 4, "dualpipe", 2, 2, n_micro, steps, timeout=175)
    for key in ("lm", "mtp"):  # each DP replica reports its own mean; their average is the global mean
        for s in range(steps):
            got = sum(r[key][s] for r in results) / dp
            assert math.isclose(got, ref[key][s], rel_tol=RTOL), (key, s, got, ref[key][s])
    def reference_shard(r: dict, table: str, name: str):
        """The single-process tensor, sliced to this rank's experts for an expert weight."""
        want, exp_mod = ref[table][name], name.rsplit(".", 1)[0]
        if exp_mod in r["experts"]:
            first, n_local = r["experts"][exp_mod]
            want = want[first:first + n_local]
        return want

    for rank, r in enumerate(results):
        for table in ("grads", "params"):
            for name, t in r[table].items():
                want = reference_shard(r, table, name)
                assert _rel(t, want) < RTOL, f"rank {rank}: {table} {name} off by rel {_rel(t, want):.2e}"
        for s in range(steps):
            assert math.isclose(r["norm"][s], ref["norm"][s], rel_tol=RTOL), (s, r["norm"][s], ref["norm"][s])


def a2a_compute_overlaps(trace: list[dict]) -> list[tuple]:
    """(rank, a2a event, compute event, overlap ms) for every all-to-all interval of one
    micro-batch that is open while the same rank computes (F / B / Bi / W) ANOTHER micro-batch.
    With sequential FB pairs (overlap="none") this is empty: a forward's all-to-alls lie inside
    that forward's own F interval and compute intervals never overlap each other."""
    xs = [e for e in trace if e.get("ph") == "X"]
    a2a = [e for e in xs if e["cat"] == "a2a"]
    compute = [e for e in xs if e["cat"] in ("F", "B", "Bi", "W")]
    out = []
    for a in a2a:
        for k in compute:
            if k["pid"] != a["pid"] or k["args"]["microbatch"] == a["args"]["microbatch"]:
                continue
            ov = min(a["ts"] + a["dur"], k["ts"] + k["dur"]) - max(a["ts"], k["ts"])
            if ov > 0:
                out.append((a["pid"], a, k, ov / 1e3))
    return out


@pytest.mark.timeout(150)
def test_dualpipe_ep_timeline_shows_a2a_overlapping_other_microbatch_compute(tmp_path):
    """The real trainer (torchrun, 4 ranks: pp=2 x dp=2, ep=2, DualPipe) with
    debug.record_timeline=true: in run.dir/timeline.json some all-to-all (dispatch / combine) of
    micro-batch i is open while the same rank computes micro-batch j != i — the forward half of an
    FB pair doing its all-to-all while the main thread runs the other micro-batch's backward."""
    import json

    from tests.helpers import run_cli

    r = run_cli(["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe", "train.global_batch=16",
                 "train.micro_batch=1", "model.n_layers=4", "train.steps=1", "debug.record_timeline=true",
                 f"run.dir={tmp_path}"], nproc=4, timeout=140)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "timeline.json") as f:
        trace = json.load(f)["traceEvents"]
    xs = [e for e in trace if e.get("ph") == "X"]
    assert {e["pid"] for e in xs} == {0, 1, 2, 3}
    for rank in range(4):  # every rank recorded its compute and its (forward) all-to-alls
        cats = {e["cat"] for e in xs if e["pid"] == rank}
        assert {"F", "B", "a2a", "p2p"} <= cats, (rank, cats)
    assert all(e["name"].split()[0] in ("dispatch", "combine") and "microbatch" in e["args"]
               for e in xs if e["cat"] == "a2a")
    found = a2a_compute_overlaps(trace)
    assert found, "no all-to-all interval overlaps another micro-batch's compute"
    # the overlap is the FB pair's: an all-to-all of the forward half (its own thread) during the
    # main thread's backward of another micro-batch
    assert any(a["args"]["thread"] == 1 and k["cat"] in ("B", "Bi") and k["tid"] == 0 for _, a, k, _ in found)
    assert (tmp_path / "timeline.png").stat().st_size > 1000


@pytest.mark.parametrize("mode", ["none", "norm_and_up_proj", "full", "fp8"])
def test_weight_grad_split_matches_full_backward(mode):
    """B (input grads only) + W (deferred weight grads) == one full backward, under activation
    recompute and simulated FP8 too; after B no parameter has a gradient yet."""
    from model import enable_fp8
    from parallel.pipeline.weight_grad import backward_input, backward_weight

    cfg = tiny_cfg(3)
    m = DeepSeekV3(cfg, layer_ids=[1, 2], has_embed=False, has_head=True,
                   recompute="none" if mode == "fp8" else mode)
    m.init_weights(SEED)
    m.train()
    if mode == "fp8":
        enable_fp8(m)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, SEQ, cfg.dim, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ + 1), generator=g)

    def run(split: bool):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = m.head_loss(m.forward_layers(x), ids[:, :-1], ids[:, 1:]).loss
        if split:
            (dx,), state = backward_input([loss], [None], [x], list(m.parameters()))
            assert all(p.grad is None for p in m.parameters())
            backward_weight(state)
        else:
            loss.backward()
            dx = x.grad
        return dx, {n: p.grad.clone() for n, p in m.named_parameters()}

    dx_full, g_full = run(False)
    dx_split, g_split = run(True)
    torch.testing.assert_close(dx_split, dx_full, rtol=0, atol=0)
    assert g_split.keys() == g_full.keys()
    for n in g_full:
        assert _rel(g_split[n], g_full[n]) < 1e-6, n
