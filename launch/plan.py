"""Planner entry point (Hydra, same configs as training; nothing is allocated, no process group):

    python -m launch.plan model=deepseek_v3_671b                        # parameter counts
    python -m launch.plan model=deepseek_v3_671b parallel=deepseek_v3_2048 [plan.format=json]
    python -m launch.plan plan.mode=schedule parallel.schedule=dualpipe parallel.pp=8 \\
        train.microbatches=20 plan.cost.f=1 plan.cost.b=2 plan.cost.w=1 plan.cost.fb=2.5
    python -m launch.plan model=toy parallel.ep=2 plan.world_size=2 plan.zero=false

plan.mode: auto (default: full when the layout has more than one rank, else model) | model |
schedule | full. The training shape comes from plan.{global_batch,micro_batch,seq_len,precision,
recompute} when set, else from train.* / precision; the hardware from configs/hardware/
<plan.hardware>.yaml. Exit status: 0 = valid plan, 1 = the layout is invalid or does not fit
(the reasons are printed), 2 = a configuration error.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.errors import exit_with, user_error_types
from model.config import ModelConfig
from parallel import planner
from parallel.planner import (PAPER_GPU_HOURS_PER_T, Hardware, PlanError, PlanLayout, Recipe, activation_table,
                              load_hardware)
from trainer.config import register_configs
from trainer.schedules import Schedules

register_configs()


def _model_cfg(cfg: DictConfig):
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def _layout(cfg: DictConfig):
    p = cfg.parallel
    pp = int(p.pp)
    world = int(cfg.plan.world_size)
    dp = int(p.dp) or (max(world // pp, 1) if world else 1)
    lps = p.get("layers_per_stage")
    return PlanLayout(pp=pp, dp=dp, ep=int(p.ep), world_size=world or pp * dp,
                      gpus_per_node=int(p.gpus_per_node), schedule=str(p.schedule),
                      layers_per_stage=tuple(int(x) for x in lps) if lps else None)


def _recipe(cfg: DictConfig):
    pl, t = cfg.plan, cfg.train
    return Recipe(precision=str(pl.precision or cfg.precision), recompute=str(pl.recompute or t.recompute),
                  zero=bool(pl.zero), seq_len=int(pl.seq_len or t.seq_len),
                  micro_batch=int(pl.micro_batch or t.micro_batch),
                  global_batch=int(pl.global_batch or t.global_batch),
                  microbatches=int(t.get("microbatches", 0) or 0), device=str(pl.device))


def _hardware(cfg: DictConfig):
    if cfg.get("hardware"):
        return Hardware.from_dict(OmegaConf.to_container(cfg.hardware, resolve=True))
    return load_hardware(str(cfg.plan.hardware))


def _emit(obj: dict, as_json: bool, table: str) -> None:
    if as_json:
        print(json.dumps(obj, default=float))
    else:
        print(table)


# ------------------------------------------------------------------------------ readable output
def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _counts_table(c: dict) -> str:
    return (f"parameters: {_b(c['params_total'])} total (main model, excl. MTP), "
            f"{_b(c['params_activated'])} activated per token excl. the embedding lookup "
            f"({_b(c['params_activated_with_embedding'])} with it), MTP {_b(c['params_mtp'])} unique")


def _full_table(r: dict, cfg_model) -> str:
    lines = [_counts_table(r)]
    if "per_rank" not in r:  # stopped before the memory model (bad schedule / stage split)
        lines.append("INVALID LAYOUT:")
        lines += [f"  - {x}" for x in r["reasons"]]
        return "\n".join(lines)
    lay, rec = r["layout"], r["recipe"]
    nodes = -(-lay["ep"] // lay["gpus_per_node"])
    lines += [
        f"layout: pp {lay['pp']} × dp {lay['dp']} = {lay['pp'] * lay['dp']} ranks (world {lay['world_size']}), "
        f"ep {lay['ep']} ({nodes} node(s) per EP group), expert-DP {lay['edp']}, schedule {lay['schedule']}, "
        f"{lay['n_stages']} stages, layers per stage {lay['layers_per_stage']}",
        f"recipe: {rec['precision']}, recompute {rec['recompute']}, ZeRO-1 {'on' if rec['zero'] else 'off'}, "
        f"seq {rec['seq_len']}, {rec['micro_batch']} seq/micro-batch, {r['microbatches']} micro-batches per "
        f"rank per step, {r['tokens_per_step']:,} tokens/step; hardware {r['hardware']}",
        "",
        f"{'rank':>4}  {'stages':<7} {'layers':<30} {'params':>8} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'activ':>8} {'live':>8} {'total':>8}",
    ]
    big = r["peak_memory_per_rank_gb"] >= 1.0
    mem_u, mem_s = ("GB", 1.0) if big else ("MB", 1e3)  # the toy models fit in megabytes
    par_u, par_s = ("(B)", 1.0) if r["params_total"] >= 1e9 else ("(M)", 1e3)
    lines.append(f"{'':>4}  {'':<7} {'':<30} {par_u:>8} {mem_u:>8} {mem_u:>8} {mem_u:>8} {mem_u:>8} "
                 f"{'mb':>8} {mem_u:>8}")
    keys = ("params_b", "params_gb", "grads_gb", "optimizer_gb", "activations_gb")
    tot = {k: 0.0 for k in keys + ("total_gb",)}

    def row(head: str, x: dict, live: str) -> str:
        vals = [x["params_b"] * par_s] + [x[k] * mem_s for k in keys[1:]]
        return (head + " ".join(f"{v:>8.2f}" for v in vals) + f" {live:>8} {x['total_gb'] * mem_s:>8.2f}")

    for x in r["per_rank"]:
        for k in tot:
            tot[k] += x[k]
        live = "+".join(str(v) for v in x["live_microbatches"])
        lines.append(row(f"{x['rank']:>4}  {','.join(map(str, x['stages'])):<7} {x['layers'][:30]:<30} ", x, live))
    lines.append(row(f"{'sum':>4}  {'':<7} {'(the pp ranks of one pipeline)':<30} ", tot, ""))
    peak = r["per_rank"][r["peak_memory_rank"]]
    alt = ", ".join(f"{m} {v * mem_s:.1f} {mem_u}" for m, v in peak["total_gb_by_recompute"].items())
    lines += [f"peak memory per rank: {r['peak_memory_per_rank_gb'] * mem_s:.1f} {mem_u} (pipeline rank "
              f"{r['peak_memory_rank']}; {r['hardware']} HBM {r['hbm_gb']:g} GB); that rank by recompute mode: {alt}",
              "(params: the stages a rank holds (DualPipe: both), routed experts / ep; weights, grads, optimizer "
              "per the precision; activ: in-flight micro-batches (live, per chunk) + one layer's recompute)"]
    if peak.get("total_gb_runtime_modules") is not None:
        lines.append(f"activations above are the paper's kernels (fused RMSNorm and attention, FP8-cached "
                     f"SwiGLU inputs), not yet this runtime's modules: with those, pipeline rank "
                     f"{r['peak_memory_rank']} would need {peak['total_gb_runtime_modules'] * mem_s:.1f} {mem_u} "
                     f"(plan.device=cpu plans the modules as they run on CPU)")
    lines.append("")
    apt = r["activation_bytes_per_token"]
    lines.append("activation bytes kept per token per layer: " + "; ".join(
        f"{m}: MoE {apt[m]['moe'] / 1024:.0f} KiB, dense {apt[m]['dense'] / 1024:.0f} KiB, "
        f"head {apt[m]['head'] / 1024:.0f} KiB" for m in apt))
    kept_key = "kept_none" if rec["recompute"] == "none" else "kept_norm_and_up_proj"
    rows = [x for x in activation_table(cfg_model, rec["precision"]) if x["layer"] == "moe"]
    lines.append(f"  MoE layer, {rec['precision']}, recompute {rec['recompute']} (bytes/token; '-' = recomputed):")
    for x in rows:
        mark = f"{x['bytes']:>9.0f}" if (x[kept_key] if rec["recompute"] != "full" else x["tensor"].startswith("block input")) else f"{'-':>9}"
        lines.append(f"    {mark}  {x['tensor']}")
    lines.append("")
    if r.get("step_time_s") is not None:
        c = r["costs_ms"]
        hours = r["gpu_hours_per_trillion_tokens"]
        lines += [
            f"time at achievable fraction {r['achievable_fraction']:.2f}: per micro-batch chunk F {c['f']:.1f} ms, "
            f"B {c['b']:.1f} ms (W {c['w']:.1f} ms), F&B {c['fb']:.1f} ms, p2p {c['p2p']:.2f} ms",
            f"step {r['step_time_s']:.2f} s = pipeline {r['pipeline_s']:.2f} s (bubble {100 * r['bubble_fraction']:.1f}% "
            f"of GPU time) + DP sync {r['dp_sync_s']:.2f} s + optimizer {r['optimizer_s']:.3f} s; "
            f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% of the dense "
            f"{'TF32' if rec['precision'] == 'fp32' else 'BF16'} peak",
            f"GPU-hours per trillion tokens: {hours / 1e3:.1f}K"
            + (f" (paper: {PAPER_GPU_HOURS_PER_T / 1e3:.0f}K H800 for DeepSeek-V3, "
               f"{100 * (hours / PAPER_GPU_HOURS_PER_T - 1):+.1f}%)" if r["params_total"] > 1e11 else ""),
        ]
        if r["sensitivity"]:
            lines += ["", "sensitivity to plan.achievable_fraction:",
                      f"  {'fraction':>8} {'step s':>8} {'bubble':>7} {'MFU':>7} {'GPU-h/T':>9} {'vs 180K':>8}"]
        for s in r["sensitivity"]:
            h = s["gpu_hours_per_trillion_tokens"]
            lines.append(f"  {s['achievable_fraction']:>8.2f} {s['step_time_s']:>8.2f} "
                         f"{100 * s['bubble_fraction']:>6.1f}% {100 * s['mfu']:>6.1f}% {h / 1e3:>8.1f}K "
                         f"{100 * (h / PAPER_GPU_HOURS_PER_T - 1):>+7.1f}%")
    else:
        lines.append("time: not modelled (no valid schedule for this layout)")
    lines.append("")
    if r["valid"]:
        lines.append("valid: yes")
    else:
        lines.append("INVALID LAYOUT:")
        lines += [f"  - {x}" for x in r["reasons"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ modes
def _n_micro(cfg: DictConfig, dp: int) -> int:
    t, pl = cfg.train, cfg.plan
    if t.get("microbatches"):
        return int(t.microbatches)
    gb = int(pl.global_batch or t.global_batch)
    mb = int(pl.micro_batch or t.micro_batch)
    return gb // max(dp * mb, 1)


def run(cfg: DictConfig) -> int:
    mode, as_json = str(cfg.plan.mode), str(cfg.plan.format) == "json"
    if str(cfg.plan.format) not in ("table", "json"):
        raise planner.PlanError(f"plan.format: expected table|json, got {cfg.plan.format!r}")
    if mode not in ("auto", "model", "schedule", "full"):
        raise planner.PlanError(f"plan.mode: expected auto|model|schedule|full, got {mode!r}")

    if mode == "schedule":
        lay = _layout(cfg)
        n = _n_micro(cfg, lay.dp)
        costs = OmegaConf.to_container(cfg.plan.cost, resolve=True)
        r = planner.schedule_figures(lay.schedule, lay.pp, n, costs)
        table = (f"{r['schedule']} pp={r['pp']} micro-batches={r['microbatches']} costs={r['costs']}\n"
                 f"makespan {r['makespan']:g}, bubble {r['bubble']:g} (max over ranks), "
                 f"peak activations {r['peak_activations']} stage-micro-batches\n"
                 f"bubble per rank {[round(x, 6) for x in r['bubble_per_rank']]}\n"
                 f"peak activations per rank {r['peak_activations_per_rank']}")
        _emit(r, as_json, table)
        return 0

    model_cfg = _model_cfg(cfg)
    lay = _layout(cfg)
    if mode == "auto":
        mode = "full" if (lay.world_size > 1 or lay.pp > 1 or lay.ep > 1) else "model"
    if mode == "model":
        c = planner.param_counts(model_cfg)
        _emit(c, as_json, _counts_table(c))
        return 0

    recipe, hw = _recipe(cfg), _hardware(cfg)
    r = planner.plan(model_cfg, lay, recipe, hw, float(cfg.plan.achievable_fraction),
                     [float(x) for x in cfg.plan.sensitivity])
    table = _full_table(r, model_cfg)
    if r["valid"] and float(cfg.train.tokens) > 0:
        r.update(recipe_cost(cfg, model_cfg, lay, recipe, hw))
        table += "\n" + _recipe_table(r)
    _emit(r, as_json, table)
    return 0 if r["valid"] else 1


# The DeepSeek-V3 report's cost (H800 GPU-hours; $2 per GPU-hour).
PAPER_PRETRAIN_GPU_HOURS = 2_664_000
PAPER_TOTAL_GPU_HOURS = 2_788_000  # + 119K context extension + 5K post-training
USD_PER_GPU_HOUR = 2.0


def recipe_cost(cfg: DictConfig, model_cfg, lay, recipe, hw) -> dict:
    """The whole pre-training's cost: the planned step time at every global batch the schedule
    uses (trainer/schedules.py: the batch ramp, then the final batch), times the steps run at it,
    until train.tokens are consumed."""
    t = cfg.train
    unit = lay.dp * recipe.micro_batch * (2 if lay.pp > 1 and lay.schedule != "1f1b" else 1)
    batch = Schedules.from_config(t, 1, model_cfg, unit).batch
    seconds, tokens, phases = 0.0, 0.0, []
    for gb, steps in batch.steps_per_batch(float(t.tokens), recipe.seq_len).items():
        r = planner.plan(model_cfg, lay, replace(recipe, global_batch=gb, microbatches=0), hw,
                         float(cfg.plan.achievable_fraction), [])
        if r["step_time_s"] is None:
            raise planner.PlanError(f"train.batch_ramp_start: global batch {gb} has no valid schedule: {r['reasons']}")
        seconds += steps * r["step_time_s"]
        tokens += steps * gb * recipe.seq_len
        phases.append({"global_batch": gb, "steps": steps, "step_time_s": r["step_time_s"]})
    gpu_hours = seconds * lay.world_size / 3600
    return {"total_steps": sum(p["steps"] for p in phases), "total_tokens": tokens,
            "total_gpu_hours": gpu_hours, "total_days": seconds / 86400,
            "total_cost_usd": gpu_hours * USD_PER_GPU_HOUR, "recipe_phases": phases,
            "paper_pretrain_gpu_hours": PAPER_PRETRAIN_GPU_HOURS}


def _recipe_table(r: dict) -> str:
    ph = r["recipe_phases"]
    ramp = [p for p in ph if p is not ph[-1]]
    ramp_h = sum(p["steps"] * p["step_time_s"] for p in ramp) / 3600
    return "\n".join([
        f"whole recipe ({r['total_tokens'] / 1e12:.2f}T tokens, {r['total_steps']:,} steps; batch ramp "
        f"{ph[0]['global_batch']} → {ph[-1]['global_batch']} over {sum(p['steps'] for p in ramp):,} steps, "
        f"{ramp_h:.1f} h of wall time):",
        f"  {r['total_gpu_hours'] / 1e3:,.0f}K GPU-hours ({100 * (r['total_gpu_hours'] / PAPER_PRETRAIN_GPU_HOURS - 1):+.1f}% "
        f"vs the report's {PAPER_PRETRAIN_GPU_HOURS / 1e3:,.0f}K pre-training; {PAPER_TOTAL_GPU_HOURS / 1e3:,.0f}K in all "
        f"with 119K context extension and 5K post-training), {r['total_days']:.1f} days on {r['layout']['world_size']} "
        f"GPUs, ${r['total_cost_usd'] / 1e6:.3f}M at ${USD_PER_GPU_HOUR:g}/GPU-hour (report: "
        f"${PAPER_TOTAL_GPU_HOURS * USD_PER_GPU_HOUR / 1e6:.3f}M in all)"])


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        code = run(cfg)
    except (PlanError, *user_error_types()) as err:
        exit_with(err)
        return
    sys.stdout.flush()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
