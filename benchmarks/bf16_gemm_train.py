"""``launch.train`` with the FP8 GEMMs' E4M3 rounding replaced by BF16 rounding: a BF16-GEMM baseline.

    python -m benchmarks.bf16_gemm_train precision=fp8 <hydra overrides>

With ``precision=fp8`` the attention, MLP and expert projections run model/fp8.py's three
quantised GEMMs; here every operand is rounded to bfloat16 (unit scales) instead of scaled to
E4M3, with the same fp32 accumulation. Everything else is as in ``precision=fp8`` on CPU (fp32).
benchmarks/fp8_curve.py uses it (``--bf16-control``) because the paper's 0.25% is FP8 relative to
BF16, and because it separates "any low-precision rounding of these GEMMs" from "FP8's".
Benchmark-only: it patches model.fp8 in this process.
"""
from __future__ import annotations

import sys

import torch

import model.fp8 as fp8


def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


def _unit_scales(amax: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    return torch.ones_like(amax)


fp8._to_fp8 = _to_bf16  # q = bf16(x / 1): dequantised as q.float() * 1 by the simulated GEMM
fp8._scales_from_amax = _unit_scales

if __name__ == "__main__":
    from launch.errors import precheck_overrides
    from launch.train import CONFIG_DIR, main

    precheck_overrides(CONFIG_DIR, sys.argv[1:])
    main()
