"""MoE layer fwd+bwd throughput with expert parallelism EP=2 on gloo: ours vs DeepSpeed's MoE.

    python benchmarks/moe_layer.py [--tokens 4096] [--dim 256] [--inter 256] [--experts 16]
                                   [--repeats 7] [--skew 0.3]

Two processes (one CPU thread each), each holding half of the experts. Both layers: same model
dim, expert size (SwiGLU, no bias), number of experts, top-2, dropless (DeepSpeed:
drop_tokens=False, i.e. capacity = the largest per-rank per-expert count in the EP group, every
expert padded to it; no random token selection, no sampled 2nd expert). Ours: no shared expert,
uneven all-to-all of exactly the routed rows. Both gates get the same weight, so they pick the
same experts for every token (top-2 of softmax = top-2 of sigmoid). Ours and DeepSpeed's steps
alternate in the same run; the median step over repeats is reported, for two inputs:
  balanced  isotropic hidden states (max/mean expert load ≈ 1.2: DeepSpeed pads little)
  skewed    hidden states with a shared mean direction (a few hot experts, max/mean ≈ 2.3)
One line per scenario:

    scenario=… ours_tokens_per_s=… deepspeed_tokens_per_s=… ratio_vs_deepspeed=… ours_a2a_bytes_fwd=…
    deepspeed_a2a_bytes_fwd=… ours_a2a_GBps=… …
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_deepspeed_build_lock(op: str = "deepspeed_shm_comm", stale_after_s: float = 900.0) -> None:
    """On CPU, deepspeed.init_distributed JIT-builds a small C++ op (g++ + ninja, about a minute) into
    torch's extensions cache (~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR), shared by every
    clone on this machine. A build killed midway leaves its `lock` file behind and the next run then
    waits on it forever: name the file and stop instead."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(op, verbose=False), "lock")
    if not os.path.exists(lock):
        return
    age = time.time() - os.path.getmtime(lock)
    if age > stale_after_s:
        raise SystemExit(
            f"error: {lock} is {age / 60:.0f} min old: a DeepSpeed op build ({op}) was killed midway and "
            f"left its lock, and torch would wait on it forever. Delete that file and rerun "
            f"(the op rebuilds in about a minute).")
    print(f"note: another process is building DeepSpeed's {op} op (lock {lock}); waiting for it", flush=True)


def _bench(rank: int, world: int, a: dict) -> dict:
    import logging

    import torch
    import torch.distributed as dist
    from torch import nn

    from model.config import ModelConfig
    from model.layers import MLP
    from model.moe import MoE
    from parallel.dispatch import shard_experts
    from parallel.topology import Topology

    torch.manual_seed(0)
    dim, inter, n_exp, k, n_tok = a["dim"], a["inter"], a["experts"], 2, a["tokens"]
    ep = world
    topo = Topology.from_env(pp=1, dp=world, ep=ep)

    # ---- ours ----
    cfg = ModelConfig(dim=dim, moe_inter_dim=inter, n_routed_experts=n_exp, n_activated_experts=k,
                      n_expert_groups=1, n_limited_groups=1, n_shared_experts=0)
    ours = MoE(cfg)
    for p in ours.parameters():
        nn.init.normal_(p, std=0.02)
    ours.train()
    disp = shard_experts(ours, topo.ep_rank, topo.ep, topo.ep_group, topo.gpus_per_node)

    # ---- DeepSpeed ----
    check_deepspeed_build_lock()
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the initialised default group
    ds = DSMoE(hidden_size=dim, expert=MLP(dim, inter), num_experts=n_exp, ep_size=ep, k=k,
               drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False, min_capacity=0)
    ds.set_deepspeed_parallelism()  # creates the EP groups (deepspeed.utils.groups)
    for p in ds.parameters():
        nn.init.normal_(p, std=0.02)
    ds.train()

    # identical routing decisions: DeepSpeed's top-2 of softmax(x·Wᵀ) = our top-2 of sigmoid(x·Wᵀ) (bias 0)
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)

    ds_capacity = []
    x = g = None

    def step_ours():
        xi = x.clone().requires_grad_()
        (ours(xi) * g).sum().backward()

    def step_ds():
        xi = x.clone().requires_grad_()
        out, l_aux, counts = ds(xi)
        ((out * g).sum() + l_aux).backward()
        c = counts.max().clone()
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        ds_capacity.append(int(c))

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    direction = torch.randn(dim, generator=torch.Generator().manual_seed(5))  # same on every rank
    results = {}
    for name, skew in (("balanced", 0.0), ("skewed", a["skew"])):
        gen = torch.Generator().manual_seed(100 + rank)
        # skewed: hidden states share a mean direction (anisotropic, as in trained models), so some
        # experts are hot for every token — the regime before/while the bias balancing catches up
        x = torch.randn(1, n_tok, dim, generator=gen) + skew * direction
        g = torch.randn(1, n_tok, dim, generator=gen)
        with torch.no_grad():
            load = torch.bincount(ours.gate(x.view(-1, dim))[1].flatten(), minlength=n_exp).float()
        dist.all_reduce(load)
        for _ in range(2):  # warm-up
            timed(step_ours)
            timed(step_ds)
        disp.reset_stats()
        ds_capacity.clear()
        t_ours, t_ds = [], []
        for _ in range(a["repeats"]):
            t_ours.append(timed(step_ours))
            t_ds.append(timed(step_ds))
        st = disp.reset_stats()
        reps = a["repeats"]
        results[name] = {
            "t_ours": statistics.median(t_ours), "t_ds": statistics.median(t_ds),
            # forward rows only (the counters also hold the backward rows and the split sizes)
            "ours_bytes": (st["a2a_bytes_intra_node"] + st["a2a_bytes_inter_node"] - st["a2a_bytes_splits"]
                           - st["a2a_bytes_backward_intra_node"] - st["a2a_bytes_backward_inter_node"]) / reps,
            "ours_a2a_s": st["a2a_seconds"] / reps,
            "ds_capacity": statistics.median(ds_capacity),
            "max_over_mean_load": float(load.max() / load.mean()),
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skew", type=float, default=0.3,
                    help="mean-direction strength of the hidden states in the skewed scenario")
    args = vars(ap.parse_args())

    from parallel.testing import run_distributed

    world = 2
    res = run_distributed(_bench, world, args, timeout=170,
                          env={"DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "3"})
    for name in res[0]:
        r = [rr[name] for rr in res]
        t_ours = max(x["t_ours"] for x in r)  # both ranks are barrier-synchronised; take the slower
        t_ds = max(x["t_ds"] for x in r)
        total_tokens = args["tokens"] * world
        ours_tps, ds_tps = total_tokens / t_ours, total_tokens / t_ds
        ours_bytes = sum(x["ours_bytes"] for x in r)  # forward dispatch+combine, both ranks, self included
        ours_a2a_s = max(x["ours_a2a_s"] for x in r)
        cap = r[0]["ds_capacity"]
        ds_bytes = world * 2 * args["experts"] * cap * args["dim"] * 4  # padded [E, C, M] buffers, fwd
        print(f"scenario={name} ours_tokens_per_s={ours_tps:.0f} deepspeed_tokens_per_s={ds_tps:.0f} "
              f"ratio_vs_deepspeed={ours_tps / ds_tps:.2f} "
              f"ours_a2a_bytes_fwd={ours_bytes:.0f} deepspeed_a2a_bytes_fwd={ds_bytes:.0f} "
              f"ours_a2a_GBps={ours_bytes / world / ours_a2a_s / 1e9:.3f} "
              f"ours_step_s={t_ours:.4f} deepspeed_step_s={t_ds:.4f} deepspeed_capacity={cap:.0f} "
              f"max_over_mean_expert_load={r[0]['max_over_mean_load']:.2f}")
    print(f"(EP=2 gloo, {args['tokens']} tokens/rank, dim {args['dim']}, inter {args['inter']}, "
          f"{args['experts']} experts, top-2, identical routing, fp32, 1 thread/rank, median of {args['repeats']})")


if __name__ == "__main__":
    main()
