"""Expert parallelism on gloo: the EP MoE layer equals the single-process layer on the same GLOBAL
tokens (outputs, input/router/shared/expert gradients), dropless under any imbalance, node-limited
routing, byte accounting, gradient/load reductions, and a whole tiny model trained for a few steps.

Each case runs its scenarios inside one spawn of 2 or 4 gloo processes (spawning dominates the
cost on small machines). Every process also builds the single-process reference itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.moe import MoE
from model.wire import FP32
from parallel.a2a_bytes import flat_bytes
from parallel.dispatch import AllToAllDispatcher, global_expert_load, shard_experts
from parallel.grads import allreduce_gradients
from parallel.testing import run_distributed
from parallel.topology import Topology

TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(**kw) -> ModelConfig:
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                n_limited_groups=2, n_shared_experts=1, balance_alpha=0.0, route_scale=2.5)
    base.update(kw)
    return ModelConfig(**base)


def _moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(cfg)
    for p in m.parameters():
        nn.init.normal_(p, std=0.3)
    return m.train()


def _gather_experts(grad: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Sum a shard's grad over expert-DP, then concatenate the EP shards → full [E, ...]."""
    g = grad.clone()
    if topo.edp > 1:
        dist.all_reduce(g, group=topo.edp_group)
    parts = [torch.empty_like(g) for _ in range(topo.ep)]
    dist.all_gather(parts, g, group=topo.ep_group)
    return torch.cat(parts)


def _check_layer(topo: Topology, cfg: ModelConfig, bsz: list[int], seq: int = 4, bias: dict | None = None,
                 use_async: bool = False) -> dict:
    """Run the EP layer on this rank's slice of a global batch and compare with the 1-process layer
    on the whole batch under the summed loss Σ_r Σ out_r·G_r (well-defined for any split)."""
    ref = _moe(cfg)
    for e, v in (bias or {}).items():
        ref.gate.bias[e] = v
    ep_layer = copy.deepcopy(ref)
    disp = shard_experts(ep_layer, topo.ep_rank, topo.ep, topo.ep_group, topo.gpus_per_node, source=ref)
    ref.gate.n_nodes = ep_layer.gate.n_nodes  # the reference routes over the same node blocks

    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(sum(bsz), seq, cfg.dim, generator=gen)
    g = torch.randn(sum(bsz), seq, cfg.dim, generator=gen)
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)
    (out_ref * g).sum().backward()

    lo = sum(bsz[: topo.dp_rank])
    sl = slice(lo, lo + bsz[topo.dp_rank])
    xl = x[sl].clone().requires_grad_()
    if use_async:  # the overlap API composes to the same thing as __call__
        flat = xl.reshape(-1, cfg.dim)
        w, ids, _ = ep_layer.gate(flat)
        d = disp.dispatch_async(flat, ids, w, ep_layer.experts).wait()
        y = disp.combine_async(d, ep_layer.experts(d.x, d.counts)).wait()
        out = (y + ep_layer.shared_experts(flat)).view_as(xl)
    else:
        out = ep_layer(xl)
    (out * g[sl]).sum().backward()

    torch.testing.assert_close(out, out_ref[sl].detach(), **TOL)
    torch.testing.assert_close(xl.grad, xr.grad[sl], **TOL)
    for name in ("gate.weight", "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight"):
        p_ep, p_ref = ep_layer.get_parameter(name), ref.get_parameter(name)
        grad = p_ep.grad.clone()
        dist.all_reduce(grad)  # Σ over all ranks of the summed loss
        torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=name)
    for w in ("w1", "w2", "w3"):
        p = getattr(ep_layer.experts, w)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # a shard without tokens
        torch.testing.assert_close(_gather_experts(grad, topo), getattr(ref.experts, w).grad, **TOL, msg=w)

    # routing and byte accounting, recomputed from the reference routing of the global batch
    with torch.no_grad():
        _, ids_all, _ = ref.gate(x.reshape(-1, cfg.dim))
    k, nl = cfg.n_activated_experts, cfg.n_routed_experts // topo.ep
    row = cfg.dim * 4
    per_rank = [ids_all[sum(bsz[:r]) * seq: sum(bsz[: r + 1]) * seq] for r in range(topo.dp)]
    me = topo.dp_rank
    ep_base = topo.edp_rank * topo.ep  # dp index of EP rank 0 of my group
    send = [int((per_rank[me] // nl == q).sum()) for q in range(topo.ep)]
    recv = [int((per_rank[ep_base + q] // nl == topo.ep_rank).sum()) for q in range(topo.ep)]
    node = [q // topo.gpus_per_node for q in range(topo.ep)]
    st = disp.reset_stats()
    # rows for this rank itself never enter the collective
    mine = topo.ep_rank
    # to each other rank q: dispatch rows send[q] and combine rows recv[q], forward and again
    # backward (the gradients, fp32 here), plus n_local int64 split sizes before the dispatch
    splits = nl * 8
    exp_intra = sum(2 * (send[q] + recv[q]) * row + splits for q in range(topo.ep)
                    if node[q] == topo.ep_node and q != mine)
    exp_inter = sum(2 * (send[q] + recv[q]) * row + splits for q in range(topo.ep) if node[q] != topo.ep_node)
    assert st["a2a_bytes_intra_node"] == exp_intra, (st, exp_intra)
    assert st["a2a_bytes_inter_node"] == exp_inter, (st, exp_inter)
    assert st["a2a_bytes_intra_node"] + st["a2a_bytes_inter_node"] == \
        2 * (bsz[me] * seq * k + sum(recv) - send[mine] - recv[mine]) * row + (topo.ep - 1) * splits
    assert st["a2a_bytes_splits"] == (topo.ep - 1) * splits
    # split sizes, dispatch, combine; backward: combine's and dispatch's reverse exchanges
    assert st["a2a_calls"] == 5 and disp.stats["a2a_calls"] == 0  # reset
    return {"stats": st, "ids": per_rank[me], "recv": sum(recv)}


# ----------------------------------------------------------------------------------------------

def _two_ranks(rank, world):
    topo = Topology.from_env(pp=1, dp=None, ep=2)
    _check_layer(topo, _cfg(), bsz=[3, 2])  # uneven token counts, group-limited routing
    _check_layer(topo, _cfg(), bsz=[2, 2], use_async=True)
    # every token to ONE expert (k=1): dropless, rank 0's experts receive nothing
    r = _check_layer(topo, _cfg(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1),
                     bsz=[2, 3], bias={7: 100.0})
    assert (r["ids"] == 7).all() and (r["recv"] == 0) == (rank == 0)
    # k=2, both picks on rank 1's experts
    r = _check_layer(topo, _cfg(n_expert_groups=1, n_limited_groups=1), bsz=[3, 1], bias={5: 100.0, 6: 100.0})
    assert (r["recv"] == 0) == (rank == 0)
    # a rank with no tokens at all (Router's group limit cannot take 0 rows yet: 1 group here)
    _check_layer(topo, _cfg(n_expert_groups=1, n_limited_groups=1), bsz=[0, 3])
    return "ok"


def _four_ranks(rank, world):
    # ep=4 over 2 "nodes" of 2 ranks, a token's experts on at most 1 node
    topo = Topology.from_env(pp=1, dp=4, ep=4, gpus_per_node=2)
    cfg = _cfg(max_nodes_per_token=1)
    r = _check_layer(topo, cfg, bsz=[2, 1, 3, 2])
    nodes = r["ids"] // (cfg.n_routed_experts // topo.n_nodes_ep)
    assert (nodes == nodes[:, :1]).all(), "a token's experts span more than max_nodes_per_token=1 node"
    st = r["stats"]
    # flat: every (token, expert on another node) pair crosses, out and back (tests/test_two_hop.py
    # has two_hop's one row per (token, remote node))
    remote = int((nodes != topo.ep_node).sum())
    tot = torch.tensor([st["a2a_bytes_inter_node"], remote], dtype=torch.float64)
    dist.all_reduce(tot)
    calls = topo.ep  # one MoE call per rank
    want = flat_bytes(tot[1], 0, cfg.dim, FP32, calls=calls, n_local=cfg.n_routed_experts // topo.ep,
                      remote_peers=topo.ep - topo.gpus_per_node)
    assert tot[0] == want["inter"] and tot[0] > 0, (tot, want)
    # without the limit, uneven with an empty rank, everything in one node
    topo1 = Topology.from_env(pp=1, dp=4, ep=4, gpus_per_node=8)
    r = _check_layer(topo1, _cfg(n_expert_groups=1, n_limited_groups=1), bsz=[1, 0, 4, 2])
    assert r["stats"]["a2a_bytes_inter_node"] == 0
    return "ok"


def _groups_and_reductions(rank, world):
    # --- real process groups of pp=2 x dp=2 (ep=2) ---
    t = Topology.from_env(pp=2, dp=None, ep=2)
    for kind in ("pp", "dp", "ep", "edp", "stage_pair"):
        group = getattr(t, f"{kind}_group")
        assert dist.get_process_group_ranks(group) == getattr(t, f"{kind}_ranks"), kind
        v = torch.tensor([float(rank)])
        dist.all_reduce(v, group=group)
        assert v.item() == sum(getattr(t, f"{kind}_ranks")), kind
    assert t.mesh.mesh_dim_names == ("pp", "dp")
    assert (t.pp_rank, t.dp_rank) == divmod(rank, 2)
    # init_distributed validates from WORLD_SIZE before touching any collective
    from parallel.topology import LayoutError, init_distributed

    with pytest.raises(LayoutError, match="model.n_routed_experts=6 not divisible by parallel.ep=4"):
        init_distributed(pp=1, ep=4, model_cfg=_cfg(n_routed_experts=6, n_expert_groups=1, n_limited_groups=1))
    with pytest.raises(LayoutError, match="parallel.pp=3 does not divide world size 4"):
        init_distributed(pp=3)
    t2 = init_distributed(pp=2, ep=2, model_cfg=_cfg())  # already initialised: just the Topology
    assert t2.ep_ranks == t.ep_ranks and t2.backend == "gloo"

    # --- dp=4, ep=2 (expert-DP 2): mean local losses → grads of the global mean loss ---
    topo = Topology.from_env(pp=1, dp=4, ep=2)
    cfg = _cfg(balance_alpha=0.01)
    ref = _moe(cfg)
    ep_layer = copy.deepcopy(ref)
    shard_experts(ep_layer, topo.ep_rank, topo.ep, topo.ep_group, topo.gpus_per_node, source=ref)
    bsz, seq = 2, 4
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(world * bsz, seq, cfg.dim, generator=gen)
    g = torch.randn(world * bsz, seq, cfg.dim, generator=gen)
    (ref(x) * g).mean().backward()
    sl = slice(rank * bsz, (rank + 1) * bsz)
    (ep_layer(x[sl]) * g[sl]).mean().backward()
    allreduce_gradients(ep_layer, topo, bucket_mb=1e-4)  # tiny buckets: exercise the bucketing
    lo = topo.ep_rank * (cfg.n_routed_experts // topo.ep)
    for name, p in ep_layer.named_parameters():
        want = ref.get_parameter(name).grad
        if name.startswith("experts."):
            want = want[lo: lo + p.shape[0]]
        torch.testing.assert_close(p.grad, want, **TOL, msg=name)
    load = global_expert_load(ep_layer, topo)
    torch.testing.assert_close(load[""], ref.tokens_per_expert.float())
    return "ok"


def _tiny_model_steps(rank, world):
    """2 ranks, dp=2 ep=2: a whole DeepSeekV3 (with MTP) trained 3 AdamW steps + bias updates
    tracks the 1-process model on the same global batch."""
    from model.transformer import DeepSeekV3

    cfg = ModelConfig(vocab_size=128, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                      n_heads=2, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                      n_expert_groups=4, n_limited_groups=2, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16,
                      original_seq_len=16, mtp_depth=1, init_std=0.02, balance_alpha=1e-3,
                      bias_update_gamma=0.01).validate()
    topo = Topology.from_env(pp=1, dp=2, ep=2)
    ref = DeepSeekV3(cfg)
    ref.init_weights(0)
    model = DeepSeekV3(cfg)
    disp = shard_experts(model, topo.ep_rank, topo.ep, topo.ep_group, topo.gpus_per_node)
    model.init_weights(0)  # per-expert seeding reproduces the single-process slice
    nl = cfg.n_routed_experts // 2
    for name, m in model.moe_layers().items():
        assert m.experts.n_local == nl and m.dispatcher is disp
        full = ref.get_submodule(name).experts.w1
        torch.testing.assert_close(m.experts.w1, full[rank * nl:(rank + 1) * nl], rtol=0, atol=0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for step in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=gen)
        inp, lab = tokens[:, :-1], tokens[:, 1:]
        for m in (ref, model):
            for moe in m.moe_layers().values():
                moe.tokens_per_expert.zero_()
        loss_ref = ref(inp, lab).loss
        loss_ref.backward()
        loss = model(inp[rank * 2:(rank + 1) * 2], lab[rank * 2:(rank + 1) * 2]).loss
        loss.backward()
        allreduce_gradients(model, topo)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / 2, loss_ref.detach(), **TOL)
        for name, p in model.named_parameters():
            want = ref.get_parameter(name).grad
            if ".experts." in name:
                want = want[rank * nl:(rank + 1) * nl]
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
        loads = global_expert_load(model, topo)
        for name, moe in ref.moe_layers().items():
            torch.testing.assert_close(loads[name], moe.tokens_per_expert.float())
        ref.update_router_biases({n: m.tokens_per_expert for n, m in ref.moe_layers().items()})
        model.update_router_biases(loads)
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append((loss_ref.item(), (mean_loss / 2).item()))
    st = disp.reset_stats()
    assert st["a2a_calls"] == 3 * 3 * 5  # 2 MoE layers + the MTP block, 3 steps; 5 all-to-alls each
    return losses


# ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(150)
def test_ep2_layer_matches_single_process():
    assert run_distributed(_two_ranks, 2, timeout=120) == ["ok", "ok"]


@pytest.mark.timeout(150)
def test_ep4_node_limited_routing_and_bytes():
    assert run_distributed(_four_ranks, 4, timeout=120) == ["ok"] * 4


@pytest.mark.timeout(150)
def test_topology_groups_and_grad_reduction():
    assert run_distributed(_groups_and_reductions, 4, timeout=120) == ["ok"] * 4


@pytest.mark.timeout(150)
def test_tiny_model_ep2_tracks_single_process():
    losses = run_distributed(_tiny_model_steps, 2, timeout=120)[0]
    for ref_loss, ep_loss in losses:
        assert abs(ref_loss - ep_loss) <= 1e-5 * abs(ref_loss)


def test_dispatcher_without_group_equals_local():
    """ep=1 (no process group): same arithmetic as LocalDispatcher, no communication."""
    cfg = _cfg()
    a = _moe(cfg)
    b = copy.deepcopy(a)
    b.dispatcher = AllToAllDispatcher(None, cfg.n_routed_experts)
    x = torch.randn(3, 4, cfg.dim)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert b.dispatcher.stats["a2a_bytes_inter_node"] == 0


def _raise_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 blocks in a collective that rank 1 never joins
    return "unreachable"


def _hang_on_rank0(rank, world):
    if rank == 0:
        import time

        time.sleep(120)
    return rank


@pytest.mark.timeout(120)
def test_runner_reports_rank_error_and_timeout():
    from parallel.testing import DistributedTestError, DistributedTestTimeout

    with pytest.raises(DistributedTestError, match="(?s)rank 1 of 2 failed.*boom from rank 1"):
        run_distributed(_raise_on_rank1, 2, timeout=30)
    with pytest.raises(DistributedTestTimeout, match=r"ranks \[0\] did not finish"):
        # 20 s: long enough for rank 1 to start (import torch, join gloo) and finish on a loaded
        # 2-core machine (8 s was not: "ranks [0, 1] did not finish"), far below rank 0's hang
        run_distributed(_hang_on_rank0, 2, timeout=20)
