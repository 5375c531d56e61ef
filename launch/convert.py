"""Hugging Face interop: read a released DeepSeek-V3 folder, write one that transformers loads.

    from launch.convert import from_hf, to_hf
    cfg, sd = from_hf("DeepSeek-V3/")          # config.json + *.safetensors (FP8 blocks dequantised)
    model = DeepSeekV3(cfg); model.load_state_dict(sd)
    to_hf(cfg, model.state_dict(), "out/")       # config.json + model*.safetensors (+ index)

    python -m launch.convert import HF_DIR OUR_DIR   # → OUR_DIR/model.safetensors + OUR_DIR/model.yaml
    python -m launch.convert export OUR_DIR HF_DIR   # the reverse
    python -m launch.convert export RUN_DIR HF_DIR   # a training run's newest checkpoint (or a step_N folder)

Names follow the release: per-expert `model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight`
(stacked here into `layers.N.ffn.experts.{w1,w3,w2}[J]`), and the MTP depth k stored as the extra
decoder layer `model.layers.{n_layers+k}.*` with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`
and copies of the shared embedding/head (read: ignored; written: copied, like the release).
Semantics follow DeepSeek's reference code; config.json fields that would make transformers (or
the release) compute something our model does not are refused with a ConvertError.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import ConfigError, ModelConfig
from model.transformer import DeepSeekV3
from trainer import checkpoint as ckpt

FP8_BLOCK = 128
DEFAULT_SHARD_BYTES = 5 * 10**9


class ConvertError(ValueError):
    """A checkpoint or config cannot be converted; the message says which key or tensor."""


class UnknownTensorError(ConvertError):
    """The checkpoint holds tensor names this converter does not know."""


class MissingTensorError(ConvertError):
    """The checkpoint lacks tensors the configured model needs."""


# ----------------------------------------------------------------------------------------------
# config.json  <->  ModelConfig
# ----------------------------------------------------------------------------------------------
# Our fields that HF's config has no key for; kept in config.json under this key for round trips.
EXTRAS_KEY = "dsv3_train"
_EXTRA_FIELDS = ("balance_alpha", "bias_update_gamma", "max_nodes_per_token", "mtp_lambda",
                 "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale")


def _num(x):
    """Ints stay ints (beta_fast 32.0 → 32) so the config reads back the same."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def config_from_hf(hf: dict) -> ModelConfig:
    """Map a DeepSeek-V3 config.json (release or transformers format) onto ModelConfig."""

    def get(key, default=None, required=True):
        if key in hf and hf[key] is not None:
            return hf[key]
        if required and default is None:
            raise ConvertError(f"config.json: missing key {key!r}")
        return default

    if get("norm_topk_prob", True) is not True:
        raise ConvertError("config.json: norm_topk_prob must be true (our router always normalises the top-k "
                           f"sigmoid gates), got {hf['norm_topk_prob']!r}")
    for key, want in (("hidden_act", "silu"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1),
                      ("attention_bias", False), ("tie_word_embeddings", False)):
        if key in hf and hf[key] is not None and hf[key] != want:
            raise ConvertError(f"config.json: {key}={hf[key]!r} is not supported (DeepSeek-V3 uses {want!r})")
    if hf.get("rope_interleave", True) is not True:
        raise ConvertError("config.json: rope_interleave=false (rotary dims stored half-split) is not supported; "
                           "DeepSeek-V3 rotates consecutive pairs")
    n_heads = get("num_attention_heads")
    if get("num_key_value_heads", n_heads) != n_heads:
        raise ConvertError(f"config.json: num_key_value_heads={hf['num_key_value_heads']} must equal "
                           f"num_attention_heads={n_heads} (MLA)")
    n_routed = get("n_routed_experts")
    d = dict(
        vocab_size=get("vocab_size"),
        dim=get("hidden_size"),
        inter_dim=get("intermediate_size"),
        moe_inter_dim=get("moe_intermediate_size"),
        n_layers=get("num_hidden_layers"),
        n_dense_layers=get("first_k_dense_replace", 0),
        n_heads=n_heads,
        n_routed_experts=n_routed,
        n_shared_experts=get("n_shared_experts", 0) or 0,
        n_activated_experts=get("num_experts_per_tok"),
        n_expert_groups=get("n_group", 1),
        n_limited_groups=get("topk_group", 1),
        route_scale=float(get("routed_scaling_factor", 1.0)),
        score_func=get("scoring_func", "sigmoid"),
        q_lora_rank=get("q_lora_rank", 0, required=False) or 0,
        kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"),
        max_seq_len=get("max_position_embeddings"),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        mtp_depth=get("num_nextn_predict_layers", 0, required=False) or 0,
        init_std=float(get("initializer_range", 0.006)),
    )
    # rope: release format (rope_theta + rope_scaling{type}) or transformers 5 (rope_parameters{rope_type})
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    d["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    d["original_seq_len"] = d["max_seq_len"]
    if rope_type == "yarn":
        factor = rope.get("factor")
        orig = rope.get("original_max_position_embeddings")
        if factor is None or orig is None:
            raise ConvertError("config.json: yarn rope_scaling needs 'factor' and 'original_max_position_embeddings'")
        ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if ms and ms_all and ms != ms_all:
            raise ConvertError(f"config.json: rope_scaling mscale={ms} != mscale_all_dim={ms_all}; DeepSeek-V3 "
                               "scales only the softmax by mscale² (one coefficient)")
        d.update(rope_factor=float(factor), original_seq_len=int(orig), beta_fast=_num(rope.get("beta_fast", 32)),
                 beta_slow=_num(rope.get("beta_slow", 1)), mscale=float(ms_all or ms or 1.0))
    elif rope_type != "default":
        raise ConvertError(f"config.json: rope type {rope_type!r} is not supported (default or yarn)")
    extras = hf.get(EXTRAS_KEY) or {}
    for key in _EXTRA_FIELDS:
        if key not in extras:
            continue
        if key in ("rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale") and rope_type == "yarn":
            continue  # the HF rope fields rule when present
        d[key] = extras[key]
    if rope_type != "yarn" and d.get("rope_factor", 1.0) > 1.0 and d["max_seq_len"] > d["original_seq_len"]:
        raise ConvertError(f"config.json: {EXTRAS_KEY} asks for YaRN but rope_scaling has none")
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise ConvertError(f"config.json does not make a valid model: {e}") from e


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers' DeepseekV3ForCausalLM, in the release's field names."""
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.route_scale,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "topk_method": "noaux_tc",
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups,
        "num_experts_per_tok": cfg.n_activated_experts,
        "moe_layer_freq": 1,
        "first_k_dense_replace": cfg.n_dense_layers,
        "norm_topk_prob": True,
        "scoring_func": cfg.score_func,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_theta": cfg.rope_theta,
        # YaRN only where DeepSeek's reference applies it (max_seq_len > original_seq_len);
        # transformers would apply a yarn rope_scaling unconditionally.
        "rope_scaling": {
            "type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale,
        } if cfg.yarn_enabled else None,
        "rope_interleave": True,  # rotary pairs are consecutive (x[2i], x[2i+1]), as released
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
        EXTRAS_KEY: {k: getattr(cfg, k) for k in _EXTRA_FIELDS},
    }
    return hf


# ----------------------------------------------------------------------------------------------
# tensor names
# ----------------------------------------------------------------------------------------------
_BLOCK_NAMES = {  # HF suffix after model.layers.N.  →  ours after layers.N.
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
_BLOCK_NAMES_REV = {v: k for k, v in _BLOCK_NAMES.items()}
_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
              "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "norm.weight"}
_MTP_NAMES_REV = {v: k for k, v in _MTP_NAMES.items()}
_MTP_SHARED = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_EXPERT_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_PROJ_REV = {v: k for k, v in _EXPERT_PROJ.items()}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "head.weight"}
_TOP_NAMES_REV = {v: k for k, v in _TOP_NAMES.items()}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
IGNORE = "ignore"


def _resolve(name: str, cfg: ModelConfig):
    """HF name → (our name, expert index or None, part) | IGNORE | None (unknown).

    part is None, or "gate"/"up" for the halves of transformers' fused `experts.gate_up_proj`.
    """
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], None, None
    m = _LAYER_RE.fullmatch(name)
    if not m:
        return IGNORE if name.endswith("rotary_emb.inv_freq") else None
    n, rest = int(m.group(1)), m.group(2)
    if n < cfg.n_layers:
        prefix = f"layers.{n}."
    elif n - cfg.n_layers < cfg.mtp_depth:
        k = n - cfg.n_layers
        if rest in _MTP_SHARED:
            return IGNORE  # the release repeats the shared embedding and head in the MTP layer
        if rest in _MTP_NAMES:
            return f"mtp.{k}.{_MTP_NAMES[rest]}", None, None
        prefix = f"mtp.{k}.block."
    else:
        return None
    if rest in _BLOCK_NAMES:
        return prefix + _BLOCK_NAMES[rest], None, None
    e = _EXPERT_RE.fullmatch(rest)
    if e:
        return f"{prefix}ffn.experts.{_EXPERT_PROJ[e.group(2)]}", int(e.group(1)), None
    if rest == "mlp.experts.gate_up_proj":  # transformers' in-memory layout [E, 2I, D], if saved as is
        return f"{prefix}ffn.experts.w1", None, "gate_up"
    if rest == "mlp.experts.down_proj":
        return f"{prefix}ffn.experts.w2", None, None
    if rest.endswith("rotary_emb.inv_freq"):
        return IGNORE
    return None


def _hf_names(cfg: ModelConfig, sd: dict) -> Iterator[tuple[str, str, Optional[int]]]:
    """(HF name, our key, expert index or None) for every tensor to_hf writes, in release order."""
    seen = set()

    def block(prefix_ours: str, prefix_hf: str):
        for key in sd:
            if not key.startswith(prefix_ours):
                continue
            rest = key[len(prefix_ours):]
            seen.add(key)
            if rest.startswith("ffn.experts."):
                proj = rest[len("ffn.experts."):]
                if proj not in _EXPERT_PROJ_REV:
                    raise UnknownTensorError(f"to_hf: unknown tensor {key!r}")
                for j in range(sd[key].shape[0]):
                    yield f"{prefix_hf}mlp.experts.{j}.{_EXPERT_PROJ_REV[proj]}.weight", key, j
            elif rest in _BLOCK_NAMES_REV:
                yield prefix_hf + _BLOCK_NAMES_REV[rest], key, None
            else:
                seen.discard(key)

    if "embed.weight" in sd:
        seen.add("embed.weight")
        yield "model.embed_tokens.weight", "embed.weight", None
    for i in range(cfg.n_layers):
        yield from block(f"layers.{i}.", f"model.layers.{i}.")
    for key in ("norm.weight", "head.weight"):
        if key in sd:
            seen.add(key)
            yield _TOP_NAMES_REV[key], key, None
    for k in range(cfg.mtp_depth):
        hf_prefix = f"model.layers.{cfg.n_layers + k}."
        for rest, ours in _MTP_SHARED.items():
            if ours in sd:
                yield hf_prefix + rest, ours, None
        for ours, rest in _MTP_NAMES_REV.items():
            key = f"mtp.{k}.{ours}"
            if key in sd:
                seen.add(key)
                yield hf_prefix + rest, key, None
        yield from block(f"mtp.{k}.block.", hf_prefix)
    unknown = sorted(set(sd) - seen)
    if unknown:
        raise UnknownTensorError(f"to_hf: {len(unknown)} tensor(s) have no HF name for this config, "
                                 f"e.g. {unknown[:5]}")


# ----------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------
def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block=(FP8_BLOCK, FP8_BLOCK)) -> torch.Tensor:
    """w [M, N] float8 with one fp32 scale per bm×bn tile (scale_inv [⌈M/bm⌉, ⌈N/bn⌉]) → w·scale.
    Edge tiles may be partial (M, N need not be multiples of the block)."""
    bm, bn = (block, block) if isinstance(block, int) else block
    if w.dim() != 2:
        raise ConvertError(f"FP8 weight must be 2-D, got shape {tuple(w.shape)}")
    m, n = w.shape
    want = (math.ceil(m / bm), math.ceil(n / bn))
    if tuple(scale_inv.shape) != want:
        raise ConvertError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not tile weight "
                           f"{tuple(w.shape)} in {bm}×{bn} blocks (want {want})")
    s = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]
    return (w.float() * s).to(dtype)


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


# ----------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------
def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(Path(p) for p in glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ConvertError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.exists():
            raise ConvertError(f"{path}: shard {f.name} named in the index is missing")
    return files


def _expected(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def from_hf(path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a HF DeepSeek-V3 folder → (ModelConfig, state_dict for DeepSeekV3(cfg), strict).

    Shards are read one at a time (safetensors, memory-mapped); FP8 weights with a
    `weight_scale_inv` companion are dequantised to `dtype`. If the folder holds no MTP layer
    (e.g. saved by transformers) the config gets mtp_depth=0, with a warning.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ConvertError(f"{path}: no config.json")
    hf_cfg = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf_cfg)
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size") or (FP8_BLOCK, FP8_BLOCK))
    files = _shard_files(path)
    where: dict[str, Path] = {}
    for f in files:  # headers only
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                where[k] = f

    has_mtp = any((m := _LAYER_RE.fullmatch(k)) and int(m.group(1)) >= cfg.n_layers for k in where)
    if cfg.mtp_depth and not has_mtp:
        warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.mtp_depth} but the checkpoint holds no "
                      "MTP layer; importing with mtp_depth=0")
        cfg.mtp_depth = 0
    expected = _expected(cfg)

    plan, unknown = {}, []
    for k in where:
        if k.endswith("_scale_inv"):
            if k[: -len("_scale_inv")] not in where:
                unknown.append(k)
            continue
        r = _resolve(k, cfg)
        if r is None or (r != IGNORE and r[0] not in expected):
            unknown.append(k)
        else:
            plan[k] = r
    if unknown:
        raise UnknownTensorError(f"{path}: {len(unknown)} tensor name(s) not known for this config "
                                 f"(n_layers={cfg.n_layers}, mtp_depth={cfg.mtp_depth}, "
                                 f"q_lora_rank={cfg.q_lora_rank}), e.g. {sorted(unknown)[:5]}")

    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k not in plan or plan[k] == IGNORE:
                    continue
                ours, j, part = plan[k]
                t = h.get_tensor(k)
                if k + "_scale_inv" in where:
                    with safe_open(str(where[k + "_scale_inv"]), "pt") as hs:
                        t = dequantize_fp8(t, hs.get_tensor(k + "_scale_inv"), dtype, block)
                elif t.dtype in _FP8_DTYPES:
                    raise ConvertError(f"{k}: {t.dtype} tensor without a {k}_scale_inv companion")
                t = t.to(dtype)
                shape = expected[ours]
                if part == "gate_up":
                    half = t.shape[1] // 2
                    pieces = [(ours, t[:, :half]), (ours.replace(".w1", ".w3"), t[:, half:])]
                else:
                    pieces = [(ours, t)]
                for name, piece in pieces:
                    want = shape if j is None else shape[1:]
                    if tuple(piece.shape) != tuple(want):
                        raise ConvertError(f"{k}: shape {tuple(piece.shape)}, the config needs {tuple(want)} "
                                           f"for {name}")
                    if j is None:
                        out[name] = piece.contiguous()
                    else:
                        if name not in out:
                            out[name] = torch.empty(shape, dtype=dtype)
                            filled[name] = set()
                        out[name][j] = piece
                        filled[name].add(j)
    missing = sorted(set(expected) - set(out))
    missing += [f"{n}[{j}]" for n, s in filled.items() for j in range(expected[n][0]) if j not in s]
    if missing:
        raise MissingTensorError(f"{path}: {len(missing)} tensor(s) missing for this config, e.g. {missing[:5]}")
    return cfg, out


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def to_hf(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], path, dtype: torch.dtype = torch.float32,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, include_mtp: bool = True) -> list[str]:
    """Write config.json and model.safetensors (sharded with an index above max_shard_bytes) in the
    release naming, so `transformers.DeepseekV3ForCausalLM.from_pretrained(path)` loads it.
    Router biases (e_score_correction_bias) stay fp32 like the release. Returns the files written.

    MTP depths go in as model.layers.{n_layers+k}.* like the release; transformers has no MTP
    module and reports those keys UNEXPECTED (its ignore pattern only covers layer 61 of the 671B
    model). include_mtp=False leaves them out and writes num_nextn_predict_layers=0."""
    cfg.validate()
    if not include_mtp and cfg.mtp_depth:
        cfg = replace(cfg, mtp_depth=0)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("mtp.")}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entries = list(_hf_names(cfg, state_dict))

    def out_dtype(hf_name):
        return torch.float32 if hf_name.endswith("e_score_correction_bias") else dtype

    shards: list[list] = [[]]
    size = 0
    for hf_name, key, j in entries:
        t = state_dict[key]
        nbytes = (t[0] if j is not None else t).numel() * torch.empty((), dtype=out_dtype(hf_name)).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf_name, key, j))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tensors = {}
        for hf_name, key, j in shard:
            t = state_dict[key] if j is None else state_dict[key][j]
            t = t.detach().to("cpu", out_dtype(hf_name)).contiguous().clone()
            tensors[hf_name] = t
            weight_map[hf_name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
    return names


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _save_ours(cfg: ModelConfig, sd: dict, dst: Path) -> None:

    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "model.yaml").write_text("# @package model\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _is_step_folder(path: Path) -> bool:
    return (path / "meta.json").exists() and (path / ".metadata").exists()


def load_training_checkpoint(src: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, state_dict) of a training checkpoint: a step_N folder, or a run.dir (its newest
    complete checkpoint). The model config comes from the checkpoint's meta.json (older ones: the
    run's config.yaml); the tensors are read with DCP under their global names."""

    step_dir = src
    if not _is_step_folder(src):
        found = ckpt.list_complete(str(src / "checkpoints"))
        if not found:
            raise ConvertError(f"{src}: neither a step_N checkpoint folder nor a run.dir with checkpoints/step_N "
                               "(training writes one at the end unless checkpoint.final=false)")
        step_dir = Path(found[-1][1])
    meta = ckpt.read_meta(str(step_dir))
    model_dict = meta.get("model")
    if model_dict is None:  # checkpoints written before meta.json recorded the model config
        run_cfg = step_dir.parent.parent / "config.yaml"
        if not run_cfg.exists():
            raise ConvertError(f"{step_dir}: meta.json has no model config and {run_cfg} is missing")
        model_dict = yaml.safe_load(run_cfg.read_text())["model"]
    cfg = ModelConfig.from_dict(model_dict)
    model = DeepSeekV3(cfg, init_seed=None)  # every tensor is read from the checkpoint
    try:
        dcp.load(ckpt.model_state(model), checkpoint_id=str(step_dir))
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConvertError(f"{step_dir}: cannot read the model tensors ({ckpt.load_error(e)})") from e
    return cfg, model.state_dict()


def _load_ours(src: Path) -> tuple[ModelConfig, dict]:
    if _is_step_folder(src) or (src / "checkpoints").is_dir():
        return load_training_checkpoint(src)
    cfg_file = src / "model.yaml"
    if not cfg_file.exists():
        raise ConvertError(f"{src}: no model.yaml (ModelConfig fields), no checkpoints/ and not a step_N folder")
    cfg = ModelConfig.from_dict(yaml.safe_load(cfg_file.read_text()))
    if (src / "model.safetensors").exists():
        return cfg, load_file(str(src / "model.safetensors"))
    if (src / "model.pt").exists():
        sd = torch.load(src / "model.pt", map_location="cpu", weights_only=True)
        return cfg, sd.get("model", sd)
    raise ConvertError(f"{src}: no model.safetensors or model.pt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.split("\n")[0])
    p.add_argument("direction", choices=["import", "export"],
                   help="import: HF folder → ours (model.safetensors + model.yaml); export: ours → HF folder")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    try:
        if args.direction == "import":
            cfg, sd = from_hf(args.src, dtype)
            _save_ours(cfg, sd, Path(args.dst))
        else:
            cfg, sd = _load_ours(Path(args.src))
            to_hf(cfg, sd, args.dst, dtype)
    except (ConvertError, ConfigError, OSError) as err:
        raise SystemExit(f"error: {args.direction}: {err}") from None
    print(f"{args.direction}: {args.src} → {args.dst} ({len(sd)} tensors)")


if __name__ == "__main__":
    main()
