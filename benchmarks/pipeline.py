"""DualPipe vs 1F1B step time at pp=2 on 2 gloo processes (same model, same micro-batches).

    python -m benchmarks.pipeline [--steps 6] [--micro 4] [--layers 4] [--seq 128] [--mb 4] [--out runs/bench_pipeline]

Prints the median step time (forward_backward incl. DualPipe's stage-pair gradient all-reduce;
the max over the two ranks per step) of each schedule, ``ratio_dualpipe_vs_1f1b=`` (goal <= 0.8;
also from the fastest step of each, the least disturbed on a shared machine), the per-rank
process CPU time per step,
and the simulator's prediction for the F / B / W / FB costs measured on the timelines of one
recorded step of each schedule. The DualPipe timeline is written to OUT/timeline.{json,png}.
The two schedules are timed alternately inside the same processes, so background load on a
shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# (label, schedule, FB overlap): DualPipe's FB pairs with the forward half in a second thread
# (--overlap, default auto = thread on CPU) and, for comparison, strictly back to back.
CONFIGS = (("1f1b", "1f1b", "none"), ("dualpipe", "dualpipe", "auto"), ("dualpipe_seq", "dualpipe", "none"))


def _cfg(n_layers: int, seq: int):
    import yaml

    from model import ModelConfig

    with open(os.path.join(REPO, "configs/model/toy.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(vocab_size=2048, n_layers=n_layers, max_seq_len=max(seq, 64), original_seq_len=max(seq, 64))
    return ModelConfig.from_dict(d)


def _worker(rank, world, args):
    import torch
    import torch.distributed as dist

    from parallel.pipeline.runtime import PipelineEngine
    from parallel.pipeline.stages import build_stage_modules, plan_pipeline
    from parallel.pipeline.timeline import Timeline
    from parallel.topology import Topology

    cfg = _cfg(args["layers"], args["seq"])
    topo = Topology(world, rank, world)
    g = torch.Generator().manual_seed(0)
    mbs = list(torch.randint(0, cfg.vocab_size, (args["micro"], args["mb"], args["seq"] + 1), generator=g).unbind(0))
    engines, timelines, splits = {}, {}, {}
    for name, sched_name, overlap in CONFIGS:
        sched, split = plan_pipeline(cfg, sched_name, world, args["micro"])
        mods = build_stage_modules(cfg, sched, topo.pp_rank, split=split)
        for m in mods:
            m.init_weights(0)
            m.train()
        timelines[name] = Timeline(rank, enabled=False)
        engines[name] = PipelineEngine(sched, mods, topo, timeline=timelines[name],
                                       overlap=args["overlap"] if name == "dualpipe" else overlap)
        splits[name] = split

    def step(name):
        eng = engines[name]
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        eng.forward_backward(mbs)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        cpu[name].append(time.process_time() - c0)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        for p in eng.parameters():
            p.grad = None
        eng.reset_moe_stats()
        return float(dt)

    names = [c[0] for c in CONFIGS]
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for _ in range(2):  # warm-up
        for name in names:
            step(name)
    for i in range(args["steps"]):
        k = i % len(names)  # rotate the order so drifting background load hits all alike
        for name in names[k:] + names[:k]:
            times[name].append(step(name))
    events = {n: [] for n in names}
    for _ in range(args["record"]):
        for name in names:
            timelines[name].enabled = True
            step(name)
            timelines[name].enabled = False
            events[name] += [(e.name, e.cat, e.start, e.end, e.tid, e.args) for e in timelines[name].events]
    engines["dualpipe"].save_timeline(args["out"])
    for e in engines.values():
        e.close()
    return {"times": times, "events": events, "split": splits["1f1b"], "cpu": cpu}


def _costs(events_per_rank, key: str = "cpu") -> dict:
    """Mean cost per action kind (F, B = full backward, Bi = input-grad backward, W) over all
    recorded actions of all ranks, in seconds: key "cpu" = the computing thread's CPU time (robust
    to other load on a shared machine), "wall" = the interval length."""
    from collections import defaultdict

    dur = defaultdict(list)
    for ev in events_per_rank:
        for n, cat, s, e, tid, a in ev:
            if cat in ("F", "B", "Bi", "W"):
                dur[cat].append(a["cpu_s"] if key == "cpu" else e - s)
    return {k: statistics.mean(v) for k, v in dur.items() if v}


def _reduce_s(events_per_rank) -> float:
    """Mean wall time of the end-of-step gradient reduction (stage pair / tied embedding)."""
    per_step = [e - s for ev in events_per_rank for n, cat, s, e, tid, a in ev if n.startswith("stage-pair")]
    return statistics.mean(per_step) if per_step else 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step (>= 2*pp, even)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mb", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--record", type=int, default=2, help="steps per schedule recorded on the timeline")
    ap.add_argument("--overlap", default="auto", choices=["auto", "thread", "none"])
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_pipeline"))
    args = vars(ap.parse_args(argv))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from parallel.pipeline import Costs, get_schedule, simulate
    from parallel.testing import run_distributed

    t0 = time.perf_counter()
    res = run_distributed(_worker, 2, args, timeout=600)
    times = res[0]["times"]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["dualpipe"] / med["1f1b"]
    n = args["micro"]
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    print(f"pp=2 (2 gloo processes, 1 intra-op thread each), {n} micro-batches of {args['mb']}x{args['seq']} tokens, "
          f"toy model with {args['layers']} layers (split {res[0]['split']}), DualPipe FB overlap={args['overlap']}, "
          f"{args['steps']} timed steps each (median of max-over-ranks forward_backward wall time)")
    for name in times:
        cpu = ", ".join(f"{statistics.median(r['cpu'][name]) * 1e3:.0f}" for r in res)
        print(f"step_time_{name}_ms={ms(med[name])}  all={[ms(t) for t in times[name]]}  "
              f"process CPU ms/step per rank: {cpu}")

    # simulator prediction from the measured per-action costs (CPU time: what the action costs
    # when it has a core; an FB pair is costed as F + B, i.e. no gain from overlapping on CPU)
    c1 = _costs([r["events"]["1f1b"] for r in res])
    cd = _costs([r["events"]["dualpipe"] for r in res])
    red1 = _reduce_s([r["events"]["1f1b"] for r in res])
    redd = _reduce_s([r["events"]["dualpipe"] for r in res])
    sim_1f = simulate(get_schedule("1f1b", 2, n), Costs(f=c1["F"], b=c1["B"], w=0.0, fb=c1["F"] + c1["B"])).makespan
    bfull = cd.get("B", cd.get("Bi", 0) + cd.get("W", 0))
    w = cd.get("W", 0.0)
    sim_dp = simulate(get_schedule("dualpipe", 2, n),
                      Costs(f=cd["F"], b=cd.get("Bi", bfull - w) + w, w=w, fb=cd["F"] + bfull, full_b=bfull)).makespan
    unit_1f = simulate(get_schedule("1f1b", 2, n), Costs(f=1, b=2, w=1, fb=3)).makespan
    unit_dp = simulate(get_schedule("dualpipe", 2, n), Costs(f=1, b=2, w=1, fb=3)).makespan
    print(f"measured CPU cost per action ms: 1F1B F={ms(c1['F'])} B={ms(c1['B'])} | DualPipe F={ms(cd['F'])} "
          f"B(full)={ms(bfull)} Bi={ms(cd.get('Bi', 0))} W={ms(w)} (Bi+W-B(full)={ms(cd.get('Bi', 0) + w - bfull)}: "
          f"W-split overhead) | end-of-step grad all-reduce wall ms: 1F1B (tied embedding)={ms(red1)} "
          f"DualPipe (stage pair)={ms(redd)}")
    print(f"simulated_makespan_ms (measured costs, + grad all-reduce): 1f1b={ms(sim_1f + red1)} "
          f"dualpipe={ms(sim_dp + redd)}  predicted_ratio={(sim_dp + redd) / (sim_1f + red1):.3f}  "
          f"(compute only: {sim_dp / sim_1f:.3f}; unit costs F=1 B=2 W=1 FB=F+B: {unit_dp / unit_1f:.3f})")
    for name in times:
        parts = []
        for r, rr in enumerate(res):
            ev = rr["events"][name]
            cpu = sum(a["cpu_s"] for _, cat, _, _, _, a in ev if cat in ("F", "B", "Bi", "W"))
            parts.append(f"rank {r} compute CPU {ms(cpu / args['record'])}")
        print(f"recorded {name}: " + ", ".join(parts) + " ms/step")
    best = {k: min(v) for k, v in times.items()}
    print(f"ratio_dualpipe_vs_1f1b={ratio:.3f}  (medians; goal <= 0.8; DualPipe without FB threads: "
          f"{med['dualpipe_seq'] / med['1f1b']:.3f})")
    print(f"ratio_dualpipe_vs_1f1b_best={best['dualpipe'] / best['1f1b']:.3f}  (fastest step of each: the least "
          f"disturbed by other load; without FB threads: {best['dualpipe_seq'] / best['1f1b']:.3f})")
    print(f"timeline: {os.path.join(args['out'], 'timeline.json')} / timeline.png; wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
