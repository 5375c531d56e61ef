"""The planner (launch/plan.py + parallel/planner.py): parameter counts of the 671B model from the
meta-device modules, schedule figures from the simulator, the 2048-GPU layout against the paper,
invalid layouts, and per-rank bytes against real (toy) model shards and a real AdamW."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml

from model.config import ModelConfig
from parallel import planner as P
from parallel.pipeline import Costs, get_schedule, simulate

from tests.helpers import REPO_ROOT, compose

PAPER_TOTAL, PAPER_ACTIVATED, PAPER_MTP = 671e9, 37e9, 11.6e9


@pytest.fixture(scope="module")
def v3() -> ModelConfig:
    with open(os.path.join(REPO_ROOT, "configs", "model", "deepseek_v3_671b.yaml")) as f:
        return ModelConfig.from_dict(yaml.safe_load(f))


def run_plan(overrides: list[str], capsys) -> tuple[int, dict]:
    from launch.plan import run

    capsys.readouterr()
    code = run(compose(overrides + ["plan.format=json"]))
    return code, json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- model counts
def test_671b_counts(v3):
    """model/flops.count_params (the one count: the trainer's MFU, the planner, launch.plan) on the
    meta-device 671B model against the report's figures."""
    from model.flops import count_params

    c = count_params(v3)
    assert abs(c.total / PAPER_TOTAL - 1) < 0.005
    # The paper's "37B" is rounded to a whole billion: the activated count (excluding the
    # embedding lookup, which does no arithmetic) must round to it. (It is 36.63B: 1.0% from 37.0.)
    activated = c.activated - c.embedding
    assert abs(activated - PAPER_ACTIVATED) < 0.5e9
    assert round(activated / 1e9) == 37
    assert abs(c.mtp / PAPER_MTP - 1) < 0.005
    assert c.embedding == v3.vocab_size * v3.dim
    assert P.param_counts(v3) == {"params_total": c.total, "params_activated": activated,
                                  "params_activated_with_embedding": c.activated, "params_mtp": c.mtp,
                                  "params_embedding": c.embedding}


def test_model_mode_json(capsys):
    code, d = run_plan(["model=deepseek_v3_671b"], capsys)  # single process → plan.mode=auto is "model"
    assert code == 0
    assert {"params_total", "params_activated", "params_mtp"} <= set(d)
    assert "step_time_s" not in d
    assert abs(d["params_total"] / PAPER_TOTAL - 1) < 0.005


# ----------------------------------------------------------------------------- schedule mode
@pytest.mark.parametrize("schedule,pp,n", [("dualpipe", 8, 20), ("1f1b", 4, 8), ("dualpipev", 4, 8)])
def test_schedule_mode_equals_simulator(schedule, pp, n, capsys):
    code, d = run_plan(["plan.mode=schedule", f"parallel.schedule={schedule}", f"parallel.pp={pp}",
                        f"train.microbatches={n}", "plan.cost.f=1", "plan.cost.b=2", "plan.cost.w=1",
                        "plan.cost.fb=2.5"], capsys)
    assert code == 0
    ref = simulate(get_schedule(schedule, pp, n), Costs(f=1, b=2, w=1, fb=2.5))
    assert d["makespan"] == ref.makespan
    assert d["bubble"] == ref.bubble
    assert d["bubble_per_rank"] == list(ref.bubble_per_rank)
    assert d["peak_activations"] == ref.peak_activations
    if schedule == "1f1b":
        assert d["bubble_per_rank"] == [(pp - 1) * (1 + 2)] * pp
    if schedule == "dualpipe":
        assert d["bubble"] == (pp / 2 - 1) * (2.5 + 2 - 3 * 1)  # the paper's formula
        assert d["peak_activations"] == pp + 1


# ----------------------------------------------------------------------------- the 2048 layout
@pytest.fixture(scope="module")
def plan_2048(v3):
    lay = P.PlanLayout(pp=16, dp=128, ep=64, world_size=2048, schedule="dualpipe")
    return P.plan(v3, lay, P.Recipe(), P.load_hardware("h800"), 0.4, (0.3, 0.6))


def test_2048_layout_cli_matches_contract(capsys, plan_2048):
    code, d = run_plan(["model=deepseek_v3_671b", "parallel=deepseek_v3_2048", "plan.sensitivity=[]"], capsys)
    assert code == 0 and d["valid"], d["reasons"]
    for k in ("params_total", "params_activated", "params_mtp", "peak_memory_per_rank_gb",
              "bubble_fraction", "step_time_s", "gpu_hours_per_trillion_tokens"):
        assert isinstance(d[k], (int, float)), k
    # the yaml pins the paper's shape; default fraction (PlanConfig) is 0.4 like the fixture
    assert d["layout"]["layers_per_stage"] == plan_2048["layout"]["layers_per_stage"]
    assert d["microbatches"] == 120 and d["tokens_per_step"] == 15360 * 4096
    assert d["gpu_hours_per_trillion_tokens"] == pytest.approx(plan_2048["gpu_hours_per_trillion_tokens"])


def test_2048_layout_fits_and_matches_paper(plan_2048):
    r = plan_2048
    assert r["valid"], r["reasons"]
    assert r["peak_memory_per_rank_gb"] < 80
    assert sum(r["layout"]["layers_per_stage"]) == 61
    assert abs(r["gpu_hours_per_trillion_tokens"] / P.PAPER_GPU_HOURS_PER_T - 1) < 0.20
    assert 0 < r["bubble_fraction"] < 0.15
    # DualPipe: every rank holds two stages, rank 0 the first (embedding) and the last (head + MTP)
    ranks = r["per_rank"]
    assert all(len(x["stages"]) == 2 for x in ranks) and ranks[0]["stages"] == [0, 15]
    assert "embed" in ranks[0]["layers"] and "head" in ranks[0]["layers"] and "mtp" in ranks[0]["layers"]
    # without recompute the same layout does not fit; full recompute needs less
    peak = ranks[r["peak_memory_rank"]]["total_gb_by_recompute"]
    assert peak["none"] > 80 > peak["norm_and_up_proj"] > peak["full"]
    # slower kernels → more GPU-hours
    s = {x["achievable_fraction"]: x["gpu_hours_per_trillion_tokens"] for x in r["sensitivity"]}
    assert s[0.3] > r["gpu_hours_per_trillion_tokens"] > s[0.6]
    # the fit assumes the paper's kernels; this runtime's modules (unfused norms, SwiGLU operands and
    # the experts' inputs kept) would not fit, and the plan says so next to the figure
    assert all(x["total_gb_runtime_modules"] > x["total_gb"] for x in ranks)
    assert ranks[r["peak_memory_rank"]]["total_gb_runtime_modules"] > 80


def test_cpu_plan_has_no_runtime_modules_note():
    """plan.device=cpu already plans this runtime's modules: no second figure."""
    lay = P.PlanLayout(pp=1, dp=2, ep=2, world_size=2)
    r = P.plan(_toy_cfg(), lay, P.Recipe(precision="bf16", seq_len=32, micro_batch=2, global_batch=8, device="cpu"),
               sensitivity=())
    assert all(x["total_gb_runtime_modules"] is None for x in r["per_rank"])


def test_memory_breakdown_arithmetic(v3, plan_2048):
    """ZeRO-1 numbers of one rank from first principles (BF16 weights, FP32 grads, FP32 master +
    BF16 moments sharded over DP for non-expert and over expert-DP for expert parameters)."""
    lay = P.PlanLayout(pp=16, dp=128, ep=64, world_size=2048, schedule="dualpipe",
                       layers_per_stage=tuple(plan_2048["layout"]["layers_per_stage"]))
    # the last rank of its DP and expert-DP groups holds the fullest share, ceil(n / group)
    rb = P.predict_rank_bytes(v3, lay, rank=5 * 128 + 127, precision="fp8", zero=True, count_step=False)
    assert rb["stages"] == [5, 10]
    assert rb["param_bytes"] == 2 * rb["param_count"]
    assert rb["grad_bytes"] == 4 * rb["param_count"]
    opt = (-(-rb["dense_param_count"] // 128) + -(-rb["expert_param_count"] // 2)) * 8
    assert rb["optimizer_state_bytes"] == opt
    x = plan_2048["per_rank"][5]
    assert x["params_gb"] == pytest.approx(rb["param_bytes"] / 1e9)
    assert x["optimizer_gb"] == pytest.approx(rb["optimizer_state_bytes"] / 1e9)
    # the JSON's byte fields are the same numbers (the fullest rank of the DP group)
    assert (x["param_bytes"], x["grad_bytes"], x["optimizer_state_bytes"]) == (
        rb["param_bytes"], rb["grad_bytes"], rb["optimizer_state_bytes"])


# ----------------------------------------------------------------------------- invalid layouts
@pytest.mark.parametrize("overrides,needle", [
    (["plan.world_size=1024"], "world size 1024"),
    (["parallel.ep=48"], "does not divide parallel.dp=128"),
    (["plan.micro_batch=2"], "memory: pipeline rank"),
    (["plan.recompute=none"], "HBM 80 GB"),
])
def test_invalid_layouts_are_flagged(overrides, needle, capsys):
    code, d = run_plan(["model=deepseek_v3_671b", "parallel=deepseek_v3_2048", "plan.sensitivity=[]"]
                       + overrides, capsys)
    assert code == 1
    assert d["valid"] is False
    assert any(needle in r for r in d["reasons"]), d["reasons"]
    if "parallel.ep=48" in overrides:
        assert any("n_routed_experts=256 not divisible by parallel.ep=48" in r for r in d["reasons"])


def test_invalid_schedule_is_flagged_in_table(capsys):
    from launch.plan import run

    code = run(compose(["model=tiny", "parallel.pp=4", "parallel.schedule=dualpipe", "plan.world_size=4",
                        "train.seq_len=32", "train.global_batch=4", "train.micro_batch=1"]))
    out = capsys.readouterr().out
    assert code == 1
    assert "INVALID LAYOUT" in out
    assert "micro-batches" in out  # DualPipe needs >= 2·pp
    assert "n_layers=3" in out  # 4 stages for 3 layers


def test_cli_exit_codes():
    """python -m launch.plan: exit 1 and the reasons for an invalid layout (table and JSON)."""
    base = [sys.executable, "-m", "launch.plan", "model=deepseek_v3_671b", "parallel=deepseek_v3_2048",
            "plan.world_size=1000", "plan.sensitivity=[]"]
    out = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "INVALID LAYOUT" in out.stdout and "world size 1000" in out.stdout
    assert "peak memory per rank" in out.stdout and "sensitivity" not in out.stdout


# ----------------------------------------------------------------------------- toy shards
def _toy_cfg() -> ModelConfig:
    from omegaconf import OmegaConf

    cfg = compose(["model=toy"])
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def _built_shard(cfg: ModelConfig, stages: list[list[int]], n_stages: int, ep: int, ep_rank: int):
    """The real modules of one rank: its stages built with DeepSeekV3(layer_ids, has_embed,
    has_head), experts sliced by parallel.dispatch.shard_experts. Parameters shared by the rank's
    stages (the embedding on DualPipe rank 0) are counted once, as the design holds them."""
    from model.transformer import DeepSeekV3
    from parallel.dispatch import shard_experts

    params = {}
    for layer_ids, stage in stages:
        m = DeepSeekV3(cfg, layer_ids=layer_ids, has_embed=stage == 0, has_head=stage == n_stages - 1)
        if ep > 1:  # no process group here: a stand-in dispatcher that only states the EP size
            shard_experts(m, ep_rank, ep, None, dispatcher=types.SimpleNamespace(ep=ep))
        for name, p in m.named_parameters():
            params[name] = p
    return list(params.values())


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_toy_predict_rank_bytes_equals_real_shard_and_adamw(ep):
    cfg = _toy_cfg()
    torch.manual_seed(0)
    params = _built_shard(cfg, [(range(cfg.n_layers), 0)], 1, ep, ep_rank=ep - 1)
    pred = P.predict_rank_bytes(cfg, {"pp": 1, "dp": ep, "ep": ep}, rank=ep - 1, zero=False)
    real = sum(p.numel() * p.element_size() for p in params)
    assert pred["param_bytes"] == real
    assert pred["param_count"] == sum(p.numel() for p in params)
    # a real torch AdamW after one step: exp_avg + exp_avg_sq (fp32) + a fp32 'step' per tensor
    from parallel.grads import optimizer_state_bytes

    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert pred["optimizer_state_bytes"] == optimizer_state_bytes(opt)
    assert P.predict_rank_bytes(cfg, {"pp": 1, "dp": ep, "ep": ep}, zero=False, count_step=False)[
        "optimizer_state_bytes"] == 8 * real // 4
    # ZeRO-1: the optimizer state shard shrinks with dp, the weights do not
    z = P.predict_rank_bytes(cfg, {"pp": 1, "dp": 2 * ep, "ep": ep}, rank=2 * ep - 1, zero=True, count_step=False)
    assert z["param_bytes"] == real
    assert z["optimizer_state_bytes"] == 8 * (-(-z["dense_param_count"] // (2 * ep)) + -(-z["expert_param_count"] // 2))


def test_default_split_beats_stage_balanced_under_dualpipe(v3, plan_2048):
    """The split training builds (stages.split_layers → planner.split_layers) balances what a
    DualPipe rank runs (stage r + stage pp-1-r): faster than balancing stages one by one (the
    former runtime split, 4 layers per stage and 1 on the head stage), and still fits."""
    assert plan_2048["layout"]["layers_per_stage"] == [1, 4, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 5, 1]
    lay = P.PlanLayout(pp=16, dp=128, ep=64, world_size=2048, schedule="dualpipe",
                       layers_per_stage=(4,) * 15 + (1,))
    r = P.plan(v3, lay, P.Recipe(), P.load_hardware("h800"), 0.4, ())
    assert r["valid"], r["reasons"]
    assert plan_2048["step_time_s"] < 0.9 * r["step_time_s"]
    assert plan_2048["peak_memory_per_rank_gb"] < 80


# ----------------------------------------------------------------------------- pieces
def test_hardware_profiles_load():
    for name in ("h800", "h100", "h200", "b200"):
        hw = P.load_hardware(name)
        assert hw.fp8_tflops > hw.bf16_tflops > 0 and hw.hbm_gb >= 80
    assert P.load_hardware("h800").nvlink_gbps == 160 and P.load_hardware("h800").ib_gbps == 50
    with pytest.raises(P.PlanError, match="h900"):
        P.load_hardware("h900")


def test_activation_table_recompute_drops_norms_and_up_proj(v3):
    none, _ = P.part_activation_bytes(v3, "moe", "fp8", "none")
    rec, transient = P.part_activation_bytes(v3, "moe", "fp8", "norm_and_up_proj")
    full, _ = P.part_activation_bytes(v3, "moe", "fp8", "full")
    assert none > rec > full == 7168 * 2
    assert none - rec == transient
    rows = P.activation_table(v3, "fp8")
    dropped = {r["tensor"] for r in rows if r["layer"] == "moe" and r["kept_none"] and not r["kept_norm_and_up_proj"]}
    assert any("q_norm output" in t for t in dropped) and any("wkv_b output" in t for t in dropped)
    # the same bytes the table lists
    assert sum(r["bytes"] for r in rows if r["layer"] == "moe" and r["kept_norm_and_up_proj"]) == rec


def test_model_flops_by_hand():
    """model/flops.py (the trainer's MFU and the planner's stage costs) on the tiny model against a
    count by hand from its dimensions: 2 FLOPs per GEMM weight per token (routed experts: k of E;
    the head once per prediction depth), the attention core n_heads·(d_qk + d_v)·T per block; the
    FP8 share is what enable_fp8 switches (all but router and head)."""
    from model.flops import count_params, model_parts, train_flops_per_token
    from tests.helpers import tiny_model_cfg

    c = tiny_model_cfg()
    d, h, qk, v = c.dim, c.n_heads, c.qk_head_dim, c.v_head_dim
    attn = (d * c.q_lora_rank + c.q_lora_rank * h * qk + d * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + v) + h * v * d)
    up = c.q_lora_rank * h * qk + c.kv_lora_rank * h * (c.qk_nope_head_dim + v)
    mlp = 3 * d * c.inter_dim
    moe_lp = 3 * d * c.moe_inter_dim * (c.n_shared_experts + c.n_activated_experts)
    router, head = c.n_routed_experts * d, c.vocab_size * d * (1 + c.mtp_depth)
    parts = {p.name: p for p in model_parts(c)}
    assert (parts["layer.0"].kind, parts["layer.1"].kind, parts["mtp.0"].kind) == ("dense", "moe", "mtp")
    assert (parts["layer.0"].gemm_lp, parts["layer.0"].gemm_hp) == (2 * (attn + mlp), 0)
    assert (parts["layer.1"].gemm_lp, parts["layer.1"].gemm_hp) == (2 * (attn + moe_lp), 2 * router)
    assert (parts["mtp.0"].gemm_lp, parts["mtp.0"].gemm_hp) == (2 * (2 * d * d + attn + moe_lp), 2 * router)
    assert (parts["head"].gemm_lp, parts["head"].gemm_hp) == (0, 2 * head)
    assert parts["layer.1"].up_proj == 2 * up and parts["embed"].gemm_lp + parts["embed"].gemm_hp == 0
    assert parts["layer.1"].expert_params == 3 * d * c.moe_inter_dim * c.n_routed_experts
    # layer 0 dense, layers 1-2 MoE, one MTP depth (eh_proj + an MoE block): four attention cores
    fwd = 2 * (4 * attn + mlp + 3 * (moe_lp + router) + 2 * d * d + head) + 4 * h * (qk + v) * 4096
    assert train_flops_per_token(c, 4096) == 3 * fwd
    n = count_params(c)
    assert n.total == sum(p.params for name, p in parts.items() if not name.startswith("mtp"))
    assert n.activated == n.total - n.routed_expert + 2 * 3 * d * c.moe_inter_dim * c.n_activated_experts


def test_toy_cli_full_mode_reports_rank_bytes(capsys):
    code, d = run_plan(["model=toy", "parallel.pp=1", "parallel.ep=2", "plan.world_size=2", "plan.zero=false",
                        "plan.sensitivity=[]"], capsys)
    assert code == 0 and d["valid"], d["reasons"]
    assert d["layout"]["dp"] == 2 and d["layout"]["ep"] == 2
    pred = P.predict_rank_bytes(_toy_cfg(), {"pp": 1, "dp": 2, "ep": 2}, zero=False, count_step=False)
    assert d["per_rank"][0]["params_gb"] * 1e9 == pytest.approx(pred["param_bytes"])
    assert d["per_rank"][0]["optimizer_gb"] * 1e9 == pytest.approx(pred["optimizer_state_bytes"])
