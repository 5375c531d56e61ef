"""Two-hop node-limited dispatch (parallel/two_hop.py) and the a2a payload formats (model/wire.py).

On 4 gloo processes as 2 nodes of 2: two_hop equals flat (outputs and every gradient, rel 1e-6)
on routing edge cases; its measured inter-node bytes equal Σ over tokens of (distinct remote
destination nodes) × the row bytes of parallel/a2a_bytes.py; with bf16 / fp8 payloads the EP
layer equals LocalDispatcher's emulation of the same rounding. Single-process: the FP8 row size,
the prequantised FP8 GEMM entry point, and the config errors.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.moe import LocalDispatcher, MoE
from model.wire import FP32, Wire, resolve_wire
from parallel.a2a_bytes import combine_row_bytes, dispatch_row_bytes, flat_bytes, payload_row_bytes, two_hop_bytes
from parallel.dispatch import apply_expert_parallel
from parallel.two_hop import pair_counts
from parallel.testing import run_distributed
from parallel.topology import Topology


def _cfg(**kw) -> ModelConfig:
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                n_limited_groups=1, n_shared_experts=1, balance_alpha=0.0, route_scale=2.5)
    base.update(kw)
    return ModelConfig(**base)


def _moe(cfg: ModelConfig, bias: dict) -> MoE:
    torch.manual_seed(0)
    m = MoE(cfg)
    for p in m.parameters():
        nn.init.normal_(p, std=0.3)
    for e, v in bias.items():
        m.gate.bias[e] = v
    return m.train()


def _run(layer: MoE, x: torch.Tensor, g: torch.Tensor):
    xl = x.clone().requires_grad_()
    out = layer(xl)
    (out * g).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return out.detach(), xl.grad, grads


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    """max |a − b| ≤ rel · max |b| (relative to the tensor's scale, so near-zero entries count too)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), (what, err, scale)


def _distinct_remote_nodes(ids: torch.Tensor, per_node: int, my_node: int) -> int:
    return pair_counts(ids, per_node, 1, my_node)[0]


def _check_bytes(st: dict, ids: torch.Tensor, dim: int, k: int, n_experts: int, wire: Wire, topo, mode: str) -> dict:
    """Measured bytes summed over the 4 ranks (forward + backward + split sizes, both link kinds)
    == parallel/a2a_bytes.py's formula on this routing (one MoE call per rank)."""
    ep, gpus = topo.ep, topo.gpus_per_node
    n_local = n_experts // ep
    mine = pair_counts(ids, n_local, gpus, topo.ep_rank)
    keys = ["a2a_bytes_inter_node", "a2a_bytes_intra_node", "a2a_bytes_backward_inter_node", "a2a_bytes_splits"]
    tot = torch.tensor([float(st[key]) for key in keys] + mine, dtype=torch.float64)
    dist.all_reduce(tot)
    measured = dict(zip(keys, tot[:4].tolist()))
    tn, tg, te, rp, np_ = tot[4:].tolist()
    if mode == "two_hop":
        want = two_hop_bytes(tn, tg, te, dim, k, wire, calls=ep, n_nodes=ep // gpus, gpus=gpus)
    else:
        want = flat_bytes(rp, np_, dim, wire, calls=ep, n_local=n_local, remote_peers=ep - gpus, node_peers=gpus - 1)
    assert measured["a2a_bytes_inter_node"] == want["inter"], (mode, measured, want)
    assert measured["a2a_bytes_intra_node"] == want["intra"], (mode, measured, want)
    assert measured["a2a_bytes_backward_inter_node"] == want["backward_inter"], (mode, measured, want)
    assert measured["a2a_bytes_splits"] == want["splits_inter"] + want["splits_intra"], (mode, measured, want)
    return {"measured": measured, "planned": want, "token_nodes": tn, "remote_pairs": rp}


def _edge_cases(rank, world):
    topo = Topology.from_env(pp=1, dp=4, ep=4, gpus_per_node=2)
    assert dist.get_process_group_ranks(topo.ep_inter_group) == [topo.ep_rank % 2, topo.ep_rank % 2 + 2]
    assert dist.get_process_group_ranks(topo.ep_intra_group) == [2 * (rank // 2), 2 * (rank // 2) + 1]
    cases = {
        # name: (cfg kwargs, router bias, tokens per rank)
        "uneven, one rank without tokens": ({}, {}, [3, 0, 5, 2]),
        "no remote node (node limit 1, experts 0-3 favoured on node 0)":
            ({"max_nodes_per_token": 1}, {0: 5.0, 1: 5.0, 2: 5.0, 3: 5.0}, [2, 3, 1, 2]),
        "all tokens to node 1, node 0 receives nothing": ({}, {5: 100.0, 6: 100.0}, [2, 1, 3, 2]),
        "both experts of a token on one GPU": ({}, {6: 100.0, 7: 100.0}, [1, 2, 2, 3]),
        "k=3 over both nodes": ({"n_activated_experts": 3}, {}, [4, 3, 2, 1]),
    }
    out = {}
    for name, (kw, bias, ntok) in cases.items():
        cfg = _cfg(**kw)
        ref = _moe(cfg, bias)
        flat, two = copy.deepcopy(ref), copy.deepcopy(ref)
        d1 = apply_expert_parallel(flat, topo, source=ref, mode="flat")
        d2 = apply_expert_parallel(two, topo, source=ref, mode="two_hop")
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(sum(ntok), 1, cfg.dim, generator=gen)
        g = torch.randn(sum(ntok), 1, cfg.dim, generator=gen)
        lo = sum(ntok[:rank])
        sl = slice(lo, lo + ntok[rank])
        d1.reset_stats(), d2.reset_stats()
        o_f, dx_f, gr_f = _run(flat, x[sl], g[sl])
        o_t, dx_t, gr_t = _run(two, x[sl], g[sl])
        st, st_flat = d2.reset_stats(), d1.reset_stats()
        _close(o_t, o_f, 1e-6, (name, "out"))
        _close(dx_t, dx_f, 1e-6, (name, "dx"))
        for n in gr_f:
            _close(gr_t[n], gr_f[n], 1e-6, (name, n))
        # measured inter-node dispatch bytes = Σ distinct remote nodes × hop-1 row bytes
        with torch.no_grad():
            _, ids, _ = two.gate(x[sl].reshape(-1, cfg.dim))
        k = cfg.n_activated_experts
        remote = _distinct_remote_nodes(ids, 4, topo.ep_node)
        assert st["a2a_bytes_dispatch_inter_node"] == remote * dispatch_row_bytes(cfg.dim, k, "fp32", "hop1"), (name, st)
        # forward + backward + split sizes of both modes = the planner's formula on this routing
        b2 = _check_bytes(st, ids, cfg.dim, k, cfg.n_routed_experts, FP32, topo, "two_hop")
        b1 = _check_bytes(st_flat, ids, cfg.dim, k, cfg.n_routed_experts, FP32, topo, "flat")
        # one all-to-all per hop and direction, forward (+ split sizes) and backward
        assert st["a2a_calls"] == 10 and st_flat["a2a_calls"] == 5, (st, st_flat)
        tot = torch.tensor([b2["token_nodes"]])
        out[name] = (int(tot[0]), st, b2, b1)
    # node 0's tokens have no remote node: nothing of theirs crosses (node 1's come in and go back)
    assert (out["no remote node (node limit 1, experts 0-3 favoured on node 0)"][1]["a2a_bytes_dispatch_inter_node"]
            == 0) == (rank < 2)
    return out


def _wire_matches_local(rank, world, wire: Wire, fp8_experts: bool):
    """Per dispatch mode: (forward rel. error EP vs one process, input-gradient rel. error, size
    of the rounding itself, the byte check of the EP run)."""
    topo = Topology.from_env(pp=1, dp=4, ep=4, gpus_per_node=2)
    cfg = _cfg(dim=160, n_activated_experts=3)  # two 1×128 tiles, the second one partial
    ref = _moe(cfg, {})
    ref.experts.fp8 = fp8_experts
    ref.gate.n_nodes = 2
    ntok = [3, 2, 4, 1]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(ntok), 1, cfg.dim, generator=gen)
    g = torch.randn(sum(ntok), 1, cfg.dim, generator=gen)
    lo = sum(ntok[:rank])
    sl = slice(lo, lo + ntok[rank])
    o_plain, _, _ = _run(copy.deepcopy(ref), x, g)  # no rounding at all
    out = {}
    for mode in ("two_hop", "flat"):
        local = copy.deepcopy(ref)
        local.dispatcher = LocalDispatcher(wire, two_hop=mode == "two_hop", n_nodes=2, gpus_per_node=2)
        ep = copy.deepcopy(ref)
        apply_expert_parallel(ep, topo, source=ref, mode=mode, wire=wire)
        o_ref, dx_ref, gr_ref = _run(local, x, g)
        ep.dispatcher.reset_stats()
        o, dx, gr = _run(ep, x[sl], g[sl])
        with torch.no_grad():
            _, ids, _ = ep.gate(x[sl].reshape(-1, cfg.dim))
        b = _check_bytes(ep.dispatcher.reset_stats(), ids, cfg.dim, cfg.n_activated_experts, cfg.n_routed_experts,
                         wire, topo, mode)
        exact = (o - o_ref[sl]).abs().max() / o_ref.abs().max()
        grad = (dx - dx_ref[sl]).abs().max() / dx_ref.abs().max()
        effect = (o_plain - o_ref).abs().max() / o_ref.abs().max()
        # parameter gradients: the experts' (FP8 Wgrad under auto: each expert sees the same tokens
        # in one 128-token tile, in another order) gathered, the rest summed over the ranks
        worst = 0.0
        for n, p_grad in gr.items():
            if ".experts." in n or n.startswith("experts."):
                parts = [torch.empty_like(p_grad) for _ in range(world)]
                dist.all_gather(parts, p_grad.contiguous())
                full = torch.cat(parts)
            else:
                full = p_grad.clone()
                dist.all_reduce(full)
            worst = max(worst, float((full - gr_ref[n]).abs().max() / gr_ref[n].abs().max().clamp_min(1e-30)))
        out[mode] = (float(exact), max(float(grad), worst), float(effect), b)
    return out


# (parallel.a2a_dtype, FP8 experts): auto under precision=fp8 has FP8 experts; bf16 with FP8
# experts: the experts quantise rows that did not come as FP8 tiles
WIRES = [("bf16", False), ("fp8", False), ("auto", True), ("bf16", True)]


def _all_cases(rank, world):
    out = {"edge": _edge_cases(rank, world)}
    for a2a, fp8_experts in WIRES:
        out[a2a, fp8_experts] = _wire_matches_local(rank, world, resolve_wire(a2a, "fp8" if fp8_experts else "fp32"),
                                                    fp8_experts)
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_all_cases, 4, timeout=300)


def test_two_hop_equals_flat_on_edge_cases(four_ranks):
    """Outputs, input and parameter gradients rel 1e-6; measured bytes = the formula (in _edge_cases)."""
    assert four_ranks[0]["edge"]["all tokens to node 1, node 0 receives nothing"][0] > 0


@pytest.mark.parametrize("a2a", WIRES, ids=[f"{w}{'-fp8experts' if e else ''}" for w, e in WIRES])
@pytest.mark.parametrize("mode", ["two_hop", "flat"])
def test_wire_rounding_is_layout_invariant(four_ranks, a2a, mode):
    """The forward values, the input gradients AND every parameter gradient (FP8 expert Wgrad
    included under auto) of EP (flat or two_hop, 2 nodes of 2 GPUs) equal one process's
    LocalDispatcher emulation of the same rounding to fp32 round-off (the
    rounding itself changes them by far more): the backward rounds each gradient row where the
    EP exchanges do ((token, expert) pairs for flat; (token, GPU) and (token, node) sums for
    two_hop), summing in the same order."""
    for r in four_ranks:
        exact, grad, effect, _ = r[a2a][mode]
        assert exact < 1e-6, (a2a, mode, r[a2a][mode])
        assert effect > 1e-3, (a2a, mode, r[a2a][mode])  # the emulated rounding is real
        assert grad < 1e-6, (a2a, mode, r[a2a][mode])


def test_fp8_row_bytes_and_wire_names():
    assert payload_row_bytes(7168, "fp8") == 7168 + 4 * 56
    assert payload_row_bytes(64, "fp8") == 64 + 4
    assert payload_row_bytes(64, "fp32") == 256 and combine_row_bytes(64, "bf16") == 128
    assert resolve_wire("auto", "fp8") == Wire("fp8", "bf16", "bf16")
    assert resolve_wire("auto", "fp32") == FP32
    with pytest.raises(ValueError, match="parallel.a2a_dtype"):
        resolve_wire("fp4", "fp32")


def test_prequantized_fp8_linear_equals_fp8_linear():
    from model.fp8 import dequantize_act, fp8_linear, fp8_linear_prequantized, quantize_act

    torch.manual_seed(0)
    x = torch.randn(5, 160)
    w = torch.randn(24, 160, requires_grad=True)
    q, s = quantize_act(x)
    xd = dequantize_act(q, s).requires_grad_()
    y = fp8_linear_prequantized(xd, (q, s), w)
    y_ref = fp8_linear(xd.detach(), w.detach())  # requantising the dequantised rows: ~the same tiles
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    y.sum().backward()
    assert xd.grad is not None and w.grad is not None


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.ep=2", "parallel.dispatch=two_hop"], 2, "parallel.dispatch: two_hop needs an EP group of whole nodes"),
    (["parallel.a2a_dtype=fp4"], 1, "parallel.a2a_dtype: expected auto|fp32|bf16|fp8, got 'fp4'"),
    (["parallel.dispatch=three_hop"], 1, "parallel.dispatch: expected auto|flat|two_hop"),
])
def test_bad_dispatch_config_is_one_named_error_before_any_collective(overrides, world, message):
    """trainer.validate runs before any process group exists (the CLI prints `error: <message>`)."""
    from model import ConfigError
    from tests.helpers import TINY, compose, tiny_model_cfg
    from trainer.trainer import validate

    cfg = compose(TINY + overrides)
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        validate(cfg, tiny_model_cfg(), world)


def test_auto_dispatch_and_wire_follow_the_layout():
    from tests.helpers import TINY, compose, tiny_model_cfg
    from trainer.trainer import expert_dispatch, validate

    def resolved(overrides, world):
        cfg = compose(TINY + overrides)
        layout, _ = validate(cfg, tiny_model_cfg(), world)
        return expert_dispatch(cfg, tiny_model_cfg(), layout)

    assert resolved(["parallel.ep=4", "parallel.gpus_per_node=2"], 4) == ("two_hop", FP32)
    assert resolved(["parallel.ep=4"], 4) == ("flat", FP32)  # one 8-GPU node
    assert resolved(["parallel.expert_nodes=2", "precision=fp8"], 1) == ("two_hop", Wire("fp8", "bf16", "bf16"))
    assert resolved(["parallel.ep=2", "parallel.gpus_per_node=1", "parallel.dispatch=flat",
                     "parallel.a2a_dtype=bf16"], 2) == ("flat", Wire("bf16", "bf16", "bf16"))
