"""ZeRO-1 optimizer memory: our ShardedAdamW (parallel/zero.py) against DeepSpeed's stage-1
optimizer (DeepSpeedZeroOptimizer) on the same model, data and DP size, in the same run.

    torchrun --standalone --nproc_per_node 2 benchmarks/zero_memory.py [--model tiny|toy] [--steps 2]

Each rank builds the model (seeded by global name: identical replicas), then
1. ours: forward/backward, gradients averaged over DP (gloo all-reduce, as parallel/grads.py does),
   clipped to the global norm --clip, ShardedAdamW.step(); bytes = state_bytes() (its range of the moments and step counters; with FP32
   weights the parameter is the master copy);
2. DeepSpeed (the peer): a fresh copy of the same initial weights, deepspeed.initialize(...,
   zero_optimization.stage=1, gradient_clipping=--clip) with torch.optim.AdamW (same
   hyper-parameters), engine.backward,
   engine.step(); bytes = its FP32 master partition (single_partition_of_fp32_groups) + the moments
   and step of the wrapped AdamW, i.e. what it holds for the optimizer; its flat gradient partition
   and bucket buffers are reported apart.
Both runs see the same micro-batch; the max |Δ| of the updated weights and the ratio of the first
moments' norms show the peer computed the same update. Per rank: ``key=value`` lines; rank 0 prints the ratios. RSS high-water marks are
process-wide (both optimizers in one process) and are printed as the delta each phase added.

CPU needs DS_ACCELERATOR=cpu (set here) and gloo. DeepSpeed's TorchBackend JIT-builds its optional
shared-memory all-reduce op (deepspeed_shm_comm) on first use; a stale build lock in
~/.cache/torch_extensions/*/deepspeed_shm_comm/lock (a build killed half-way) makes every later
process wait on it forever. We detect such a lock and say so; the op is an intra-node fast path for
all-reduce, so this benchmark turns it off (``build_shm_op`` → None: DeepSpeed then calls
torch.distributed / gloo directly) instead of building or waiting for it.
"""
from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stale_locks(max_age_s: float = 600.0) -> list[str]:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    now = time.time()
    return [p for p in glob.glob(os.path.join(root, "*", "*", "lock")) if now - os.path.getmtime(p) > max_age_s]


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if hasattr(t, "numel"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip, both optimizers")
    ap.add_argument("--hang_s", type=float, default=300.0, help="dump every thread's stack and exit after this")
    args = ap.parse_args()
    import faulthandler

    faulthandler.dump_traceback_later(args.hang_s, exit=True)  # a hang reports where it is

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from model import DeepSeekV3, ModelConfig
    from parallel.zero import ShardedAdamW
    from tests.helpers import compose

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(compose([f"model={args.model}"]).model, resolve=True))
    hp = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1 + rank)  # each DP rank its own micro-batch
    tokens = torch.randint(0, mcfg.vocab_size, (args.batch, args.seq + 1), generator=gen)

    def loss_of(m):
        return m(tokens[:, :-1], tokens[:, 1:]).loss

    # ---- ours
    rss0 = _rss_peak()
    ours = DeepSeekV3(mcfg)
    ours.init_weights(0)
    init = {n: p.detach().clone() for n, p in ours.named_parameters()}
    n_params = sum(p.numel() for p in ours.parameters())
    opt = ShardedAdamW(ours.named_parameters(), **hp, dp_group=dist.group.WORLD, edp_group=dist.group.WORLD)
    loss_of(ours).backward()
    for p in ours.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
    torch.nn.utils.clip_grad_norm_(list(ours.parameters()), args.clip)  # every rank holds the full mean grads
    opt.step()
    ours_state = opt.state_bytes()
    ours_grad = opt.grad_bytes
    rss_ours = _rss_peak() - rss0

    # ---- DeepSpeed stage 1, same initial weights and data
    locks = _stale_locks()
    for lk in locks:
        print(f"rank{rank} note=stale torch-extension build lock {lk} (a JIT build would wait on it forever); "
              f"DeepSpeed's optional shm all-reduce op is disabled below")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (deepspeed.comm re-exports the torch module under that name)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see the module docstring
    ref = DeepSeekV3(mcfg, init_seed=None)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(init[n])
    rss1 = _rss_peak()
    # AdamW groups as ours (decay on matrices, none on 1-D tensors), same hyper-parameters
    groups = [{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": hp["weight_decay"]},
              {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    client_opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], foreach=False)
    config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": args.clip,
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, ds_opt, _, _ = deepspeed.initialize(model=ref, optimizer=client_opt, config=config,
                                                dist_init_required=False)
    loss = loss_of(engine.module)
    engine.backward(loss)
    engine.step()
    master = _tensor_bytes(ds_opt.single_partition_of_fp32_groups)
    moments = _tensor_bytes(t for st in ds_opt.optimizer.state.values() for t in st.values()
                            if torch.is_tensor(t))
    ds_state = master + moments
    ds_grad_part = _tensor_bytes(g.grad for g in ds_opt.single_partition_of_fp32_groups if g.grad is not None)
    rss_ds = _rss_peak() - rss1
    with torch.no_grad():
        diffs = {n: (p - engine.module.get_parameter(n)).abs().max().item() for n, p in ours.named_parameters()}
        diff = max(diffs.values())

    print(f"rank{rank} params={n_params} dp={world} ours_optimizer_state_bytes={ours_state} "
          f"ours_grad_bytes={ours_grad} ours_rss_added_bytes={rss_ours} "
          f"deepspeed_optimizer_state_bytes={ds_state} (fp32_master_partition={master} moments_and_step={moments}) "
          f"deepspeed_grad_partition_bytes={ds_grad_part} deepspeed_rss_added_bytes={rss_ds} "
          f"max_abs_weight_diff_after_step={diff:.3e}", flush=True)
    # same gradients? Σ over ranks of ‖exp_avg‖² (= (1-β1)²‖ḡ‖² after one step) from both optimizers
    sq = torch.tensor([sum(float(sh.state["exp_avg"].float().pow(2).sum()) for sh in opt.shards()),
                       sum(float(st["exp_avg"].float().pow(2).sum()) for st in ds_opt.optimizer.state.values())],
                      dtype=torch.float64)
    dist.all_reduce(sq)
    if rank == 0:
        print(f"first_moment_norm ours={sq[0].sqrt():.6e} deepspeed={sq[1].sqrt():.6e} ratio={(sq[1] / sq[0]).sqrt():.6f}")
    t = torch.tensor([ours_state, ds_state], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"max_over_ranks ours_optimizer_state_bytes={int(t[0])} deepspeed_optimizer_state_bytes={int(t[1])} "
              f"deepspeed_vs_ours={t[1] / t[0]:.3f} unsharded_fp32_adamw_bytes={8 * n_params} "
              f"bytes_per_param_per_rank ours={t[0] / n_params:.3f} deepspeed={t[1] / n_params:.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
