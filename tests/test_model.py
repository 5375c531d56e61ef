"""Model semantics on tiny configs, single process: router, MLA, MTP, balancing, init, dispatch, YaRN."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import DeepSeekV3
from tests.helpers import tiny_model_cfg as tiny_cfg
from model.attention import MLA
from model.layers import rope_cache
from model.moe import Experts, LocalDispatcher, MoE, Router, bias_update, sequence_balance_loss

torch.set_num_threads(1)




def model_of(cfg, seed=0) -> DeepSeekV3:
    m = DeepSeekV3(cfg)
    m.init_weights(seed)
    return m


def router_of(cfg, seed=0) -> Router:
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return r


def ref_route(scores, bias, n_groups, topk_groups, topk, route_scale):
    """DeepSeek-V3's rule token by token: top groups by the sum of their top-2 biased scores, top-k
    biased scores inside them, gates = unbiased scores normalised over the k, × route_scale."""
    ids, ws = [], []
    per = scores.shape[1] // n_groups
    for s in scores:
        b = s + bias
        gscore = [sorted(b[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_groups)]
        groups = sorted(range(n_groups), key=lambda g: -sum(gscore[g]))[:topk_groups]
        cand = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda e: -b[e].item())[:topk]
        w = s[chosen] / s[chosen].sum() * route_scale
        order = sorted(range(topk), key=lambda i: chosen[i])
        ids.append([chosen[i] for i in order])
        ws.append(w[order])
    return torch.tensor(ids), torch.stack(ws)


def sort_by_id(ids, w):
    o = ids.argsort(dim=1)
    return ids.gather(1, o), w.gather(1, o)


# ------------------------------------------------------------------------------------------
# router
# ------------------------------------------------------------------------------------------
def test_router_matches_reference_group_limited():
    cfg = tiny_cfg(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
    r = router_of(cfg)
    r.bias.copy_(torch.rand(16, generator=torch.Generator().manual_seed(1)) * 0.1)
    x = torch.randn(64, cfg.dim, generator=torch.Generator().manual_seed(2))
    w, ids, scores = r(x)
    torch.testing.assert_close(scores, torch.sigmoid(x @ r.weight.T))
    ref_ids, ref_w = ref_route(scores, r.bias, 4, 2, 4, cfg.route_scale)
    ids, w = sort_by_id(ids, w)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_router_bias_selects_but_does_not_weight():
    cfg = tiny_cfg()
    r = router_of(cfg)
    x = torch.randn(32, cfg.dim, generator=torch.Generator().manual_seed(0))
    w0, ids0, s0 = r(x)
    r.bias[5] = 10.0
    w, ids, s = r(x)
    assert (ids == 5).any(dim=1).all()  # the big bias wins expert 5 a slot for every token
    assert not torch.equal(ids, ids0)
    torch.testing.assert_close(s, s0)  # scores are unbiased
    # gate weights come from the UNBIASED sigmoid scores of the selected experts, normalised
    sel = s0.gather(1, ids)
    torch.testing.assert_close(w, sel / sel.sum(1, keepdim=True) * cfg.route_scale)
    torch.testing.assert_close(w.sum(1), torch.full((32,), cfg.route_scale))


def test_router_topk_normalised_and_group_limit_holds():
    cfg = tiny_cfg(n_routed_experts=32, n_activated_experts=6, n_expert_groups=8, n_limited_groups=3,
                   route_scale=1.7)
    for seed in range(5):
        r = router_of(cfg, seed)
        r.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(seed + 10)) * 0.3)
        x = torch.randn(128, cfg.dim, generator=torch.Generator().manual_seed(seed + 20))
        w, ids, _ = r(x)
        assert ids.shape == (128, 6) and (w > 0).all()
        assert all(len(set(row.tolist())) == 6 for row in ids)  # k distinct experts
        torch.testing.assert_close(w.sum(1), torch.full((128,), 1.7))
        groups = ids // (32 // 8)
        assert max(len(set(g.tolist())) for g in groups) <= 3


@pytest.mark.parametrize("n_groups,limit", [(1, 1), (4, 4)])
def test_node_limited_routing(n_groups, limit):
    cfg = tiny_cfg(n_routed_experts=16, n_activated_experts=4, n_expert_groups=n_groups, n_limited_groups=limit,
                   max_nodes_per_token=2)
    model = model_of(cfg)
    model.set_expert_nodes(8)  # 2 experts per node, at most 2 nodes per token
    r = model.layers["1"].ffn.gate
    assert r.n_nodes == 8
    x = torch.randn(256, cfg.dim, generator=torch.Generator().manual_seed(0))
    _, ids, scores = r(x)
    nodes = ids // 2
    spans = [len(set(n.tolist())) for n in nodes]
    assert max(spans) <= 2 and min(spans) == 2  # k=4 from 2-expert nodes needs exactly 2 nodes
    # without the node limit the same tokens spread wider
    model.set_expert_nodes(1)
    _, ids_free, _ = r(x)
    assert max(len(set((i // 2).tolist())) for i in ids_free) > 2
    # chosen nodes are the best by the sum of their top k/M = 2 scores (paper §2.2.3)
    node_score = scores.view(-1, 8, 2).sum(-1)
    best = node_score.topk(2, dim=1).indices.sort(1).values
    assert torch.equal(nodes.sort(1).values[:, ::2], best)  # both experts of each of the 2 best nodes


# ------------------------------------------------------------------------------------------
# MLA
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_mla_shapes_and_causality(q_lora_rank):
    cfg = tiny_cfg(q_lora_rank=q_lora_rank)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
    assert hasattr(attn, "wq") == (q_lora_rank == 0) and hasattr(attn, "wq_a") == (q_lora_rank > 0)
    x = torch.randn(2, 16, cfg.dim, generator=torch.Generator().manual_seed(0))
    rope = rope_cache(cfg)[:16]
    y = attn(x, rope)
    assert y.shape == (2, 16, cfg.dim)
    t = 6
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(2, 16 - t - 1, cfg.dim)
    y2 = attn(x2, rope)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_whole_model_causal_and_eval_logits():
    cfg = tiny_cfg()
    model = model_of(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 20, cfg.vocab_size)
        ids2 = ids.clone()
        ids2[:, 12:] = (ids2[:, 12:] + 1) % cfg.vocab_size
        torch.testing.assert_close(model(ids2)[:, :12], out[:, :12])


# ------------------------------------------------------------------------------------------
# MTP
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_targets_shifted(monkeypatch, depth):
    import model.transformer as T

    cfg = tiny_cfg(mtp_depth=depth, mtp_lambda=0.3)
    model = model_of(cfg).eval()
    seq = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ids, labels = seq[:, :-1], seq[:, 1:]  # labels[i] = t_{i+1}
    targets, seen = [], []
    real_ce = F.cross_entropy
    monkeypatch.setattr(T.F, "cross_entropy", lambda logits, tgt, *a, **k: (targets.append(tgt), real_ce(logits, tgt, *a, **k))[1])
    for m in model.mtp:
        m.register_forward_hook(lambda mod, args, out: seen.append((args, out)))
    with torch.no_grad():
        out = model(ids, labels)
        h = model.forward_layers(model.embed_tokens(ids))
    T_ = ids.shape[1]
    assert len(targets) == 1 + depth
    assert torch.equal(targets[0], labels.flatten())
    rep = model.norm(h)
    hand = []
    for k in range(1, depth + 1):
        # depth k at position i predicts t_{i+k+1} from h^{k-1}_i and Emb(t_{i+k})
        assert torch.equal(targets[k], seq[:, k + 1:].flatten())
        (h_prev, emb_next, rope), rep_k = seen[k - 1]
        assert h_prev.shape[1] == emb_next.shape[1] == T_ - k
        torch.testing.assert_close(emb_next, model.embed(seq[:, k:T_]))
        torch.testing.assert_close(h_prev, rep[:, :-1])
        rep = rep_k
        hand.append(real_ce(model.head(rep_k).flatten(0, 1), seq[:, k + 1:].flatten()))
    lm = real_ce(model.head(model.norm(h)).flatten(0, 1), labels.flatten())
    mtp = torch.stack(hand).mean()
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.mtp_loss, mtp)
    torch.testing.assert_close(out.loss, lm + 0.3 * mtp)


def test_mtp_shares_embedding_and_head():
    model = model_of(tiny_cfg())
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("mtp.") and ("embed" in n or "head" in n) for n in names)


# ------------------------------------------------------------------------------------------
# balancing
# ------------------------------------------------------------------------------------------
def test_bias_update_sign_rule():
    bias = torch.zeros(4)
    bias_update(bias, torch.tensor([10.0, 2.0, 4.0, 0.0]), gamma=0.001)  # mean 4
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.0, 0.001]))
    cfg = tiny_cfg(bias_update_gamma=0.01)
    model = model_of(cfg)
    loads = {name: torch.arange(8.0) for name in model.moe_layers()}  # mean 3.5
    model.update_router_biases(loads)
    for m in model.moe_layers().values():
        torch.testing.assert_close(m.gate.bias, torch.tensor([0.01] * 4 + [-0.01] * 4))


def test_sequence_balance_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    B, T, E, k, alpha = 3, 7, 8, 2, 0.01
    scores = torch.rand(B, T, E, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    total = 0.0
    for b in range(B):
        for i in range(E):
            f_i = E / (k * T) * sum(int(i in ids[b, t].tolist()) for t in range(T))
            p_i = sum(scores[b, t, i] / scores[b, t].sum() for t in range(T)) / T
            total += f_i * p_i
    want = alpha * total / B
    torch.testing.assert_close(sequence_balance_loss(scores, ids, alpha), torch.tensor(float(want)))


def _router_grad(alpha):
    cfg = tiny_cfg(balance_alpha=alpha, mtp_depth=0)
    model = model_of(cfg).train()
    seq = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model(seq[:, :-1], seq[:, 1:]).loss.backward()
    return model.layers["1"].ffn.gate.weight.grad.clone(), model.layers["2"].ffn.gate.weight.grad.clone()


def test_aux_loss_gradient_reaches_router():
    g0 = _router_grad(0.0)
    g1 = _router_grad(0.5)
    for a, b in zip(g0, g1):
        assert not torch.allclose(a, b)
    # and it is the gradient of the balance loss: alpha 0.5 vs 1.0 differ by the same amount
    g2 = _router_grad(1.0)
    for a, b, c in zip(g0, g1, g2):
        torch.testing.assert_close(c - a, 2 * (b - a), atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# init
# ------------------------------------------------------------------------------------------
def test_init_independent_of_order_and_stage_split():
    cfg = tiny_cfg()
    torch.manual_seed(123)
    whole = model_of(cfg, seed=7)
    torch.manual_seed(999)  # global RNG state and construction order do not matter
    stage = DeepSeekV3(cfg, layer_ids=[2, 1], has_embed=False, has_head=False)
    stage.init_weights(7)
    ref = whole.state_dict()
    sd = stage.state_dict()
    assert sd and all(k.startswith("layers.") for k in sd)
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k
    head = DeepSeekV3(cfg, layer_ids=[], has_embed=False, has_head=True)
    head.init_weights(7)
    for k, v in head.state_dict().items():  # head stage: norm, head, MTP and the embedding it needs
        assert torch.equal(v, ref[k]), k
    assert not torch.equal(model_of(cfg, seed=8).embed.weight, whole.embed.weight)  # the seed matters


def test_expert_name_predicate_matches_module_structure():
    """model.naming.is_expert_param (used on names by the optimizer groups, gradient reduction,
    grad norm, FLOP counts and planner) says "expert" exactly for the parameters of Experts
    modules (what checkpoint sharding and initialisation go by), incl. the MTP depths' experts."""
    from model.naming import is_expert_param

    cfg = tiny_cfg(mtp_depth=1)
    for module in (DeepSeekV3(cfg), MoE(cfg)):  # whole-model names and a bare layer's names
        by_module = {f"{mn}.{pn}" if mn else pn for mn, m in module.named_modules() if isinstance(m, Experts)
                     for pn, _ in m.named_parameters(recurse=False)}
        names = [n for n, _ in module.named_parameters()]
        assert by_module and any("shared" in n for n in names)
        assert {n for n in names if is_expert_param(n)} == by_module
    assert any(n.startswith("mtp.") and is_expert_param(n) for n, _ in DeepSeekV3(cfg).named_parameters())


def test_expert_shard_init_matches_full():
    cfg = tiny_cfg()
    full = model_of(cfg, seed=3)
    shard = DeepSeekV3(cfg, layer_ids=[1], has_embed=False, has_head=False)
    shard.layers["1"].ffn.experts = Experts(4, cfg.dim, cfg.moe_inter_dim, first_expert=4)
    shard.init_weights(3)
    for w in ("w1", "w2", "w3"):
        assert torch.equal(getattr(shard.layers["1"].ffn.experts, w), getattr(full.layers["1"].ffn.experts, w)[4:])



def test_model_built_with_expert_placement_is_the_sharded_model():
    """DeepSeekV3(cfg, experts=ExpertPlacement(ep_rank, ep, n_nodes)) holds exactly the expert
    slice shard_experts would cut from the full model, initialised to the same values, and routes
    over n_nodes node blocks: the trainer builds this instead of swapping after construction."""
    from model.moe import ExpertPlacement

    cfg = tiny_cfg(mtp_depth=1)
    full = model_of(cfg, seed=3)
    built = DeepSeekV3(cfg, experts=ExpertPlacement(ep_rank=1, ep=2, n_nodes=2))
    built.init_weights(3)
    n_local = cfg.n_routed_experts // 2
    moes = built.moe_layers()
    assert moes and any(n.startswith("mtp.") for n in moes)
    for name, moe in moes.items():
        assert (moe.experts.n_local, moe.experts.first_expert, moe.gate.n_nodes) == (n_local, n_local, 2)
        ref = full.get_submodule(name).experts
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(moe.experts, w), getattr(ref, w)[n_local:])
    dense = {n: p for n, p in built.named_parameters() if ".experts." not in n}
    assert all(torch.equal(p, full.get_parameter(n)) for n, p in dense.items())


# ------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------
def _moe(cfg, seed=0) -> MoE:
    model = model_of(cfg, seed)
    return model.layers["1"].ffn


def _per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    w, ids, _ = moe.gate(x)
    out = []
    for t in range(x.shape[0]):
        y = moe.shared_experts(x[t]) if moe.shared_experts is not None else torch.zeros_like(x[t])
        for j in range(ids.shape[1]):
            e = ids[t, j].item()
            ex = moe.experts
            y = y + w[t, j] * (ex.w2[e] @ (F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("skew", [False, True])
def test_local_dispatcher_dropless(skew):
    cfg = tiny_cfg()
    moe = _moe(cfg).eval()
    if skew:  # every token goes to expert 3 (and one other): no capacity, nothing dropped
        moe.gate.bias[3] = 100.0
    x = torch.randn(2, 24, cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = moe(x)
        _, ids, _ = moe.gate(x.view(-1, cfg.dim))
        if skew:
            assert (ids == 3).any(1).all()
        torch.testing.assert_close(y.view(-1, cfg.dim), _per_token_reference(moe, x.view(-1, cfg.dim)),
                                   atol=1e-6, rtol=1e-5)


def test_local_dispatcher_all_tokens_one_expert_top1():
    cfg = tiny_cfg(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1, n_shared_experts=0)
    moe = _moe(cfg).eval()
    moe.gate.bias[6] = 100.0
    x = torch.randn(40, cfg.dim, generator=torch.Generator().manual_seed(2))
    w, ids, _ = moe.gate(x)
    assert (ids == 6).all()
    y = LocalDispatcher()(x, ids, w, moe.experts)
    torch.testing.assert_close(y, _per_token_reference(moe, x), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# YaRN
# ------------------------------------------------------------------------------------------
def test_yarn_rope_and_softmax_scale():
    plain = tiny_cfg(max_seq_len=256, original_seq_len=256)
    same = tiny_cfg(max_seq_len=256, original_seq_len=256, rope_factor=4.0)  # no extension: YaRN off
    yarn = tiny_cfg(max_seq_len=256, original_seq_len=64, rope_factor=4.0, mscale=0.707)
    assert not same.yarn_enabled and yarn.yarn_enabled
    torch.testing.assert_close(rope_cache(same), rope_cache(plain))
    assert same.softmax_scale == plain.softmax_scale == plain.qk_head_dim ** -0.5
    c_plain, c_yarn = rope_cache(plain), rope_cache(yarn)
    assert c_yarn.shape == c_plain.shape == (256, plain.qk_rope_head_dim // 2, 2)
    assert not torch.allclose(c_yarn, c_plain)
    # highest frequency kept (extrapolated), lowest interpolated by the factor
    torch.testing.assert_close(c_yarn[:, 0], c_plain[:, 0])
    ang_plain = torch.atan2(c_plain[1, -1, 1], c_plain[1, -1, 0])
    ang_yarn = torch.atan2(c_yarn[1, -1, 1], c_yarn[1, -1, 0])
    torch.testing.assert_close(ang_yarn, ang_plain / 4.0)
    m = 0.1 * 0.707 * math.log(4.0) + 1.0
    assert yarn.softmax_scale == pytest.approx(yarn.qk_head_dim ** -0.5 * m * m)
    assert MLA(yarn).softmax_scale == pytest.approx(yarn.softmax_scale)
