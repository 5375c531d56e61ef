"""What autograd keeps for backward, per model part and micro-batch: the planner's activation model
(torch-free). Two lists:

* ``device="cpu"`` — THIS runtime: one item per storage the modules save (model/*.py, the
  dispatchers in model/moe.py and parallel/dispatch.py), from the model's shapes, so that a rank's
  planned ``saved_activation_bytes`` is what the trainer's saved-tensor meter
  (trainer/precision.LiveSavedActivations) measures; tests/test_plan_vs_run_activations.py compares
  them on real runs (within 5%; the rest is routing). A storage saved by several ops counts once.
* ``device="cuda"`` — the paper's kernels (§3.3, the GPU planning target): fused RMSNorm and
  attention, GEMM inputs cached in FP8 under fp8, SwiGLU outputs recomputed and the gate weight
  folded into the SwiGLU (the combine keeps no expert outputs). The current modules do not do
  that; ``Shape(device="cuda", kernels="runtime")`` gives this runtime's own list with BF16
  activations (about 4.6× the paper's per MoE-layer token under fp8 + norm_and_up_proj on the
  671B model — unmeasured: no GPU here).

Runtime list, shape: ``micro_batch`` sequences of ``seq_len`` tokens (an MTP depth runs on
seq_len - 1), routed experts of one EP rank receive micro_batch·seq_len·k rows on average (uniform
routing: the real count follows the router, so EP ranks differ by their load imbalance).
* activation element (``act``): 4 bytes on CPU (every precision computes in fp32 there) and for
  fp32; 2 bytes (BF16 autocast) on CUDA under bf16 / fp8. Norm statistics, router scores, gate
  weights, log-softmax outputs: fp32. Indices: int64.
* an FP8 linear (precision=fp8: attention projections, MLP / expert projections, MTP eh_proj) saves
  its input as the Wgrad operand only: E4M3 xᵀ [in, rows] (1 byte) and one fp32 scale per 128×1
  tile, ``in · ⌈rows/128⌉`` scales per GEMM call (model/fp8.py ``fp8_saved_input_bytes``, which
  tests/test_fp8_activations.py checks against the FP8 linear). Two FP8 linears reading one input
  (w1 and w3, wq_a and wkv_a) each save their copy.
* RMSNorm (model/layers.py, unfused) keeps its fp32 input, 1/rms and the normalised fp32 tensor;
  its output is saved by the GEMM that reads it.
* attention core: on CPU ``scaled_dot_product_attention`` takes its math path (MLA's q/k and v
  head dims differ): scaled q and k copies, the softmax probabilities [heads, seq] per token and a
  contiguous v. On CUDA the fused kernel: q, k, the wkv_b output v is a view of, out, logsumexp.

Recompute: ``norm_and_up_proj`` keeps the latents the checkpointed q/kv up-projections start from
(the checkpoint saves its inputs) and drops the q/kv norms' tensors; ``full`` keeps each block's
input only. The tensors a backward rematerialises are the ``transient`` (not held between forward
and backward, not what the meter counts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from model.config import RECOMPUTE_MODES  # torch-free

DEVICES = ("cuda", "cpu")
F32, I64 = 4, 8


class ActivationError(ValueError):
    """A malformed activation-model input (unknown recompute mode, device, precision)."""


@dataclass(frozen=True)
class Shape:
    """The micro-batch a part sees and how the runtime stores it."""

    precision: str = "fp8"
    device: str = "cuda"
    micro_batch: int = 1
    seq_len: int = 4096
    ep: int = 1
    kernels: str = "paper"  # cuda only: paper (the target recipe) | runtime (this code's modules, bf16)

    @property
    def act(self) -> int:
        return 4 if (self.device == "cpu" or self.precision == "fp32") else 2

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"


@dataclass(frozen=True)
class ActItem:
    name: str
    bytes: float  # per micro-batch
    drop: Optional[str] = None  # norm_and_up_proj: dropped under that recompute; block: kept under full


class _Items:
    def __init__(self, shape: Shape):
        self.s, self.items = shape, []

    def add(self, name: str, nbytes: float, drop: Optional[str] = None) -> None:
        if nbytes:
            self.items.append(ActItem(name, float(nbytes), drop))

    def gemm_input(self, name: str, width: int, rows: int, readers: int = 1, drop=None, chunks: int = 1,
                   fp8: Optional[bool] = None) -> None:
        """The input [rows, width] of `readers` projections: FP8 linears each save their FP8 Wgrad
        operand (`chunks` GEMM calls over the rows, e.g. one per local expert), fp32/bf16 ones
        share one saved tensor."""
        from model.fp8 import fp8_saved_input_bytes  # the FP8 linear's own figure (imports torch)

        fp8 = self.s.fp8 if fp8 is None else fp8
        if fp8:
            per = fp8_saved_input_bytes(rows / chunks, width) * chunks if rows >= chunks else fp8_saved_input_bytes(rows, width)
            self.add(f"{name}: FP8 Wgrad operand ×{readers}", readers * per, drop)
        else:
            self.add(name, self.s.act * rows * width, drop)

    def norm(self, name: str, width: int, rows: int, input_saved: bool = False, drop=None) -> None:
        """RMSNorm: fp32 input (unless that storage is already kept), 1/rms, normalised input."""
        if not input_saved:
            self.add(f"{name} input (fp32)", F32 * rows * width, drop)
        self.add(f"{name} 1/rms", F32 * rows, drop)
        self.add(f"{name} normalised input (fp32)", F32 * rows * width, drop)


def _block(it: _Items, cfg, moe: bool, seq: int) -> None:
    s = it.s
    rows, a = s.micro_batch * seq, s.act
    d, h = cfg.dim, cfg.n_heads
    qk, nope, rope, v = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    up, rec = "norm_and_up_proj", "recompute_only"
    it.add("block input (all the full-recompute checkpoint keeps)", a * rows * d, "full_only")
    it.norm("attn_norm", d, rows)
    it.gemm_input("attn_norm output (wq_a, wkv_a input)", d, rows, readers=2)
    if cfg.q_lora_rank:
        r = cfg.q_lora_rank
        it.add("q latent (wq_a output) as the q_norm's fp32 input", F32 * rows * r, up)
        it.add("q latent (wq_a output) as the up-projection checkpoint's input", a * rows * r, rec)
        it.add("q_norm 1/rms", F32 * rows, up)
        it.add("q_norm normalised input (fp32)", F32 * rows * r, up)
        it.gemm_input("q_norm output (wq_b input)", r, rows, drop=up)
    # wkv_a output [kv latent | k_pe]: the checkpoint (and on CPU the kv_norm: x.float() is x) keeps
    # the whole storage through the kv latent view; on CUDA the kv_norm keeps an fp32 copy of the view
    kv_in = a * (cfg.kv_lora_rank + rope) if s.device == "cpu" else F32 * cfg.kv_lora_rank
    it.add("kv latent (wkv_a output) as the kv_norm's fp32 input", rows * kv_in, up)
    it.add("kv latent + k_pe (wkv_a output) as the up-projection checkpoint's input",
           a * rows * (cfg.kv_lora_rank + rope), rec)
    it.add("kv_norm 1/rms", F32 * rows, up)
    it.add("kv_norm normalised input (fp32)", F32 * rows * cfg.kv_lora_rank, up)
    it.gemm_input("kv_norm output (wkv_b input)", cfg.kv_lora_rank, rows, drop=up)
    if s.device == "cpu":  # math path
        it.add("attention: scaled q, scaled k (math path)", 2 * a * rows * h * qk)
        it.add(f"attention: softmax probabilities [heads, {seq}] per token (math path)", a * rows * h * seq)
        it.add("attention: contiguous v (math path)", a * rows * h * v)
    else:  # fused kernel
        it.add("attention: q, k with rope (fused kernel inputs)", 2 * a * rows * h * qk)
        it.add("attention: k_nope, v (wkv_b output; v is a kernel input)", a * rows * h * (nope + v))
        it.add("attention: output, logsumexp (fused kernel)", a * rows * h * v + F32 * rows * h)
    it.gemm_input("attention output (wo input)", h * v, rows)
    it.norm("ffn_norm", d, rows)
    if not moe:
        _mlp(it, "MLP", d, cfg.inter_dim, rows)
        return
    e, k, inter = cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim
    sh = cfg.n_shared_experts * inter
    # ffn_norm output: the router's fp32 GEMM keeps it; shared-expert FP8 linears add their copies
    it.add("ffn_norm output (router input)", (F32 if s.device == "cpu" else 4) * rows * d)
    if sh and s.fp8:
        it.gemm_input("ffn_norm output (shared w1/w3 input)", d, rows, readers=2)
    it.add("router scores (sigmoid output), gate normaliser", F32 * rows * (e + 1))
    it.add("router top-k ids (int64), gate weights", I64 * rows * k + F32 * rows * k)
    if cfg.balance_alpha > 0:
        it.add("balance loss: score sums, per-sequence expert fractions", F32 * rows * (1 + e / seq))
    # routed experts: every token's k rows, spread over this EP rank's experts (uniform routing)
    m = rows * k
    n_local = e // s.ep
    it.add("dispatch / combine row permutations (int64)", I64 * m * (2 if s.ep == 1 or n_local == 1 else 4))
    if s.fp8:  # the FP8 dispatch payload feeds w1/w3 as is; only their Wgrad operands are kept
        it.gemm_input("dispatched rows (expert w1/w3 input)", d, m, readers=2, chunks=n_local)
    else:
        it.add("dispatched rows (expert w1/w3 input)", a * m * d)
    it.add("expert w1 output, SwiGLU silu output, w3 output", 3 * a * m * inter)
    it.gemm_input("expert SwiGLU output (w2 input)", inter, m, chunks=n_local)
    it.add("expert outputs and gate weights kept by the combine", a * m * d + a * m)
    if sh:  # fp32/bf16 shared w1/w3 read the router's saved input (FP8 ones: added above)
        _mlp(it, "shared expert", d, sh, rows, input_counted=True)


def _mlp(it: _Items, name: str, d: int, inter: int, rows: int, input_counted: bool = False) -> None:
    a = it.s.act
    if not input_counted:
        it.gemm_input(f"{name} input (w1, w3)", d, rows, readers=2)
    it.add(f"{name} w1 output, silu output, w3 output", 3 * a * rows * inter)
    it.gemm_input(f"{name} SwiGLU output (w2 input)", inter, rows)


def _head(it: _Items, cfg, rows: int, final: str) -> None:
    s = it.s
    it.norm(final, cfg.dim, rows)
    it.add(f"{final} output (head input, fp32/bf16 GEMM)", s.act * rows * cfg.dim)
    it.add("log-softmax of the logits (fp32), targets (int64)", F32 * rows * cfg.vocab_size + I64 * rows)


# ------------------------------------------------------------------ the paper's kernels (CUDA target)
def _paper_block(cfg, moe: bool, fp8: bool) -> List[Tuple[str, float, str, Optional[str]]]:
    """(name, elements per token, act | gemm | f32, drop) of one layer under DeepSeek-V3's kernels."""
    d, h = cfg.dim, cfg.n_heads
    qk, nope, rope, v = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    up = "norm_and_up_proj"
    items = [("block input x (attn_norm input)", d, "act", "always"),
             ("attn_norm output (wq_a / wkv_a input)", d, "gemm", up)]
    if cfg.q_lora_rank:
        items += [("q latent (wq_a output, q_norm input)", cfg.q_lora_rank, "act", None),
                  ("q_norm output (wq_b input)", cfg.q_lora_rank, "gemm", up)]
    items += [
        ("q with rope (attention input)", h * qk, "act", up),
        ("kv latent + shared k_pe (wkv_a output)", cfg.kv_lora_rank + rope, "act", None),
        ("kv_norm output (wkv_b input)", cfg.kv_lora_rank, "gemm", up),
        ("k_nope, v (wkv_b output; v is an attention input)", h * (nope + v), "act", up),
        ("k with shared rope (attention input)", h * qk, "act", up),
        ("attention output (wo input)", h * v, "act", None),
        ("softmax logsumexp", h, "f32", None),
        ("residual after attention (ffn_norm input)", d, "act", None),
        ("ffn_norm output (router / shared / dispatch input)", d, "gemm", up),
    ]
    if moe:
        k, inter = cfg.n_activated_experts, cfg.moe_inter_dim
        sh = cfg.n_shared_experts * inter
        items += [("router scores (sigmoid output, fp32)", cfg.n_routed_experts, "f32", None),
                  (f"dispatched tokens, {k} copies (expert w1/w3 input)", k * d, "gemm", None),
                  ("expert w1/w3 outputs (SwiGLU input)", k * 2 * inter, "gemm", None)]
        if not fp8:  # the paper's fp8 recipe recomputes the SwiGLU output, folds the gate into it
            items += [("expert SwiGLU output (w2 input)", k * inter, "gemm", None),
                      ("expert outputs kept by the combine (gate-weight grad)", k * d, "act", None)]
        if sh:
            items += [("shared expert w1/w3 outputs (SwiGLU input)", 2 * sh, "gemm", None)]
            if not fp8:
                items += [("shared expert SwiGLU output (w2 input)", sh, "gemm", None)]
    else:
        items += [("MLP w1/w3 outputs (SwiGLU input)", 2 * cfg.inter_dim, "gemm", None)]
        if not fp8:
            items += [("MLP SwiGLU output (w2 input)", cfg.inter_dim, "gemm", None)]
    return items


def _paper_items(cfg, kind: str, shape: Shape) -> List[ActItem]:
    act = 4 if shape.precision == "fp32" else 2
    gemm = {"fp32": 4.0, "bf16": 2.0, "fp8": 1 + 4 / 128}[shape.precision]
    size = {"act": act, "gemm": gemm, "f32": 4.0}
    d = cfg.dim
    if kind in ("dense", "moe"):
        rows = _paper_block(cfg, kind == "moe", shape.fp8)
    elif kind == "mtp":
        rows = ([("MTP enorm / hnorm inputs (embedding, h)", 2 * d, "act", None),
                 ("MTP normalised concat (eh_proj input)", 2 * d, "gemm", "norm_and_up_proj")]
                + [("MTP " + n, e, t, {"always": "full_only", None: "block"}.get(dr, dr))
                   for n, e, t, dr in _paper_block(cfg, cfg.is_moe_layer(cfg.n_layers), shape.fp8)]
                + [("MTP final norm input", d, "act", None), ("MTP final norm output (head input)", d, "act", "norm_and_up_proj")])
    elif kind == "head":
        depths = 1 + cfg.mtp_depth
        rows = [("final norm input", d, "act", None), ("final norm output (head input)", d, "act", "norm_and_up_proj"),
                (f"logits ×{depths} prediction depths (bf16 for cross-entropy)", depths * cfg.vocab_size, "act", None),
                ("cross-entropy logsumexp", depths, "f32", None)]
    else:
        rows = []
    tokens = shape.micro_batch * shape.seq_len
    if kind in ("dense", "moe"):  # under full, a block keeps its input only
        rows = [(n, e, t, dr or "block") for n, e, t, dr in rows]
    return [ActItem(n, size[t] * e * tokens, dr) for n, e, t, dr in rows]


def part_items(cfg, kind: str, shape: Shape) -> List[ActItem]:
    """Every tensor one part (dense | moe | head | mtp | embed) keeps for backward, per micro-batch:
    on CPU what this runtime's modules save; on CUDA what the paper's kernels keep (the planning
    target for GPU clusters; see the module docstring)."""
    if shape.device not in DEVICES:
        raise ActivationError(f"plan.device: expected one of {DEVICES}, got {shape.device!r}")
    if shape.device == "cuda" and shape.kernels == "paper":
        return _paper_items(cfg, kind, shape)
    it = _Items(shape)
    b, seq = shape.micro_batch, shape.seq_len
    if kind in ("dense", "moe"):
        _block(it, cfg, kind == "moe", seq)
        it.items = [ActItem(x.name, x.bytes, x.drop or "block") for x in it.items]
    elif kind == "head":
        _head(it, cfg, b * seq, "final norm")
    elif kind == "mtp":  # one depth; depth k runs on seq - k positions (the planner's depths are alike: k = 1)
        sk = seq - 1
        rows = b * sk
        it.norm("MTP enorm (embedding)", cfg.dim, rows)
        # hnorm reads the previous depth's normalised output, which the head GEMM keeps (CPU: same
        # fp32 storage); on CUDA its fp32 copy is new
        it.norm("MTP hnorm", cfg.dim, rows, input_saved=shape.device == "cpu")
        it.gemm_input("MTP normalised concat (eh_proj input)", 2 * cfg.dim, rows)
        block_start = len(it.items)
        _block(it, cfg, cfg.is_moe_layer(cfg.n_layers), sk)
        it.items[block_start:] = [ActItem("MTP " + x.name, x.bytes, x.drop or "block") for x in it.items[block_start:]]
        _head(it, cfg, rows, "MTP final norm")
    elif kind == "embed":
        it.add("token ids (int64)", I64 * b * (seq + 1))
    return it.items


def _kept(item: ActItem, recompute: str) -> bool:
    """Whether `recompute` keeps the item: full keeps a block's input only (and, for MTP, what
    surrounds its block); norm_and_up_proj keeps the up-projections' latents instead of the q/kv
    norms' tensors."""
    if item.drop == "always":
        return True
    if item.drop == "full_only":
        return recompute == "full"
    if item.drop == "recompute_only":
        return recompute == "norm_and_up_proj"
    if recompute == "full":
        return item.drop is None
    if item.drop == "norm_and_up_proj":
        return recompute == "none"
    return True


def part_saved_bytes(cfg, kind: str, precision: str, recompute: str, *, micro_batch: int = 1,
                     seq_len: int = 4096, ep: int = 1, device: str = "cuda",
                     kernels: str = "paper") -> Tuple[float, float]:
    """(bytes one micro-batch leaves saved in this part until its backward, extra bytes the backward
    rematerialises for one layer of it) under `recompute`."""
    if recompute not in RECOMPUTE_MODES:
        raise ActivationError(f"train.recompute: expected one of {RECOMPUTE_MODES}, got {recompute!r}")
    shape = Shape(precision, device, micro_batch, seq_len, ep, kernels)
    items = part_items(cfg, kind, shape)
    every = sum(i.bytes for i in items if _kept(i, "none"))
    kept = sum(i.bytes for i in items if _kept(i, recompute))
    return kept, max(every - kept, 0.0)


def activation_table(cfg, precision: str = "fp8", *, micro_batch: int = 1, seq_len: int = 4096, ep: int = 1,
                     device: str = "cuda") -> List[dict]:
    """Per dense / MoE layer: every kept tensor with its bytes per token and whether each recompute
    mode keeps it."""
    shape = Shape(precision, device, micro_batch, seq_len, ep)
    tokens = micro_batch * seq_len
    rows = []
    for kind in ("dense", "moe"):
        for it in part_items(cfg, kind, shape):
            rows.append({"layer": kind, "tensor": it.name, "bytes": it.bytes / tokens,
                         **{f"kept_{m}": _kept(it, m) for m in RECOMPUTE_MODES}})
    return rows
