"""Training throughput of our DeepSeekV3 vs transformers' DeepseekV3ForCausalLM, same weights.

    python benchmarks/model_vs_hf.py [--model toy] [--batch 4] [--seq 128] [--repeats 7] [--threads 2]

One process, fp32, CPU (or CUDA when present). Both models get the same config (mtp_depth=0 for
both), the same weights (ours → launch.convert.to_hf → from_pretrained), the same batches, and a
full training step each: forward + backward + AdamW. HF runs with its defaults: SDPA attention and
its default experts implementation (both printed; --hf-attn/--hf-experts change them). Steps alternate ours/HF; the median step time is
reported. The fp32 matmul peak of this machine is measured in the same run (median 2048³ matmul)
and MFU = (6·N_activated·tokens + attention FLOPs) / step_time / peak.

Prints: ours_tokens_per_s=… hf_tokens_per_s=… ratio_vs_hf=… mfu=… (plus details).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import DeepSeekV3, ModelConfig  # noqa: E402
from model.moe import Experts  # noqa: E402


def load_cfg(name: str) -> ModelConfig:
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "model", f"{name}.yaml")) as f:
        d = yaml.safe_load(f)
    with open(os.path.join(root, "configs", "data", "default.yaml")) as f:
        data = yaml.safe_load(f) or {}
    for k, v in d.items():  # presets may interpolate the data group: ${data.vocab_size}
        if isinstance(v, str) and v.startswith("${data."):
            d[k] = data[v[len("${data."):-1]]
    d["mtp_depth"] = 0  # transformers has no MTP training path: compare the main model only
    return ModelConfig.from_dict(d)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n=2048, repeats=5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def activated_params(model: DeepSeekV3, cfg: ModelConfig) -> int:
    """Parameters touched per token: all but the embedding; routed experts count k/E of theirs."""
    n = 0
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if mod_name == "embed":
                continue
            if isinstance(mod, Experts):
                n += p.numel() * cfg.n_activated_experts // cfg.n_routed_experts
            else:
                n += p.numel()
    return n


def attention_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Training (3× forward) FLOPs of QKᵀ and AV with the causal half: 3·2·B·H·T²·(d_qk+d_v)/2 per layer."""
    return 3 * cfg.n_layers * batch * cfg.n_heads * seq * seq * (cfg.qk_head_dim + cfg.v_head_dim)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-experts", default=None,
                    help="transformers experts_implementation (default: its own default, grouped_mm when available)")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation (sdpa | eager)")
    ap.add_argument("--adamw", default="default", choices=["default", "fused", "foreach"],
                    help="AdamW implementation, the same for both models")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step of ours")
    args = ap.parse_args()

    import transformers

    from launch.convert import to_hf

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_cfg(args.model)
    ours = DeepSeekV3(cfg)
    ours.init_weights(0)
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(cfg, ours.state_dict(), tmp)
        kw = {"experts_implementation": args.hf_experts} if args.hf_experts else {}
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                attn_implementation=args.hf_attn, **kw)
    ours.to(device).train()
    hf.to(device).train()
    hf.config.use_cache = False
    attn_impl = hf.config._attn_implementation
    experts_impl = getattr(hf.config, "_experts_implementation", None)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
               for _ in range(args.warmup + args.repeats)]
    impl = {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}[args.adamw]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **impl)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **impl)

    def step_ours(seq):
        out = ours(seq[:, :-1], seq[:, 1:])
        out.loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return out.lm_loss.item()

    def step_hf(seq):
        # HF shifts labels itself: labels = inputs predicts the same next tokens as ours
        out = hf(input_ids=seq[:, :-1], labels=seq[:, :-1], use_cache=False)
        out.loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return out.loss.item()

    # sanity: identical weights give the same first loss (on the T-1 positions HF scores)
    with torch.no_grad():
        s = batches[0]
        ours.eval(), hf.eval()
        lo = torch.nn.functional.cross_entropy(ours(s[:, :-1])[:, :-1].flatten(0, 1), s[:, 1:-1].flatten())
        lh = hf(input_ids=s[:, :-1], labels=s[:, :-1], use_cache=False).loss
        ours.train(), hf.train()
    print(f"initial_loss ours={lo.item():.6f} hf={lh.item():.6f}")

    peak = matmul_peak(device)
    t_ours, t_hf = [], []
    for i, seq in enumerate(batches):
        for fn, acc in ((step_ours, t_ours), (step_hf, t_hf)) if i % 2 == 0 else ((step_hf, t_hf), (step_ours, t_ours)):
            sync(device)
            t0 = time.perf_counter()
            fn(seq)
            sync(device)
            if i >= args.warmup:
                acc.append(time.perf_counter() - t0)
    peak = max(peak, matmul_peak(device))  # measured before and after the timed steps

    tokens = args.batch * args.seq
    ours_tps = tokens / statistics.median(t_ours)
    hf_tps = tokens / statistics.median(t_hf)
    n_act = activated_params(ours, cfg)
    flops_per_step = 6 * n_act * tokens + attention_flops(cfg, args.batch, args.seq)
    mfu = flops_per_step * ours_tps / tokens / peak
    print(f"device={device.type} threads={torch.get_num_threads()} model={args.model} batch={args.batch}x{args.seq} "
          f"fp32 hf_attn={attn_impl} hf_experts={experts_impl} adamw={args.adamw} repeats={args.repeats}")
    print(f"ours_step_s={statistics.median(t_ours):.4f} hf_step_s={statistics.median(t_hf):.4f} "
          f"n_activated={n_act} flops_per_step={flops_per_step:.3e} peak_flops={peak:.3e}")
    print(f"ours_tokens_per_s={ours_tps:.1f} hf_tokens_per_s={hf_tps:.1f} ratio_vs_hf={ours_tps / hf_tps:.2f} "
          f"mfu={mfu:.3f}")

    # on a shared machine the fastest step is the least disturbed one: report it too
    print(f"best_of: ours_tokens_per_s={tokens / min(t_ours):.1f} hf_tokens_per_s={tokens / min(t_hf):.1f} "
          f"ratio_vs_hf={min(t_hf) / min(t_ours):.2f} "
          f"mfu={flops_per_step / min(t_ours) / peak:.3f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step_ours(batches[0])
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
        total = sum(e.self_cpu_time_total for e in ka) / 1e3
        mm = sum(e.self_cpu_time_total for e in ka if e.key in ("aten::mm", "aten::bmm", "aten::addmm")) / 1e3
        opt = sum(e.cpu_time_total for e in ka if e.key.startswith("Optimizer.step")) / 1e3
        print(f"profile_ours: step_ms={total:.1f} matmul_ms={mm:.1f} ({mm / total:.0%}) "
              f"adamw_ms={opt:.1f} ({opt / total:.0%}) other_ms={total - mm - opt:.1f}")


if __name__ == "__main__":
    main()
