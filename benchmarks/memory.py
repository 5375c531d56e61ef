"""Activation memory of one forward+backward for train.recompute = none | norm_and_up_proj | full.

    python benchmarks/memory.py [--model toy] [--batch 4] [--seq 128] [--precision fp32|fp8]

(run it once per precision: fp8 vs fp32 is the ratio of their saved_activation_bytes)

Each mode runs in its own subprocess (ru_maxrss is a process-lifetime peak), on the model preset
(configs/model/<model>.yaml; toy's vocabulary is the default tokenizer's 8192), one micro-batch of
random tokens, init seed 0. Per mode it prints

* ``saved_activation_bytes``: distinct storages autograd saved for backward during the forward
  (trainer.precision.SavedActivations; parameters/buffers excluded) — the honest "activation
  memory" figure, independent of the Python heap and of the allocator — next to the planner's
  figure for the same shape (parallel/activations.py, device=cpu);
* ``rss_peak_bytes``: the subprocess's peak RSS (includes Python, torch, the model, gradients);
* ``rss_step_bytes``: peak RSS minus the RSS just before the forward (model already built): what
  the forward+backward added to the process peak, allocator caching included;
* ``fwd_bwd_s``: wall time of the (second, timed) forward+backward.

and then the ratios of every mode to ``none``. Output: ``key=value`` lines.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("none", "norm_and_up_proj", "full")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(args) -> dict:
    import torch
    from omegaconf import OmegaConf

    from model import DeepSeekV3, ModelConfig
    from tests.helpers import compose
    from trainer.precision import SavedActivations, apply_precision

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = compose([f"model={args.model}"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    model = DeepSeekV3(mcfg, recompute=args.mode)
    model.init_weights(0)
    autocast = apply_precision(model, args.precision, "cpu")
    tokens = torch.randint(0, mcfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))

    # gradients exist before measuring (as in training after step 1): the step adds activations only
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    rss_before = _rss_now()
    with SavedActivations(exclude=model) as meter:
        with autocast():
            out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    loss = float(out.loss)
    del out
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with autocast():
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    dt = time.perf_counter() - t0
    from parallel.activations import part_saved_bytes
    from parallel.planner import param_inventory

    inv = param_inventory(mcfg)
    planned = sum(part_saved_bytes(mcfg, p.kind, args.precision, args.mode, micro_batch=args.batch,
                                   seq_len=args.seq, device="cpu")[0]
                  for p in [inv.embed, *inv.layers, inv.head, *inv.mtp])
    return {
        "planned_saved_activation_bytes": int(round(planned)),
        "mode": args.mode,
        "vocab_size": mcfg.vocab_size,
        "loss": loss,
        "saved_activation_bytes": meter.bytes,
        "saved_tensors": meter.count,
        "rss_peak_bytes": rss_peak,
        "rss_step_bytes": rss_peak - rss_before,
        "fwd_bwd_s": dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp8"))
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = ap.parse_args()
    if args.mode is not None:
        print(json.dumps(_measure(args)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {}
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--precision", args.precision, "--mode", mode]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"error: benchmarks/memory.py --mode {mode} failed:\n{res.stderr}")
        results[mode] = json.loads(res.stdout.strip().splitlines()[-1])

    base = results["none"]
    print(f"model={args.model} vocab_size={base['vocab_size']} batch={args.batch} seq_len={args.seq} "
          f"precision={args.precision}")
    for mode, r in results.items():
        print(f"[{mode}] saved_activation_bytes={r['saved_activation_bytes']} "
              f"planned={r['planned_saved_activation_bytes']} "
              f"(ratio {r['saved_activation_bytes'] / r['planned_saved_activation_bytes']:.4f}) "
              f"({r['saved_activation_bytes'] / 2**20:.1f} MiB, {r['saved_tensors']} tensors) "
              f"rss_peak_bytes={r['rss_peak_bytes']} ({r['rss_peak_bytes'] / 2**20:.0f} MiB) "
              f"rss_step_bytes={r['rss_step_bytes']} ({r['rss_step_bytes'] / 2**20:.0f} MiB) "
              f"fwd_bwd_s={r['fwd_bwd_s']:.3f} loss={r['loss']:.6f}")
    for mode in MODES[1:]:
        r = results[mode]
        print(f"{mode}_vs_none_saved_activation_ratio={r['saved_activation_bytes'] / base['saved_activation_bytes']:.3f} "
              f"{mode}_vs_none_rss_step_ratio={r['rss_step_bytes'] / max(base['rss_step_bytes'], 1):.3f} "
              f"{mode}_vs_none_time_ratio={r['fwd_bwd_s'] / base['fwd_bwd_s']:.3f} "
              f"{mode}_loss_equal={r['loss'] == base['loss']}")


if __name__ == "__main__":
    main()
