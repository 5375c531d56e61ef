"""parallel/zero.ShardedAdamW on its own: the unsharded update is torch.optim.AdamW's to the bit;
the ZeRO-1 shards over 4 gloo processes reproduce the unsharded run; BF16 weights get an FP32
master, and BF16 moments cost 2 + 2 bytes per element; a shard is within one element of 1/N."""
from __future__ import annotations

import torch

from parallel.param_groups import optimizer_param_groups
from parallel.testing import run_distributed
from parallel.zero import ShardedAdamW

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)  # odd sizes: ranges start and stop inside parameters
    return torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.LayerNorm(53), torch.nn.Linear(53, 5)).to(dtype)


def _train(model, opt, steps=4):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 37, generator=g)
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_unsharded_update_is_torch_adamw_bit_for_bit():
    a, b = _model(), _model()
    groups = [g for _, gs in optimizer_param_groups(list(a.named_parameters()), HP["weight_decay"]) for g in gs]
    ref = torch.optim.AdamW(groups, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], foreach=True)
    want = _train(a, ref)
    got = _train(b, ShardedAdamW(b.named_parameters(), **HP))
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_bf16_weights_get_fp32_master_and_bf16_moments():
    m = _model(torch.bfloat16)
    n = sum(p.numel() for p in m.parameters())
    opt = ShardedAdamW(m.named_parameters(), **HP, moment_dtype=torch.bfloat16)
    n_tensors = len(list(m.parameters()))
    assert opt.state_bytes() == n * (4 + 2 + 2) + 4 * n_tensors  # master + moments + a step each
    assert sum(p.numel() * p.element_size() for p in m.parameters()) == 2 * n  # half of fp32
    _train(m, opt, steps=2)
    for part in opt.parts:  # the BF16 weights are the rounded FP32 master
        for i, a, b, off in part.pieces:
            w = part.params[i].detach().view(-1)[a:b]
            assert torch.equal(w, part.master[off:off + b - a].to(torch.bfloat16))
    fp32 = _model()
    f_opt = ShardedAdamW(fp32.named_parameters(), **HP)
    assert f_opt.state_bytes() == n * 8 + 4 * n_tensors and all(p.master is None for p in f_opt.parts)


def _sharded(rank, world, dtype_name, moment_name):
    import torch.distributed as dist

    dtype, moments = getattr(torch, dtype_name), getattr(torch, moment_name)
    m = _model(dtype)
    opt = ShardedAdamW(m.named_parameters(), **HP, dp_group=dist.group.WORLD, moment_dtype=moments)
    return _train(m, opt), opt.state_bytes()


def test_sharded_over_four_ranks_equals_unsharded():
    for dtype, moments in (("float32", "float32"), ("bfloat16", "bfloat16")):
        m = _model(getattr(torch, dtype))
        ref_opt = ShardedAdamW(m.named_parameters(), **HP, moment_dtype=getattr(torch, moments))
        want, full_bytes = _train(m, ref_opt), ref_opt.state_bytes()
        results = run_distributed(_sharded, 4, dtype, moments, timeout=120)
        for got, _ in results:  # every rank holds the same, unsharded-equal weights
            assert all(torch.equal(want[n], got[n]) for n in want), dtype
        sizes = [b for _, b in results]
        per_elem = 8 if moments == "float32" else 4
        per_elem += 4 if dtype == "bfloat16" else 0
        n = sum(t.numel() for t in want.values())
        elems = [(s - 4 * k) / per_elem for s, k in zip(sizes, _pieces_per_rank(n))]
        assert max(elems) - min(elems) <= 1 and sum(elems) == n
        assert sum(sizes) < full_bytes + 4 * 3 * 4  # only step counters of split parameters repeat


def _pieces_per_rank(_n):
    from parallel.partition import zero_partition

    numels = [p.numel() for _, gs in optimizer_param_groups(list(_model().named_parameters()), 0.1)
              for g in gs for p in g["params"]]
    return [len(p) for p in zero_partition(numels, 4)]
