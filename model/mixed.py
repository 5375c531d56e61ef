"""Mixed-precision weights: how a model stores its weights, and the one way compute reads them.

``Numerics`` is what ``DeepSeekV3(..., numerics=...)`` is built with (the trainer maps its
``precision`` key onto it with ``numerics_for``): the storage dtype of every parameter (FP32, or
BF16 as DeepSeek-V3 trains) and the FP8 switch of the projections the paper runs in FP8.

``weight(p)`` is the only way a module reads a parameter for compute. For an FP32 parameter it is
``p`` itself (fp32 runs are bit-identical to a plain model). For a BF16 parameter it is an FP32
copy (the CPU computes in fp32: BF16 storage, fp32 GEMMs; on CUDA the bf16 autocast casts it back
for native BF16 GEMMs, exactly, since the values are BF16) made by a small autograd Function whose
backward ADDS the fp32 weight gradient into ``p.main_grad`` (an fp32 tensor created on first use)
and returns nothing for the BF16 leaf: no BF16 ``.grad`` ever exists, gradients accumulate in FP32
over micro-batches and pipeline W passes (Megatron's ``main_grad`` / gradient-accumulation
fusion). Code that reads a gradient goes through ``parallel.grads.grad_of``.

A parameter read without ``weight()`` would get a BF16 ``.grad`` and no ``main_grad``; the tests
fail on that (tests/test_mixed_precision.py).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

MAIN_GRAD = "main_grad"  # the attribute of a low-precision parameter holding its fp32 gradient
COMPUTE_DTYPE = torch.float32  # what weight() returns, and the dtype of activations between stages
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# the pipeline runtime runs backward passes of a rank's two chunks in two threads, and those chunks
# share the embedding: accumulation into one main_grad must not interleave
_ACCUMULATE = threading.Lock()
# the live FP32 copies weight() made, by storage address: autograd saves them for backward, but
# they are weights, not activations (trainer/precision.py's meters leave them out)
_COPIES: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def is_weight_copy(t: torch.Tensor) -> bool:
    """True when `t` (or the tensor it views) is an FP32 copy of a weight made by weight()."""
    return _COPIES.get(t.untyped_storage().data_ptr()) is not None


@dataclass(frozen=True)
class Numerics:
    """How a model stores its weights (`param_dtype`) and whether its attention / MLP / expert
    projections run their GEMMs in fine-grained FP8 (`fp8`)."""

    param_dtype: torch.dtype = torch.float32
    fp8: bool = False


def numerics_for(precision: str) -> Numerics:
    """fp32: FP32 weights; bf16: BF16 weights; fp8: BF16 weights + FP8 projections."""
    return Numerics(PARAM_DTYPES[precision], precision == "fp8")


def is_low_precision(p: torch.Tensor) -> bool:
    """True for a parameter stored below the compute dtype (its gradient lives in main_grad)."""
    return p.dtype != COMPUTE_DTYPE and p.is_floating_point()


class _Upcast(torch.autograd.Function):
    """BF16 parameter → FP32 value; backward accumulates the FP32 gradient into param.main_grad."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        ctx.param = p  # not save_for_backward: a parameter, alive anyway; nothing is saved twice
        out = p.to(COMPUTE_DTYPE)
        if not out.is_meta:
            _COPIES[out.untyped_storage().data_ptr()] = out
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p = ctx.param
        with _ACCUMULATE:
            acc = getattr(p, MAIN_GRAD, None)
            if acc is None:
                setattr(p, MAIN_GRAD, grad.to(COMPUTE_DTYPE, copy=True))
            else:
                acc.add_(grad)
        return None


def weight(p: torch.Tensor) -> torch.Tensor:
    """What compute reads of parameter `p` (see the module docstring)."""
    if not is_low_precision(p):
        return p
    if p.requires_grad and torch.is_grad_enabled():
        return _Upcast.apply(p)
    return p.detach().to(COMPUTE_DTYPE)  # no graph: nothing saves it


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every floating parameter of `module` in `dtype` (buffers untouched: the router bias,
    RoPE tables and statistics stay fp32). Values are rounded to nearest (the seeded FP32
    initialisation, copied in later, rounds the same way on every layout)."""
    if dtype == torch.float32:
        return
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                mod._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
