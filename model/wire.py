"""Number formats of the expert all-to-all payloads (`parallel.a2a_dtype`), and their rounding.

The expert-parallel dispatchers (parallel/dispatch.py, parallel/two_hop.py) send rows in a wire
format; `LocalDispatcher` (model/moe.py) sends nothing but applies exactly the same rounding at
the same points, so that one process computes what every EP layout computes.

Formats: ``fp32`` (4·dim bytes a row), ``bf16`` (2·dim) and ``fp8`` (E4M3 with one fp32 scale per
1×128 tile, as model/fp8.py's activations: dim + 4·⌈dim/128⌉ bytes). The FP8 payload IS the
expert's quantised GEMM input (`Experts.forward(x, counts, x_fp8=...)`), never quantised twice.

`Wire(dispatch, combine, backward)`: the format of dispatch rows, of combine rows, and of every
gradient exchanged in backward. `resolve_wire("auto", precision)` is the paper's choice under
``precision=fp8`` (dispatch FP8, combine and backward BF16) and the activation dtype otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from model.fp8 import dequantize_act, quantize_act

A2A_DTYPES = ("auto", "fp32", "bf16", "fp8")
WIRE_FORMATS = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class Wire:
    dispatch: str = "fp32"
    combine: str = "fp32"
    backward: str = "fp32"

    @property
    def exact(self) -> bool:
        """True when nothing is rounded (every format fp32)."""
        return self.dispatch == self.combine == self.backward == "fp32"


FP32 = Wire()


def resolve_wire(a2a_dtype: str, precision: str) -> Wire:
    """`parallel.a2a_dtype` (+ `precision` for auto) → Wire. Raises ValueError on unknown names."""
    if a2a_dtype not in A2A_DTYPES:
        raise ValueError(f"parallel.a2a_dtype: expected {'|'.join(A2A_DTYPES)}, got {a2a_dtype!r}")
    if a2a_dtype == "auto":
        if precision == "fp8":
            return Wire("fp8", "bf16", "bf16")
        return Wire("bf16", "bf16", "bf16") if precision == "bf16" else FP32
    if a2a_dtype == "fp32":
        return FP32
    return Wire(a2a_dtype, "bf16", "bf16")  # an FP8 combine would lose too much: the paper keeps BF16


def encode(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    """Rows x [R, dim] → the tensors that travel (no autograd): (x,), (bf16,), or (E4M3, scales)."""
    x = x.detach()
    if fmt == "fp32":
        return (x.float(),)
    if fmt == "bf16":
        return (x.to(torch.bfloat16),)
    return quantize_act(x)


def decode(parts: tuple[torch.Tensor, ...], fmt: str) -> torch.Tensor:
    """Inverse of `encode`, to fp32."""
    if fmt == "fp8":
        return dequantize_act(*parts)
    return parts[0].float()


def round_to(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The values x takes after a trip through the wire format (no autograd)."""
    return x if fmt == "fp32" else decode(encode(x, fmt), fmt).to(x.dtype)


class _RoundTrip(torch.autograd.Function):
    """Forward: x rounded to `fwd`; backward: the gradient rounded to `bwd` (what an exchange does
    to a row and to its gradient; the rounding's own derivative is taken as identity)."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        ctx.bwd = bwd
        return round_to(x, fwd)

    @staticmethod
    def backward(ctx, g):
        return round_to(g, ctx.bwd), None, None


def round_trip(x: torch.Tensor, fwd: str, bwd: str) -> torch.Tensor:
    if fwd == "fp32" and bwd == "fp32":
        return x
    return _RoundTrip.apply(x, fwd, bwd)


def encode_rows(x: torch.Tensor, fmt: str, bwd: str) -> tuple[torch.Tensor, Optional[tuple]]:
    """(x as the receiver will see it, with autograd; the FP8 tiles when fmt is fp8, else None).

    Encoding happens once per token at the source; the FP8 parts then travel as they are (the
    forwarding rank of two_hop does not re-quantise)."""
    if fmt != "fp8":
        return round_trip(x, fmt, bwd), None
    parts = encode(x, fmt)
    xd = _Straight.apply(x, decode(parts, fmt), bwd)
    return xd, parts


class _Straight(torch.autograd.Function):
    """Forward returns the precomputed rounded value; backward passes the gradient (rounded to
    `bwd`) straight through."""

    @staticmethod
    def forward(ctx, x, rounded, bwd):
        ctx.bwd = bwd
        return rounded.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return round_to(g, ctx.bwd), None, None
