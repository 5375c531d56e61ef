"""FP8 vs FP32 training curves on the toy model (same seed, same data, same schedule).

    python benchmarks/fp8_curve.py [--steps 50] [--seeds 0] [--control] [--bf16] [--bf16-control] [--jobs 2] [--threads 1]
                                   [--budget-min 15] [--small] [--reuse]
                                   [--out benchmarks/fp8_curve.png] [--workdir /tmp/fp8_curve]

For every seed it trains ``python -m launch.train model=toy train.steps=N precision=fp32`` and the
same with ``precision=fp8`` (``train.seed`` = ``data.seed`` = the seed: model init and data order),
and with ``--control`` a third run: **fp32 again with ``--control-override``** (default
``train.micro_batch=4``, i.e. the same global batch cut into fewer, larger micro-batches). The
control is mathematically the same training as fp32 — only the order of the fp32 sums differs — so
its distance to fp32 is the *round-off noise floor* of this comparison: how far two runs that
differ by ~1e-7 relative at step 1 drift apart in 50 steps. FP8 is only distinguishable from fp32
where it differs by more than that. ``--bf16`` adds the run ``bf16_weights``: the real
``precision=bf16`` (BF16 module weights, FP32 main grads and master weights, BF16 AdamW moments;
GEMMs in fp32 on CPU). The paper's 0.25% is FP8 relative to BF16, so with ``--bf16`` the
``fp8_vs_bf16_weights_rel_diff`` is that comparison. ``--bf16-control`` adds the older control
``bf16``: the fp8 run's GEMMs with operands rounded to BF16 instead of E4M3
(benchmarks/bf16_gemm_train.py), which separates "any low-precision rounding of these GEMMs" from
FP8's; without ``--bf16`` the FP8-vs-BF16 figure is taken against it.

Printed (``key=value``):

* first seed (the headline, the issue's "same seed" figure): ``loss_last10_fp32=``,
  ``loss_last10_fp8=``, ``fp8_vs_fp32_rel_diff=`` = (fp8 − fp32) / fp32 of the mean loss of the
  last 10 steps (DeepSeek-V3 reports < 0.25% relative to BF16 at scale; ``paper_bound=0.0025``),
  ``control_vs_fp32_rel_diff=`` likewise for the control, and per-step statistics of the curves'
  relative difference (once two trajectories diverge the per-step difference is strongly
  autocorrelated, so the within-run spread is NOT an error bar; the spread across seeds is);
* per seed: ``seed=S`` with every variant's last-10 loss, ``{variant}_vs_fp32_rel_diff=…`` and
  ``fp8_vs_bf16_weights_rel_diff=…`` (or ``fp8_vs_bf16_rel_diff`` with only ``--bf16-control``);
* over seeds: mean, sd, sem, mean |·| and max |·| of each, whether the fp8 mean is within the
  bound, and how many seeds are within ±0.25% (``seeds_within_bound_*``);
* ``step_time_s_*``: median step time per variant (steps ≥ 2). On CPU FP8 is an exact
  *simulation* (quantise → dequantise → fp32 GEMM), so it is slower than fp32 here; on an FP8
  GPU it runs ``torch._scaled_mm``.

Measured (shared 2-core CPU, ``--seeds 0,1,2,3,4,5,6,7 --control --bf16 --small --steps 50
--jobs 2 --threads 1``, 32 runs in 2763 s; fp8 and bf16 both on BF16 weights and BF16 moments),
last-10-step mean loss: seed 0 (the headline) fp8 vs fp32 +0.931%, bf16 vs fp32 +0.153%, fp8 vs
bf16 +0.777%. Over the 8 seeds: fp8 vs bf16 (the paper's comparison) mean +0.223% (sd 0.272%,
sem 0.096%, max 0.777%, 6/8 within ±0.25%); fp8 vs fp32 +0.220% (sd 0.357%, 6/8); bf16 vs fp32
-0.003% (sd 0.115%, max |0.162%|, 8/8); round-off control +0.001% (max |3e-5|, 8/8). The control
stays at round-off, so the runs have not diverged chaotically and these are the precisions' own
effects: FP8 above BF16 on every seed, BF16 storage without a mean shift. At 12 steps
(``--steps 12``) the same shifts were a tenth: fp8 vs bf16 +0.012% (sd 0.013%), bf16 vs fp32
+0.010% (sd 0.002%). An earlier 50-step full-size sweep, when fp8 still kept fp32 weights and
moments, had fp8 vs fp32 at sd 0.37% across seeds.
Median step times there: fp32 1.06 s, bf16 2.27 s, fp8 6.89 s (FP8 simulated on CPU).

The plot (--out) shows the first seed's curves, their per-step relative difference, and every
seed's last-10 relative difference for every variant against the ±0.25% band.

Runs go to ``--workdir/seed{S}/{fp32,fp8,bf16_weights,bf16,control}`` and ``--jobs`` of them run at once, each with
``--threads`` intra-op threads (launch.train uses cpu_count // LOCAL_WORLD_SIZE threads on CPU;
on a shared 2-core machine 2 jobs × 1 thread are stable). ``--reuse`` keeps a run whose
``cmd.json`` (its arguments but run.dir) matches and whose metrics are complete (resume an interrupted sweep).
Budget: a 3-step fp8 probe runs first; if the projected fp8 run exceeds --budget-min, the model
is shrunk (``model.dim=128 model.n_layers=3 train.seq_len=64``, as with --small).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.dim=128", "model.n_layers=3", "train.seq_len=64"]
PAPER_BOUND = 0.0025
COLORS = {"fp8": "C3", "bf16": "C1", "bf16_weights": "C4", "control": "C2"}
LABELS = {"fp8": "fp8 vs fp32", "bf16": "bf16 GEMMs vs fp32", "bf16_weights": "precision=bf16\nvs fp32",
          "control": "control vs fp32\n(fp32 round-off only)"}


def _command(run_dir: str, precision: str, steps: int, seed: int, extra: list[str],
             module: str = "launch.train") -> list[str]:
    return [sys.executable, "-m", module, "model=toy", f"precision={precision}", f"train.steps={steps}",
            f"train.seed={seed}", f"data.seed={seed}", f"run.dir={run_dir}", "checkpoint.resume=none", "checkpoint.final=false",
            "logging.progress=false", "logging.peak_tflops=1", *extra]


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train(run_dir: str, precision: str, steps: int, seed: int, extra: list[str], threads: int,
           reuse: bool = False, module: str = "launch.train") -> list[dict]:
    cmd = _command(run_dir, precision, steps, seed, extra, module)
    # what the run computes: the arguments without the interpreter and the output directory
    recipe = [a for a in cmd[1:] if not a.startswith("run.dir=")]
    stamp = os.path.join(run_dir, "cmd.json")
    if reuse and os.path.exists(stamp):
        with open(stamp) as f:
            same = json.load(f) == recipe
        rows = _read_metrics(run_dir)
        if same and len(rows) == steps:
            return rows
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           # launch.train sets torch threads to cpu_count // LOCAL_WORLD_SIZE on CPU
           "LOCAL_WORLD_SIZE": str(max(1, (os.cpu_count() or 1) // threads))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-3000:]}")
    with open(stamp, "w") as f:
        json.dump(recipe, f)
    return _read_metrics(run_dir)


def _step_time(rows: list[dict]) -> float:
    return statistics.median([r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]])


def _rel(a: float, b: float) -> float:
    return (b - a) / a


def _summary(name: str, vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return (f"{name}_mean={statistics.fmean(vals):+.5f} ({statistics.fmean(vals) * 100:+.3f}%) sd={sd:.5f} "
            f"sem={sd / len(vals) ** 0.5:.5f} mean_abs={statistics.fmean(abs(v) for v in vals):.5f} "
            f"max_abs={max(abs(v) for v in vals):.5f} n={len(vals)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", default="0", help="comma list; the first is the headline pair")
    ap.add_argument("--control", action="store_true",
                    help="also run fp32 with --control-override (same math, other fp32 summation order)")
    ap.add_argument("--control-override", default="train.micro_batch=4")
    ap.add_argument("--bf16-control", action="store_true",
                    help="also run the same GEMMs with BF16 instead of E4M3 operands (benchmarks/bf16_gemm_train.py)")
    ap.add_argument("--bf16", action="store_true",
                    help="also run the real precision=bf16 (BF16 weights and moments, FP32 master): variant bf16_weights")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at once")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    ap.add_argument("--budget-min", type=float, default=15.0, help="max minutes for one fp8 run")
    ap.add_argument("--small", action="store_true", help="shrink the model: " + " ".join(SMALL))
    ap.add_argument("--reuse", action="store_true", help="keep finished runs with the same command")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "fp8_curve.png"))
    ap.add_argument("--workdir", default="/tmp/fp8_curve")
    args = ap.parse_args()
    last = min(10, args.steps)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]

    extra = list(SMALL) if args.small else []
    if not args.small:
        probe = _train(os.path.join(args.workdir, "probe"), "fp8", 3, seeds[0], extra, args.threads)
        projected = _step_time(probe) * args.steps / 60
        print(f"probe: fp8 step {_step_time(probe):.2f} s → {args.steps} steps ≈ {projected:.1f} min", flush=True)
        if projected > args.budget_min:
            extra = list(SMALL)
            print(f"NOTE: projected fp8 run exceeds {args.budget_min} min: shrinking the model ({' '.join(SMALL)})",
                  flush=True)
    # name -> (entry module, precision, extra overrides)
    variants = {"fp32": ("launch.train", "fp32", []), "fp8": ("launch.train", "fp8", [])}
    if args.bf16_control:
        variants["bf16"] = ("benchmarks.bf16_gemm_train", "fp8", [])
    if args.bf16:
        variants["bf16_weights"] = ("launch.train", "bf16", [])
    if args.control:
        variants["control"] = ("launch.train", "fp32", [args.control_override])
    print(f"model=toy overrides={' '.join(extra) or '(none)'} steps={args.steps} seeds={args.seeds} "
          f"variants={','.join(variants)} control={args.control_override if args.control else '(off)'} "
          f"jobs={args.jobs} threads={args.threads}", flush=True)

    # longest runs (fp8) first so the pool finishes together
    jobs = [(s, v) for v in ("fp8", "bf16", "bf16_weights", "fp32", "control") if v in variants for s in seeds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            (s, v): pool.submit(_train, os.path.join(args.workdir, f"seed{s}", v), variants[v][1], args.steps, s,
                                extra + variants[v][2], args.threads, args.reuse, variants[v][0])
            for s, v in jobs
        }
        runs = {key: fut.result() for key, fut in futures.items()}
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)

    def last_mean(s, v):
        return statistics.fmean(r["loss"] for r in runs[s, v][-last:])

    rel = {v: {s: _rel(last_mean(s, "fp32"), last_mean(s, v)) for s in seeds} for v in variants if v != "fp32"}
    # the paper's comparison, FP8 relative to BF16: against the real precision=bf16 when it ran, else the
    # BF16-GEMM control
    ref16 = "bf16_weights" if "bf16_weights" in variants else "bf16" if "bf16" in variants else None
    if ref16:
        rel_vs_bf16 = {s: _rel(last_mean(s, ref16), last_mean(s, "fp8")) for s in seeds}

    head = seeds[0]
    print(f"seed={head} (headline)")
    print(f"loss_first_fp32={runs[head, 'fp32'][0]['loss']:.5f} loss_first_fp8={runs[head, 'fp8'][0]['loss']:.5f}")
    for v in variants:
        print(f"loss_last{last}_{v}={last_mean(head, v):.5f}")
    print(f"fp8_vs_fp32_rel_diff={rel['fp8'][head]:+.5f} ({rel['fp8'][head] * 100:+.3f}%) "
          f"paper_bound={PAPER_BOUND} within_bound={abs(rel['fp8'][head]) <= PAPER_BOUND}")
    for v in rel:
        if v != "fp8":
            print(f"{v}_vs_fp32_rel_diff={rel[v][head]:+.5f} ({rel[v][head] * 100:+.3f}%)")
    if ref16:
        print(f"fp8_vs_{ref16}_rel_diff={rel_vs_bf16[head]:+.5f} ({rel_vs_bf16[head] * 100:+.3f}%) "
              f"within_bound={abs(rel_vs_bf16[head]) <= PAPER_BOUND}")
    steps = [r["step"] for r in runs[head, "fp32"]]
    per_step = {v: [_rel(a["loss"], b["loss"]) for a, b in zip(runs[head, "fp32"], runs[head, v])] for v in rel}
    for label, sl in ((f"last{last}", slice(-last, None)), ("all", slice(None))):
        vals = per_step["fp8"][sl]
        print(f"per_step_rel_diff_{label}_mean={statistics.fmean(vals):+.5f} _std={statistics.pstdev(vals):.5f} "
              f"_min={min(vals):+.5f} _max={max(vals):+.5f} _max_abs={max(abs(v) for v in vals):.5f} "
              f"_n_positive={sum(v > 0 for v in vals)}/{len(vals)}")

    if len(seeds) > 1:
        for s in seeds:
            print(f"seed={s} " + " ".join(f"loss_last{last}_{v}={last_mean(s, v):.5f}" for v in variants) + " "
                  + " ".join(f"{v}_vs_fp32_rel_diff={rel[v][s]:+.5f}" for v in rel)
                  + (f" fp8_vs_{ref16}_rel_diff={rel_vs_bf16[s]:+.5f}" if ref16 else ""))
        for v in rel:
            print(_summary(f"{v}_vs_fp32_rel_diff", list(rel[v].values())))
        if ref16:
            print(_summary(f"fp8_vs_{ref16}_rel_diff", list(rel_vs_bf16.values())))
        mean_fp8 = statistics.fmean(rel["fp8"].values())
        print(f"fp8_mean_within_bound={abs(mean_fp8) <= PAPER_BOUND} " + " ".join(
            f"seeds_within_bound_{v}={sum(abs(r) <= PAPER_BOUND for r in rel[v].values())}/{len(seeds)}" for v in rel)
              + (f" seeds_within_bound_fp8_vs_{ref16}={sum(abs(r) <= PAPER_BOUND for r in rel_vs_bf16.values())}"
                 f"/{len(seeds)}" if ref16 else ""))

    st = {v: statistics.median(_step_time(runs[s, v]) for s in seeds) for v in variants}
    print(" ".join(f"step_time_s_{v}={t:.3f}" for v, t in st.items())
          + f" fp8_vs_fp32_step_time_ratio={st['fp8'] / st['fp32']:.2f} (CPU: FP8 is simulated)")

    _plot(args.out, runs, rel, per_step, seeds, steps, last, extra)
    print(f"plot={args.out}")


def _plot(out, runs, rel, per_step, seeds, steps, last, extra) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = seeds[0]
    fig, (ax, ax2, ax3) = plt.subplots(3, 1, figsize=(7, 9), gridspec_kw={"height_ratios": [2, 1, 1]})
    styles = {"fp32": "-", "fp8": "--", "bf16": "-.", "bf16_weights": (0, (5, 1, 1, 1)), "control": ":"}
    for v, style in styles.items():
        if (head, v) in runs:
            rows = runs[head, v]
            m = statistics.fmean(r["loss"] for r in rows[-last:])
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linestyle=style, color=COLORS.get(v, "C0"),
                    label=f"{v} (last {last}: {m:.4f})")
    ax.set_ylabel("training loss (lm + λ·mtp + aux)")
    ax.set_xlabel("step")
    ax.set_title(f"toy model{' (' + ' '.join(extra) + ')' if extra else ''}, seed {head}: "
                 f"fp8 vs fp32 {rel['fp8'][head] * 100:+.3f}%", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()

    for v in per_step:
        ax2.plot(steps, [x * 100 for x in per_step[v]], ".-" if v == "fp8" else ".:", color=COLORS[v],
                 label=f"({v} − fp32) / fp32 per step")
    ax2.axvspan(steps[-last] - 0.5, steps[-1] + 0.5, color="C0", alpha=0.08, label=f"last {last} steps")
    ax2.set_xlabel("step")
    ax2.set_ylabel("rel. diff [%]")

    shown = [v for v in ("fp8", "bf16", "bf16_weights", "control") if v in rel]
    for i, v in enumerate(shown):
        vals = [rel[v][s] * 100 for s in seeds]
        ax3.scatter([i] * len(vals), vals, color=COLORS[v], alpha=0.7)
        ax3.errorbar([i + 0.15], [statistics.fmean(vals)],
                     yerr=[statistics.stdev(vals) / len(vals) ** 0.5] if len(vals) > 1 else None,
                     fmt="D", color="k", capsize=4)
    ax3.set_xticks(range(len(shown)), [LABELS[v] for v in shown], fontsize=8)
    ax3.set_xlim(-0.5, len(shown) - 0.5)
    ax3.set_ylabel(f"last-{last} mean rel. diff [%]")
    ax3.set_title(f"per seed ({len(seeds)} seeds; ◆ = mean ± sem)", fontsize=9)
    for a in (ax2, ax3):
        a.axhline(0, color="k", lw=0.8)
        for sign in (1, -1):
            a.axhline(sign * PAPER_BOUND * 100, color="gray", ls="--", lw=0.8)
        a.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
