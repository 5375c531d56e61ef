"""FP8-cached activations: what an FP8 linear (and the experts fed by an FP8 dispatch payload)
keeps for backward is the FP8 Wgrad operand and its 128×1 scales, never an fp32/bf16 copy of the
GEMM input — counted with trainer.precision.SavedActivations by dtype, and equal to
model.fp8.fp8_saved_input_bytes, the figure the planner (parallel/activations.py) uses."""
from __future__ import annotations

import pytest
import torch

from model.fp8 import FP8_DTYPE, fp8_linear, fp8_saved_input_bytes, quantize_act
from model.moe import Experts
from trainer.precision import SavedActivations

# rows: below one tile, exactly one, one and a bit (a partial 128×1 tile); in_f: < 128 and not a multiple
@pytest.mark.parametrize("rows,in_f", [(5, 64), (128, 96), (200, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_saves_only_fp8_tiles_and_scales(rows, in_f, dtype):
    x = torch.randn(rows, in_f, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(72, in_f, dtype=dtype) * 0.05)
    with SavedActivations(exclude=[w]) as meter:
        y = fp8_linear(x, w)
    by = meter.bytes_by_dtype()
    assert by.get(FP8_DTYPE) == rows * in_f  # xᵀ in E4M3, unpadded
    assert by.get(torch.float32) == 4 * in_f * -(-rows // 128)  # one scale per 128×1 tile
    assert torch.bfloat16 not in by and set(by) == {FP8_DTYPE, torch.float32}
    assert meter.bytes == fp8_saved_input_bytes(rows, in_f) < x.numel() * x.element_size()
    y.float().sum().backward()  # the unpadded operand still gives the gradients
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_fp8_linear_saved_operand_gives_the_same_weight_grad_as_the_padded_one():
    """Saving the Wgrad operand unpadded is only a storage change: dW equals the explicit
    128×1-quantised reference (dequantise xᵀ and dyᵀ tiles, fp32 matmul)."""
    torch.manual_seed(0)
    x = torch.randn(100, 64, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(48, 64) * 0.1)
    dy = torch.randn(100, 48)
    fp8_linear(x, w).backward(dy)
    from model.fp8 import dequantize_act

    xt = dequantize_act(*quantize_act(x.detach().t()))
    dyt = dequantize_act(*quantize_act(dy.t()))
    torch.testing.assert_close(w.grad, dyt @ xt.t(), rtol=0, atol=1e-6)


def test_fp8_experts_on_a_prequantised_payload_keep_no_fp32_copy_of_their_inputs():
    """Experts fed FP8 dispatch tiles: the dispatched rows (fp32, for autograd) and the SwiGLU
    output (w2's input) are never saved; every GEMM input is kept as FP8 + scales, and the total is
    Σ_experts 2·fp8(rows, dim) + fp8(rows, inter) + the fp32 SwiGLU operands (w1 out, silu, w3 out)."""
    torch.manual_seed(0)
    n_local, dim, inter = 4, 64, 32
    ex = Experts(n_local, dim, inter)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ex.fp8 = True
    counts = [7, 0, 150, 21]
    x = torch.randn(sum(counts), dim, requires_grad=True)
    tiles = quantize_act(x.detach())
    with SavedActivations(exclude=ex) as meter:
        y = ex(x, counts, tiles)
    by = meter.bytes_by_dtype()
    want_fp8 = sum(c * (2 * dim + inter) for c in counts)
    want = sum(2 * fp8_saved_input_bytes(c, dim) + fp8_saved_input_bytes(c, inter) + 3 * 4 * c * inter
               for c in counts if c)
    assert by[FP8_DTYPE] == want_fp8
    assert meter.bytes == want
    # no saved fp32 storage is as large as a GEMM input of an expert (its rows × dim, rows × inter)
    assert torch.bfloat16 not in by
    y.sum().backward()
    assert x.grad is not None


def test_fp32_experts_save_their_input_by_contrast():
    """Control: the same experts in fp32 keep the dispatched rows themselves (the meter sees them)."""
    ex = Experts(2, 64, 32)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(30, 64, requires_grad=True)
    with SavedActivations(exclude=ex) as meter:
        ex(x, [10, 20])
    assert meter.bytes_by_dtype()[torch.float32] >= x.numel() * 4
    assert FP8_DTYPE not in meter.bytes_by_dtype()
