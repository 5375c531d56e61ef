"""Fine-grained FP8 quantisation and the FP8 linear (DeepSeek-V3 §3.3).

Format and granularity
----------------------
* Every FP8 tensor is E4M3 (``torch.float8_e4m3fn``, largest finite value 448).
* Activations (and activation gradients) are scaled per 1×128 tile along the GEMM inner
  dimension: ``quantize_act(x)`` works on the last dimension of ``x``, scales have shape
  ``[..., ceil(K/128)]``.
* Weights are scaled per 128×128 block: ``quantize_weight(w)`` on ``[..., out, in]`` gives
  scales ``[..., ceil(out/128), ceil(in/128)]``.
* A scale is the *dequantisation multiplier*: ``scale = amax(tile) / 448`` and
  ``x ≈ q.float() * scale``. This is exactly the ``weight_scale_inv`` tensor of DeepSeek's
  released FP8 checkpoints (same layout [ceil(out/128), ceil(in/128)], same meaning), so those
  tensors can be loaded as-is.
* ``pow2_scales=True`` rounds every scale *up* to a power of two (so no element can overflow and
  the scaling itself is exact).
* Dimensions that are not a multiple of 128 are zero-padded internally to the tile and sliced
  back (zeros never change a tile's amax); quantised tensors have the shape of their input.
  ``FP8ShapeError`` is raised only for shapes that cannot be quantised at all (e.g. a 1-D
  weight, a linear whose input width does not match the weight, scales of the wrong shape).
* An all-zero tile gets the floor scale ``AMAX_FLOOR / 448`` and quantises to exact zeros
  (never NaN). NaN/inf inputs are not hidden: they propagate.

FP8 linear
----------
``fp8_linear(x, weight, bias)`` computes ``y = x Wᵀ (+ b)`` with all three GEMMs of a linear
layer on quantised operands and FP32 accumulation:

=========  ===========================  ==========  ==============================================
GEMM       math                         inner dim   operands
=========  ===========================  ==========  ==============================================
Fprop      y[T,out]  = x · Wᵀ            in          x: 1×128 tiles (per token); W: 128×128 blocks
Dgrad      dx[T,in]  = dy · W            out         dy: 1×128 tiles (per token); W: 128×128 blocks
Wgrad      dW[out,in]= dyᵀ · x           tokens T    dy and x: 128×1 tiles (128 tokens × 1 channel)
=========  ===========================  ==========  ==============================================

As in the paper, activations are quantised 1×128 for the forward pass and 128×1 (along the token
dimension, which is the inner dimension of the Wgrad GEMM) for the backward pass. The 128×1 copy
of ``x`` is made in the forward pass and is what is saved for backward (FP8 + scales, ~¼ of the
fp32 activation, without the tile padding: ``fp8_saved_input_bytes``), as FP8 training recipes do; the weight is re-quantised in backward (it is the
parameter itself, so saving it costs nothing). The bias gradient is a plain fp32 sum.
Master weights and gradients stay in their own dtype (fp32): the returned gradients have the
dtype of the corresponding inputs; the output has the dtype of ``x``.

Backends (``fp8_backend(device)``)
-------------------------------
* ``"scaled_mm"`` – CUDA with FP8 tensor cores (sm_89+, ``torch._scaled_mm``): for each 128-wide
  K chunk one ``_scaled_mm`` call (unit scales, fp32 output), then the per-row × per-column
  scales of that chunk are applied and the partial result is accumulated in fp32 — the paper's
  "promotion to CUDA cores every 128 elements". This is correct but launches K/128 GEMMs; a
  fused blockwise kernel (e.g. DeepGEMM) would replace ``_gemm_scaled_mm``.
* ``"simulated"`` – everywhere else: quantise → dequantise to fp32 → fp32 matmul. Numerically
  this is what the blockwise kernel computes (same quantised values, same scales), up to the
  order of the fp32 accumulation.

This module is pure PyTorch and never imports torch.distributed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AMAX_FLOOR",
    "E4M3_MAX",
    "FP8_DTYPE",
    "FP8Linear",
    "FP8ShapeError",
    "TILE",
    "dequantize_act",
    "dequantize_weight",
    "fp8_backend",
    "fp8_linear",
    "fp8_linear_prequantized",
    "fp8_saved_input_bytes",
    "quantize_act",
    "quantize_weight",
    "set_fp8_backend",
]

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
TILE = 128
# amax floor: an all-zero tile gets scale AMAX_FLOOR/448 (a normal fp32 number) instead of 0,
# so q = x / scale is 0, not NaN. Tiles whose amax is below the floor quantise to ~0.
AMAX_FLOOR = 1e-30

_BACKENDS = ("scaled_mm", "simulated")
_forced_backend: Optional[str] = None


class FP8ShapeError(ValueError):
    """A tensor cannot be quantised / multiplied in FP8 because of its shape."""


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------
def _cuda_fp8_supported(device: Optional[torch.device] = None) -> bool:
    if not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")):
        return False
    try:
        major, minor = torch.cuda.get_device_capability(device)
    except Exception:  # pragma: no cover - odd driver states
        return False
    return (major, minor) >= (8, 9)


def fp8_backend(device: Optional[torch.device | str] = None) -> str:
    """The GEMM backend used for tensors on ``device``: ``"scaled_mm"`` or ``"simulated"``.

    Without ``device``: the backend a CUDA tensor would get on this machine (``"simulated"``
    when there is no FP8-capable GPU). CPU tensors are always ``"simulated"``.
    ``set_fp8_backend("simulated")`` forces the simulation everywhere.
    """
    if _forced_backend == "simulated":
        return "simulated"
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return "simulated"
    return "scaled_mm" if _cuda_fp8_supported(device) else "simulated"


def set_fp8_backend(name: Optional[str]) -> None:
    """Force a backend: ``"simulated"`` (everywhere), ``"scaled_mm"`` (error if unsupported),
    or ``None`` to choose automatically (the default)."""
    global _forced_backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown fp8 backend {name!r}; expected one of {_BACKENDS} or None")
    if name == "scaled_mm" and not _cuda_fp8_supported():
        raise RuntimeError("fp8 backend 'scaled_mm' needs a CUDA GPU with sm_89+ and torch._scaled_mm")
    _forced_backend = None if name == "scaled_mm" else name


# ---------------------------------------------------------------------------------------------
# quantisation (internal versions keep the padding; public versions slice it off)
# ---------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ≥ scale (exact, via frexp: scale = m·2^e with m in [0.5, 1))."""
    m, e = torch.frexp(scale)
    e = e - (m == 0.5).to(e.dtype)
    return torch.ldexp(torch.ones_like(scale), e)


def _scales_from_amax(amax: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    scale = amax.clamp_min(AMAX_FLOOR) / E4M3_MAX
    return _pow2_ceil(scale) if pow2_scales else scale


def _to_fp8(t: torch.Tensor) -> torch.Tensor:
    # the clamp guards the cast (out-of-range values would become NaN in e4m3fn); |t| ≤ 448 up to
    # one ulp of the division anyway. NaN passes through clamp and stays NaN.
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _quantize_lastdim(x: torch.Tensor, pow2_scales: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """1×128 tiles along the last dim. Returns (q [..., Kp] fp8 with Kp = ceil(K/128)·128,
    scales [..., Kp/128] fp32)."""
    if x.dim() == 0:
        raise FP8ShapeError("quantize_act needs at least one dimension, got a 0-d tensor")
    k = x.shape[-1]
    nk = max(1, _ceil_div(k, TILE))
    kp = nk * TILE
    xf = x.float()
    if kp != k:
        xf = F.pad(xf, (0, kp - k))
    t = xf.reshape(*x.shape[:-1], nk, TILE)
    scale = _scales_from_amax(t.abs().amax(dim=-1, keepdim=True), pow2_scales)
    q = _to_fp8(t / scale)
    return q.reshape(*x.shape[:-1], kp), scale.squeeze(-1)


def _quantize_blocks(w: torch.Tensor, pow2_scales: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """128×128 blocks over the last two dims. Returns (q [..., Mp, Np] fp8 padded,
    scales [..., Mp/128, Np/128] fp32)."""
    if w.dim() < 2:
        raise FP8ShapeError(
            f"quantize_weight needs a tensor with ≥2 dims [..., out, in], got shape {tuple(w.shape)}"
        )
    m, n = w.shape[-2], w.shape[-1]
    mb, nb = max(1, _ceil_div(m, TILE)), max(1, _ceil_div(n, TILE))
    mp, np_ = mb * TILE, nb * TILE
    wf = w.float()
    if (mp, np_) != (m, n):
        wf = F.pad(wf, (0, np_ - n, 0, mp - m))
    lead = w.shape[:-2]
    t = wf.reshape(*lead, mb, TILE, nb, TILE)
    amax = t.abs().amax(dim=(-3, -1))  # [..., mb, nb]
    scale = _scales_from_amax(amax, pow2_scales)
    q = _to_fp8(t / scale[..., :, None, :, None])
    return q.reshape(*lead, mp, np_), scale


def quantize_act(x: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x [..., K]`` to E4M3 per 1×128 tile along the last dim.

    Returns ``(q, scales)``: ``q`` has ``x``'s shape and dtype float8_e4m3fn; ``scales`` is fp32
    ``[..., ceil(K/128)]`` with ``x ≈ dequantize_act(q, scales)``. A last dim that is not a
    multiple of 128 is zero-padded internally (the last tile is partial).
    """
    q, s = _quantize_lastdim(x, pow2_scales)
    k = x.shape[-1]
    if q.shape[-1] != k:
        q = q[..., :k].contiguous()
    return q, s


def quantize_weight(w: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight ``[..., out, in]`` to E4M3 per 128×128 block of the last two dims.

    Returns ``(q, scales)``: ``q`` has ``w``'s shape (float8_e4m3fn); ``scales`` fp32
    ``[..., ceil(out/128), ceil(in/128)]`` (== DeepSeek's ``weight_scale_inv``). Leading dims
    (e.g. experts ``[E, out, in]``) are independent. Partial edge blocks are zero-padded.
    """
    q, s = _quantize_blocks(w, pow2_scales)
    m, n = w.shape[-2], w.shape[-1]
    if q.shape[-2:] != (m, n):
        q = q[..., :m, :n].contiguous()
    return q, s


def dequantize_act(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_act`: ``q [..., K]`` fp8 and ``scales [..., ceil(K/128)]``."""
    k = q.shape[-1]
    nk = max(1, _ceil_div(k, TILE))
    if tuple(scales.shape) != (*q.shape[:-1], nk):
        raise FP8ShapeError(
            f"activation scales must have shape {(*q.shape[:-1], nk)} for q of shape "
            f"{tuple(q.shape)}, got {tuple(scales.shape)}"
        )
    qf = q.float()
    if nk * TILE != k:
        qf = F.pad(qf, (0, nk * TILE - k))
    x = (qf.reshape(*q.shape[:-1], nk, TILE) * scales.float().unsqueeze(-1)).reshape(*q.shape[:-1], nk * TILE)
    return x[..., :k].to(dtype)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: ``q [..., out, in]`` fp8, ``scales [..., ⌈out/128⌉, ⌈in/128⌉]``."""
    if q.dim() < 2:
        raise FP8ShapeError(f"dequantize_weight needs ≥2 dims, got shape {tuple(q.shape)}")
    m, n = q.shape[-2], q.shape[-1]
    mb, nb = max(1, _ceil_div(m, TILE)), max(1, _ceil_div(n, TILE))
    lead = q.shape[:-2]
    if tuple(scales.shape) != (*lead, mb, nb):
        raise FP8ShapeError(
            f"weight scales must have shape {(*lead, mb, nb)} for q of shape {tuple(q.shape)}, "
            f"got {tuple(scales.shape)}"
        )
    qf = q.float()
    if (mb * TILE, nb * TILE) != (m, n):
        qf = F.pad(qf, (0, nb * TILE - n, 0, mb * TILE - m))
    w = qf.reshape(*lead, mb, TILE, nb, TILE) * scales.float()[..., :, None, :, None]
    return w.reshape(*lead, mb * TILE, nb * TILE)[..., :m, :n].to(dtype)


# ---------------------------------------------------------------------------------------------
# blockwise-scaled GEMM: C[M, N] = Σ_k (A_k · a_s[:, k]) (B_k · b_s[:, k])ᵀ, fp32 accumulation
# ---------------------------------------------------------------------------------------------
def _dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q [R, Kp] fp8 (Kp multiple of 128), s [R, Kp/128] → fp32 [R, Kp]."""
    r, kp = q.shape
    return (q.float().view(r, kp // TILE, TILE) * s.unsqueeze(-1)).view(r, kp)


def _gemm_simulated(a_q, a_s, b_q, b_s) -> torch.Tensor:
    return _dequant_rows(a_q, a_s) @ _dequant_rows(b_q, b_s).t()


def _pad_rows_fp8(q: torch.Tensor, s: torch.Tensor, multiple: int):
    r = q.shape[0]
    rp = _ceil_div(r, multiple) * multiple
    if rp == r:
        return q, s
    # zero-fill / copy through uint8 views (byte-exact, no dependence on fp8 fill kernels)
    qp = torch.zeros(rp, q.shape[1], dtype=torch.uint8, device=q.device)
    qp[:r] = q.view(torch.uint8)
    qp = qp.view(q.dtype)
    sp = torch.zeros(rp, s.shape[1], dtype=s.dtype, device=s.device)
    sp[:r] = s
    return qp, sp


def _gemm_scaled_mm(a_q, a_s, b_q, b_s) -> torch.Tensor:  # pragma: no cover - needs sm_89+
    """One torch._scaled_mm per 128-wide K chunk (fp8 × fp8 → fp32 with unit scales), the
    chunk's scales applied as an outer product and accumulated in fp32 ("promotion every 128")."""
    m, n = a_q.shape[0], b_q.shape[0]
    a_q, a_s = _pad_rows_fp8(a_q, a_s, 16)  # _scaled_mm wants M, N multiples of 16
    b_q, b_s = _pad_rows_fp8(b_q, b_s, 16)
    one = torch.ones((), dtype=torch.float32, device=a_q.device)
    out = torch.zeros(a_q.shape[0], b_q.shape[0], dtype=torch.float32, device=a_q.device)
    for k in range(a_s.shape[1]):
        sl = slice(k * TILE, (k + 1) * TILE)
        a_k = a_q[:, sl].contiguous()  # row-major
        b_k = b_q[:, sl].contiguous().t()  # column-major [128, N]
        part = torch._scaled_mm(a_k, b_k, scale_a=one, scale_b=one, out_dtype=torch.float32)
        out.addcmul_(part, a_s[:, k : k + 1] * b_s[:, k].unsqueeze(0))
    return out[:m, :n]


def _gemm(a_q, a_s, b_q, b_s) -> torch.Tensor:
    """A [M, Kp] fp8 with per-row-per-128 scales a_s [M, Kp/128]; B [N, Kp] likewise.
    Returns fp32 A_deq · B_deqᵀ (autocast disabled: the fp32 accumulation is the point)."""
    m, n = a_q.shape[0], b_q.shape[0]
    if m == 0 or n == 0:  # e.g. an expert that received no tokens
        return torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    with torch.autocast(a_q.device.type, enabled=False):
        if fp8_backend(a_q.device) == "scaled_mm":
            return _gemm_scaled_mm(a_q, a_s, b_q, b_s)
        return _gemm_simulated(a_q, a_s, b_q, b_s)


def _block_to_row_scales(s_blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """[Rb, Kb] block scales → [rows, Kb] per-row scales (each block row repeated 128×)."""
    return s_blocks.repeat_interleave(TILE, dim=0)[:rows]


# ---------------------------------------------------------------------------------------------
# the FP8 linear
# ---------------------------------------------------------------------------------------------
class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pow2_scales, x_fp8=None):
        if weight.dim() != 2:
            raise FP8ShapeError(f"fp8_linear weight must be 2-D [out, in], got {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        if x.dim() == 0 or x.shape[-1] != in_f:
            raise FP8ShapeError(
                f"fp8_linear input last dim must equal weight in_features={in_f}, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_f)

        # Fprop: x 1×128 along `in`, W 128×128 blocks (or x's tiles as they came off the wire)
        xq, xs = _quantize_lastdim(x2, pow2_scales) if x_fp8 is None else _padded_tiles(*x_fp8)
        wq, ws = _quantize_blocks(weight, pow2_scales)  # [outP, inP], [outP/128, inP/128]
        y = _gemm(xq, xs, wq, _block_to_row_scales(ws, wq.shape[0]))
        if y.shape[1] != out_f:  # drop the tile padding's storage too: a consumer may save y
            y = y[:, :out_f].contiguous()
        if bias is not None:
            y = y + bias.float()
            ctx.bias_dtype = bias.dtype

        saved_xt = ()
        if ctx.needs_input_grad[1]:
            # Wgrad operand: x quantised 128×1 (along tokens), i.e. 1×128 tiles of xᵀ [in, T],
            # kept without the tile padding (re-padded in backward): fp8_saved_input_bytes
            saved_xt = quantize_act(x2.t(), pow2_scales)
        ctx.save_for_backward(weight, *saved_xt)
        ctx.pow2_scales = pow2_scales
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return y.to(x.dtype).reshape(*lead, out_f)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        weight, *saved_xt = ctx.saved_tensors
        out_f, in_f = weight.shape
        p2 = ctx.pow2_scales
        dy2 = dy.reshape(-1, out_f)
        dx = dw = db = None

        if ctx.needs_input_grad[0]:
            # Dgrad: dx[T, in] = dy[T, out] · W[out, in]; inner dim = out.
            # dy 1×128 along `out`; W blocks (the same 128×128 blocks, read transposed).
            dyq, dys = _quantize_lastdim(dy2, p2)  # [T, outP]
            wq, ws = _quantize_blocks(weight, p2)
            wq_t = wq.t()  # [inP, outP]
            dx = _gemm(dyq, dys, wq_t.contiguous(), _block_to_row_scales(ws.t(), wq_t.shape[0]))
            dx = dx[:, :in_f].to(ctx.x_dtype).reshape(ctx.x_shape)

        if ctx.needs_input_grad[1]:
            # Wgrad: dW[out, in] = dyᵀ[out, T] · x[T, in]; inner dim = tokens.
            # dy and x both quantised 128×1 (128 tokens × 1 channel) = 1×128 tiles of their transposes.
            xtq, xts = _padded_tiles(*saved_xt)
            dytq, dyts = _quantize_lastdim(dy2.t(), p2)  # [out, TP]
            dw = _gemm(dytq, dyts, xtq, xts).to(weight.dtype)

        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.bias_dtype)

        return dx, dw, db, None, None


def _padded_tiles(q: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """quantize_act's (q [T, K], scales) → the GEMM's padded operand [T, ceil(K/128)·128]."""
    pad = s.shape[-1] * TILE - q.shape[-1]
    if pad:
        qp = torch.zeros(q.shape[0], q.shape[1] + pad, dtype=torch.uint8, device=q.device)
        qp[:, : q.shape[1]] = q.view(torch.uint8)
        q = qp.view(q.dtype)
    return q, s.float()


def fp8_saved_input_bytes(rows: float, in_features: int) -> float:
    """Bytes an FP8 linear keeps for backward of its input [rows, in_features]: the Wgrad operand
    xᵀ in E4M3 (1 byte an element, no padding) and one fp32 scale per 128×1 tile (128 rows × 1
    channel). Nothing else: no fp32/bf16 copy of the input (the weight it also saves is the
    parameter itself). Plain arithmetic: the planner (parallel/activations.py) counts with it."""
    if rows <= 0:
        return 0.0
    return rows * in_features + 4 * in_features * _ceil_div(math.ceil(rows), TILE)


def fp8_linear_prequantized(x: torch.Tensor, x_fp8: Tuple[torch.Tensor, torch.Tensor],
                            weight: torch.Tensor) -> torch.Tensor:
    """:func:`fp8_linear` whose Fprop takes ``x`` already quantised: ``x_fp8 = quantize_act(x)``
    (E4M3 [T, in] and scales [T, ⌈in/128⌉], e.g. an FP8 all-to-all payload), with ``x [T, in]`` its
    dequantised value (for autograd and the Wgrad operand). Saves quantising the same tiles twice."""
    return _FP8LinearFn.apply(x, weight, None, False, x_fp8)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pow2_scales: bool = False,
) -> torch.Tensor:
    """``y = x Wᵀ + b`` with fine-grained FP8 (E4M3) operands in all three GEMMs.

    ``x [..., in]`` (leading dims flattened), ``weight [out, in]``, ``bias [out]``. Output dtype =
    ``x.dtype``; gradients have the dtypes of ``x``/``weight``/``bias``. Not twice differentiable.
    """
    return _FP8LinearFn.apply(x, weight, bias, pow2_scales)


class FP8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same ``weight``/``bias`` parameters and state-dict keys) whose
    forward runs :func:`fp8_linear`. Parameters stay in their own dtype (fp32 master weights)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 pow2_scales: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scales = pow2_scales

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scales: bool = False) -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.register_parameter("weight", linear.weight)
        new.register_parameter("bias", linear.bias)
        new.pow2_scales = pow2_scales
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.pow2_scales)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3 1x128/128x128, pow2_scales={self.pow2_scales}"
