"""Range and enum checks for every user-facing key, run on the composed config before any process
group exists (launch/errors.py precheck, and Trainer for in-process runs).

One table, RULES: full key → Rule(check, bad). `check(value)` returns what is wrong, or None; `bad`
lists values that must be refused, and tests/test_validation.py tries each of them through the
command-line path. That test walks every dataclass field of trainer.config.Config, so a new key
without a row here fails it. Keys whose type alone makes them valid (bools: Hydra refuses
anything else) carry `check=None` and a badly typed example. model.* ranges live with the model
(ModelConfig.validate); their rows only list examples. Cross-key rules (global_batch divisible by
dp × micro_batch, layouts, seq_len ≤ max_seq_len) stay with the code that needs them
(trainer.trainer.validate, parallel.topology).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Optional

from model.config import PRECISIONS, RECOMPUTE_MODES, ConfigError
from parallel.grads import GRAD_REDUCE
from parallel.pipeline import SCHEDULES as _SCHEDULES
from trainer.step_guard import ON_NONFINITE

Check = Optional[Callable[[Any], Optional[str]]]


@dataclass(frozen=True)
class Rule:
    check: Check
    bad: tuple  # values the check (or Hydra's typing) must refuse: the config-walk test uses them


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo, *bad) -> Rule:
    def check(v):
        return None if _number(v) and v >= lo else f"must be >= {lo}, got {v!r}"
    return Rule(check, bad or (lo - 1,))


def positive(*bad) -> Rule:
    def check(v):
        return None if _number(v) and v > 0 else f"must be > 0, got {v!r}"
    return Rule(check, bad or (0, -1))


def in_range(lo, hi, *, hi_open: bool = False, lo_open: bool = False) -> Rule:
    def check(v):
        ok = _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"
    return Rule(check, (lo - 1, hi + 1) if not hi_open else (lo - 1, hi))


def one_of(*choices) -> Rule:
    def check(v):
        return None if v in choices else f"expected {'|'.join(map(str, choices))}, got {v!r}"
    return Rule(check, ("nope",))


TYPED = Rule(None, ("maybe",))  # a bool: Hydra refuses anything that is not one


def model_field(*bad) -> Rule:
    """Checked by ModelConfig.validate (the model's own home for its ranges)."""
    return Rule(None, bad or (0,))


def _writable_dir(v) -> Optional[str]:
    """A folder we can create or write into (nothing is created here)."""
    if not isinstance(v, str) or not v.strip():
        return f"must be a folder path, got {v!r}"
    path = os.path.abspath(os.path.expanduser(v))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"cannot create {v!r}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot create or write {v!r}: {probe} is not writable"
    return None


def _optional(rule_check: Callable) -> Callable:
    return lambda v: None if v is None else rule_check(v)


def _resume(v) -> Optional[str]:
    if v in ("auto", "none"):
        return None
    if isinstance(v, str) and os.path.isdir(v):
        return None
    return f"expected auto|none|<a step_N folder>, got {v!r} (no such folder)"


def _data_path(v) -> Optional[str]:
    if v is None or str(v).strip() == "" or any(c in str(v) for c in "*?["):
        return None  # the default corpus, or a glob (expanded and checked by trainer.data)
    return None if os.path.exists(os.path.expanduser(str(v))) else f"no such file or directory: {v!r}"


def _layers_per_stage(v) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, int) and x >= 1 for x in v):
        return f"must be a list of layer counts >= 1 (or null), got {v!r}"
    return None


def _fractions(v) -> Optional[str]:
    if not isinstance(v, (list, tuple)) or not v or not all(_number(x) and 0 < x <= 1 for x in v):
        return f"must be a non-empty list of fractions in (0, 1], got {v!r}"
    return None


def _cost(v) -> Optional[str]:
    keys = {"f", "b", "w", "fb", "p2p"}
    if not isinstance(v, dict) or set(v) - keys:
        return f"must be a mapping with keys among {sorted(keys)}, got {v!r}"
    bad = {k: x for k, x in v.items() if not (_number(x) and x >= 0)}
    return f"costs must be numbers >= 0, got {bad}" if bad else None


def _hardware_profile(v) -> Optional[str]:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "hardware")
    names = sorted(f[:-5] for f in os.listdir(root) if f.endswith(".yaml"))
    return None if v in names else f"expected one of {'|'.join(names)} (configs/hardware/), got {v!r}"


def _parsed_by(parse: Callable, key: str) -> Callable:
    """A check that runs the parser the runtime uses (one home for the format) and returns its
    complaint without the key it already names."""
    def check(v):
        try:
            parse(v)
        except ConfigError as err:
            return str(err).removeprefix(f"{key}: ")
        return None
    return check


def _stages(key: str, positive_values: bool = False) -> Rule:
    """[[from_tokens, value], ...] (trainer/schedules.check_stages) with values >= 0 (> 0 for a
    learning rate)."""
    def check(v):
        from trainer.schedules import check_stages

        try:
            stages = check_stages(key, v)
        except (ConfigError, TypeError, ValueError) as err:
            return str(err).removeprefix(f"{key}: ")
        bad = [x for _, x in stages if (x <= 0 if positive_values else x < 0)]
        return f"values must be {'> 0' if positive_values else '>= 0'}, got {bad[0]}" if bad else None
    return Rule(check, ([[1.0, -0.1]], [[2.0, 0.1], [1.0, 0.1]]))


def _ranks(v) -> Optional[str]:
    ok = isinstance(v, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in v)
    return None if ok else f"must be a list of ranks >= 0, got {v!r}"


def _signals(v):
    from trainer.preemption import parse_signals

    return parse_signals(v)


def _faults(v):
    from trainer.faults import parse_fault

    return [parse_fault(spec) for spec in v]


def _nonempty_name(v) -> Optional[str]:
    return None if v is None or (isinstance(v, str) and v.strip()) else f"must be a non-empty string or null, got {v!r}"


RECOMPUTE = RECOMPUTE_MODES
SCHEDULES = tuple(_SCHEDULES)

RULES: dict[str, Rule] = {
    # model.* (ModelConfig.validate): an example each of what it refuses
    **{f"model.{k}": model_field() for k in (
        "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
        "n_activated_experts", "n_expert_groups", "n_limited_groups", "route_scale", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len",
        "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale", "norm_eps", "init_std")},
    **{f"model.{k}": model_field(-1) for k in (
        "n_dense_layers", "n_shared_experts", "balance_alpha", "bias_update_gamma", "max_nodes_per_token",
        "q_lora_rank", "mtp_depth", "mtp_lambda")},
    "model.score_func": model_field("relu"),
    # parallel.*
    "parallel.pp": at_least(1),
    "parallel.dp": at_least(0),
    "parallel.ep": at_least(1),
    "parallel.schedule": one_of(*SCHEDULES),
    "parallel.gpus_per_node": at_least(1),
    "parallel.expert_nodes": at_least(0),
    "parallel.layers_per_stage": Rule(_layers_per_stage, ([0, 3],)),
    "parallel.dispatch": one_of("auto", "flat", "two_hop"),
    "parallel.a2a_dtype": one_of("auto", "fp32", "bf16", "fp8"),
    "parallel.zero": TYPED,
    "parallel.grad_reduce": one_of(*GRAD_REDUCE),
    "parallel.timeout_s": positive(),
    # train.*
    "train.steps": at_least(0, -3),  # 0 only with train.tokens > 0 (trainer.validate)
    "train.global_batch": at_least(1, 0, -8),
    "train.micro_batch": at_least(1, 0),
    "train.microbatches": at_least(0),
    "train.seq_len": at_least(1, 0),
    "train.seed": at_least(0),
    "train.lr": positive(0, -1e-3),  # 0 trains nothing: refused rather than run without a word
    "train.min_lr": at_least(0, -1e-5),
    "train.warmup_steps": at_least(0),
    "train.decay_start": in_range(0, 1),
    "train.weight_decay": at_least(0, -0.1),
    "train.beta1": in_range(0, 1, hi_open=True),
    "train.beta2": in_range(0, 1, hi_open=True),
    "train.eps": positive(),
    "train.grad_clip": at_least(0, -1.0),
    "train.recompute": one_of(*RECOMPUTE),
    "train.ema_decay": in_range(0, 1, hi_open=True),
    "train.exit_after_steps": at_least(0),
    "train.eval_every": at_least(0),
    "train.eval_batches": at_least(1, 0),
    "train.threads": at_least(0),
    "train.on_nonfinite": one_of(*ON_NONFINITE),
    "train.tokens": at_least(0, -1.0),
    "train.lr_decay_start_tokens": at_least(0, -1.0),
    "train.lr_decay_end_tokens": at_least(0, -1.0),
    "train.lr_tail": _stages("train.lr_tail", positive_values=True),
    "train.batch_ramp_start": at_least(0),
    "train.batch_ramp_increment": at_least(0),
    "train.batch_ramp_tokens": at_least(0, -1.0),
    "train.bias_update_gamma": _stages("train.bias_update_gamma"),
    "train.mtp_lambda": _stages("train.mtp_lambda"),
    "optim.moment_dtype": one_of("auto", "fp32", "bf16"),
    # data.*
    "data.path": Rule(_data_path, ("/nonexistent/corpus.txt",)),
    "data.max_bytes": at_least(1, 0),
    "data.vocab_size": in_range(258, 2 ** 32, hi_open=True),
    "data.seed": at_least(0),
    "data.val_fraction": in_range(0, 1, hi_open=True),
    "data.cache_dir": Rule(_optional(_writable_dir), ("/proc/version/cache",)),
    "data.lock_timeout_s": positive(),
    # logging.*
    "logging.wandb": one_of("disabled", "offline", "online"),
    "logging.project": Rule(lambda v: None if isinstance(v, str) and v.strip() else f"must be a non-empty string, got {v!r}", (" ",)),
    "logging.name": Rule(_nonempty_name, (" ",)),
    "logging.progress": TYPED,
    "logging.peak_tflops": at_least(0),
    "logging.log_expert_load_per_layer": TYPED,
    # checkpoint.*
    "checkpoint.every": at_least(0),
    "checkpoint.resume": Rule(_resume, ("/nonexistent/step_3",)),
    "checkpoint.final": TYPED,
    "checkpoint.keep": at_least(0),
    "checkpoint.overwrite": TYPED,
    "checkpoint.allow_data_change": TYPED,
    "checkpoint.async_save": TYPED,
    "checkpoint.preemption_signals": Rule(_parsed_by(_signals, "checkpoint.preemption_signals"), (["SIGNOPE"],)),
    # run.*
    "run.dir": Rule(_writable_dir, ("/proc/version/run",)),
    # debug.*
    "debug.fail_at_step": at_least(-1),
    "debug.fail_rank": at_least(0),
    "debug.fail_once": TYPED,
    "debug.fail_mode": one_of("exit", "hang"),
    "debug.record_timeline": TYPED,
    "debug.inject_nonfinite_at_step": at_least(-1),
    "debug.inject_nonfinite_rank": at_least(0),
    "debug.dry_run": TYPED,
    "debug.dry_run_ranks": Rule(_ranks, ([-1],)),
    "debug.faults": Rule(_parsed_by(_faults, "debug.faults"), (["1:2"],)),
    # plan.* (python -m launch.plan; 0 / "" = take the value from train.* / precision)
    "plan.format": one_of("table", "json"),
    "plan.mode": one_of("auto", "model", "schedule", "full"),
    "plan.hardware": Rule(_hardware_profile, ("h900",)),
    "plan.achievable_fraction": in_range(0, 1, lo_open=True),
    "plan.cost": Rule(_cost, ({"f": -1.0},)),
    "plan.world_size": at_least(0),
    "plan.global_batch": at_least(0),
    "plan.micro_batch": at_least(0),
    "plan.seq_len": at_least(0),
    "plan.precision": one_of("", *PRECISIONS),
    "plan.recompute": one_of("", *RECOMPUTE),
    "plan.zero": TYPED,
    "plan.device": one_of("cuda", "cpu"),
    "plan.sensitivity": Rule(_fractions, ([0.5, 2.0],)),
    # launch.*
    "launch.nproc_per_node": at_least(1, 0),
    "launch.max_restarts": at_least(0),
    # top level
    "precision": one_of(*PRECISIONS),
}

# Fields of the structured config that are not user input.
INTERNAL = {"hardware"}  # filled from configs/hardware/<plan.hardware>.yaml by the planner


def schema_keys() -> list[str]:
    """Every leaf key of trainer.config.Config (model.* and data.* included), less INTERNAL."""
    from dataclasses import MISSING

    from model.config import ModelConfig
    from trainer.config import Config

    out = []
    for f in fields(Config):
        group = ModelConfig() if f.name == "model" else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if is_dataclass(group):
            out.extend(f"{f.name}.{g.name}" for g in fields(group))
        elif f.name not in INTERNAL:
            out.append(f.name)
    return out


def _get(cfg, key: str):
    from omegaconf import OmegaConf

    node = cfg
    for part in key.split("."):
        node = node[part]
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def validate_config(cfg) -> None:
    """Raise ConfigError("<key>: <what is wrong>") for the first invalid key of the composed config."""
    from model.config import ModelConfig
    from omegaconf import OmegaConf

    for key, rule in RULES.items():
        if rule.check is None or key.split(".")[0] not in cfg:
            continue
        problem = rule.check(_get(cfg, key))
        if problem:
            raise ConfigError(f"{key}: {problem}")
    ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
