"""Fine-grained FP8 (E4M3, 1×128 activation tiles, 128×128 weight blocks) and the FP8 linear."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model.fp8 as fp8
from model.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    FP8Linear,
    FP8ShapeError,
    dequantize_act,
    dequantize_weight,
    fp8_backend,
    fp8_linear,
    quantize_act,
    quantize_weight,
)

E4M3_MIN_NORMAL = 2.0 ** -6


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("pow2", [False, True])
def test_act_round_trip_relative_error_bound(pow2):
    x = torch.randn(16, 512) * torch.logspace(-3, 3, 16).unsqueeze(1)  # very different row scales
    x[:, 1::64] *= 1e-4  # values that land in the E4M3 subnormal range after scaling
    q, s = quantize_act(x, pow2_scales=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    xd = dequantize_act(q, s)
    # per element: values that are normal in E4M3 after scaling are within 2^-4 relative
    scaled = (x.view(16, 4, 128) / s.unsqueeze(-1)).view(16, 512)
    normal = scaled.abs() >= E4M3_MIN_NORMAL
    assert 0.9 < normal.float().mean() < 1.0
    rel = (xd - x).abs() / x.abs()
    assert rel[normal].max().item() <= 2.0 ** -4 + 1e-7
    # subnormal values: absolute error ≤ half the E4M3 subnormal spacing (2^-10) × scale
    sub_err = (xd - x).abs().view(16, 4, 128) / s.unsqueeze(-1)
    assert sub_err.view(16, 512)[~normal].max().item() <= 2.0 ** -10 + 1e-9
    # tile level: max |q| hits 448 in every tile (non-pow2 scales); error relative to tile amax
    amax = x.view(16, 4, 128).abs().amax(-1)
    tile_err = (xd - x).abs().view(16, 4, 128).amax(-1) / amax
    assert tile_err.max().item() <= 2.0 ** -4
    if not pow2:
        qmax = q.float().abs().view(16, 4, 128).amax(-1)
        assert torch.all(qmax == E4M3_MAX)
        torch.testing.assert_close(s, amax / E4M3_MAX)


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_round_trip_relative_error_bound(pow2):
    w = torch.randn(256, 384) * 0.02
    q, s = quantize_weight(w, pow2_scales=pow2)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.shape == (2, 3)
    wd = dequantize_weight(q, s)
    blocks = w.view(2, 128, 3, 128)
    if not pow2:
        torch.testing.assert_close(s, blocks.abs().amax(dim=(1, 3)) / E4M3_MAX)
    scaled = (blocks / s[:, None, :, None]).reshape(256, 384)
    normal = scaled.abs() >= E4M3_MIN_NORMAL
    rel = (wd - w).abs() / w.abs()
    assert rel[normal].max().item() <= 2.0 ** -4 + 1e-7
    assert _rel(wd, w) < 0.04


# ---------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("k", [1, 100, 128, 129, 300, 512])
def test_act_scale_shape_and_padding(k):
    x = torch.randn(2, 3, k)
    q, s = quantize_act(x)
    assert q.shape == x.shape
    assert s.shape == (2, 3, math.ceil(k / 128)) and s.dtype == torch.float32
    xd = dequantize_act(q, s)
    assert xd.shape == x.shape
    assert _rel(xd, x) < 0.05
    # the partial last tile is scaled by its own (unpadded) elements' amax
    last = x[..., (math.ceil(k / 128) - 1) * 128:]
    torch.testing.assert_close(s[..., -1], last.abs().amax(-1) / E4M3_MAX)


@pytest.mark.parametrize("shape", [(128, 128), (100, 300), (300, 129), (1, 7), (3, 200, 130)])
def test_weight_scale_shape_and_padding(shape):
    w = torch.randn(*shape)
    q, s = quantize_weight(w)
    assert q.shape == w.shape
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    wd = dequantize_weight(q, s)
    assert wd.shape == w.shape
    assert _rel(wd, w) < 0.05


def test_shape_errors():
    with pytest.raises(FP8ShapeError):
        quantize_weight(torch.randn(10))
    with pytest.raises(FP8ShapeError):
        quantize_act(torch.tensor(1.0))
    q, s = quantize_act(torch.randn(4, 256))
    with pytest.raises(FP8ShapeError):
        dequantize_act(q, s[:, :1])
    with pytest.raises(FP8ShapeError):
        fp8_linear(torch.randn(4, 100), torch.randn(8, 99))
    assert issubclass(FP8ShapeError, ValueError)


# ---------------------------------------------------------------------------------- isolation / zeros
def test_outlier_does_not_affect_other_tiles():
    x = torch.randn(4, 512)
    q0, s0 = quantize_act(x)
    y = x.clone()
    y[1, 130] = 1e4  # an outlier in tile (row 1, tile 1)
    q1, s1 = quantize_act(y)
    changed = torch.zeros(4, 4, dtype=torch.bool)
    changed[1, 1] = True
    assert torch.equal(s0[~changed], s1[~changed])
    assert s1[1, 1] > s0[1, 1]
    qv0, qv1 = q0.float().view(4, 4, 128), q1.float().view(4, 4, 128)
    assert torch.equal(qv0[~changed], qv1[~changed])
    # the same for weights: only the outlier's 128×128 block changes
    w = torch.randn(256, 256)
    wq0, ws0 = quantize_weight(w)
    w2 = w.clone()
    w2[200, 10] = 1e4  # block (1, 0)
    wq1, ws1 = quantize_weight(w2)
    assert ws1[1, 0] > ws0[1, 0]
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.equal(ws0[mask], ws1[mask])
    b0 = wq0.float().view(2, 128, 2, 128).permute(0, 2, 1, 3)
    b1 = wq1.float().view(2, 128, 2, 128).permute(0, 2, 1, 3)
    assert torch.equal(b0[mask], b1[mask])


def test_zero_tensor_gives_exact_zeros():
    for pow2 in (False, True):
        x = torch.zeros(3, 200)
        x[0, :128] = torch.randn(128)  # one non-zero tile next to zero tiles
        q, s = quantize_act(x, pow2_scales=pow2)
        assert torch.isfinite(s).all() and (s > 0).all()
        xd = dequantize_act(q, s)
        assert not torch.isnan(xd).any()
        assert torch.equal(xd[1:], torch.zeros(2, 200))
        assert torch.equal(xd[0, 128:], torch.zeros(72))
        wq, ws = quantize_weight(torch.zeros(130, 130), pow2_scales=pow2)
        assert torch.equal(dequantize_weight(wq, ws), torch.zeros(130, 130))
    # fp8_linear with zero input / zero grad: zeros, no NaN
    xz = torch.zeros(5, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    y = fp8_linear(xz, w)
    assert torch.equal(y, torch.zeros(5, 32))
    y.sum().backward()
    assert torch.isfinite(xz.grad).all() and torch.equal(w.grad, torch.zeros(32, 64))


def test_pow2_scales_are_powers_of_two():
    x = torch.randn(8, 384) * torch.logspace(-20, 20, 8).unsqueeze(1)
    _, s = quantize_act(x, pow2_scales=True)
    m, _ = torch.frexp(s)
    assert torch.all(m == 0.5)
    # rounded up: the pow2 scale is ≥ the exact scale and < 2× it; no element saturates wrongly
    exact = x.view(8, 3, 128).abs().amax(-1) / E4M3_MAX
    assert torch.all(s >= exact) and torch.all(s < 2 * exact)
    _, ws = quantize_weight(torch.randn(300, 300) * 3.7, pow2_scales=True)
    assert torch.all(torch.frexp(ws)[0] == 0.5)
    # an amax that is exactly 448·2^k gives scale exactly 2^k
    t = torch.zeros(1, 128)
    t[0, 0] = 448.0 * 2.0 ** -3
    _, s1 = quantize_act(t, pow2_scales=True)
    assert s1.item() == 2.0 ** -3


# ---------------------------------------------------------------------------------- fp8_linear
@pytest.mark.parametrize("shape_in,out_f,bias", [((4, 64, 256), 384, True), ((130, 200), 100, False)])
def test_fp8_linear_close_to_fp32(shape_in, out_f, bias):
    in_f = shape_in[-1]
    x = torch.randn(*shape_in, requires_grad=True)
    w = (torch.randn(out_f, in_f) / math.sqrt(in_f)).requires_grad_()
    b = torch.randn(out_f, requires_grad=True) if bias else None
    y = fp8_linear(x, w, b)
    y_ref = F.linear(x, w, b)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert _rel(y, y_ref) < 0.05
    g = torch.randn_like(y_ref)
    inputs = (x, w, b) if bias else (x, w)
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    for got, ref, t in zip(grads, grads_ref, inputs):
        assert got.shape == t.shape and got.dtype == t.dtype
        assert _rel(got, ref) < 0.05
    if bias:  # bias grad is an exact fp32 sum
        torch.testing.assert_close(grads[2], grads_ref[2])


def test_fp8_linear_matches_explicit_quantised_reference():
    """Simulation semantics: each GEMM is the fp32 product of the dequantised operands, with
    1×128 x / dy tiles (Fprop, Dgrad), 128×128 W blocks, and 128×1 (token-dim) tiles in Wgrad."""
    fp8.set_fp8_backend("simulated")
    try:
        x = torch.randn(200, 256, requires_grad=True)
        w = torch.randn(192, 256, requires_grad=True)
        y = fp8_linear(x, w)
        dy = torch.randn(200, 192)
        y.backward(dy)
    finally:
        fp8.set_fp8_backend(None)
    xd = dequantize_act(*quantize_act(x.detach()))
    wd = dequantize_weight(*quantize_weight(w.detach()))
    torch.testing.assert_close(y.detach(), xd @ wd.t(), rtol=1e-5, atol=1e-4)
    dyd = dequantize_act(*quantize_act(dy))
    torch.testing.assert_close(x.grad, dyd @ wd, rtol=1e-5, atol=1e-4)
    dyt = dequantize_act(*quantize_act(dy.t()))  # 128×1 tiles of dy
    xt = dequantize_act(*quantize_act(x.detach().t()))  # 128×1 tiles of x
    torch.testing.assert_close(w.grad, dyt @ xt.t(), rtol=1e-5, atol=1e-3)
    # and it is not the same as quantising along the other dimension (the tiling matters)
    wrong = dyd.t() @ xd
    assert not torch.allclose(w.grad, wrong, rtol=1e-6, atol=1e-6)


def test_fp8_linear_grad_dtypes_and_partial_requires_grad():
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)  # no grad for x
    w = torch.randn(24, 40, requires_grad=True)
    b = torch.zeros(24, requires_grad=True)
    y = fp8_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 24)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, torch.full((24,), 15.0))
    # frozen weight: only dx
    x2 = torch.randn(7, 40, requires_grad=True)
    w2 = torch.randn(24, 40)
    fp8_linear(x2, w2).sum().backward()
    assert x2.grad.shape == x2.shape and x2.grad.dtype == torch.float32


def test_fp8_linear_empty_input():
    """An expert that receives no tokens: empty output, zero weight grad, no NaN."""
    x = torch.zeros(0, 256, requires_grad=True)
    w = torch.randn(64, 256, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y = fp8_linear(x, w, b)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(64, 256)) and torch.equal(b.grad, torch.zeros(64))
    assert x.grad.shape == (0, 256)


def test_fp8_linear_under_autocast_keeps_fp32_gemm():
    x = torch.randn(16, 256)
    w = torch.randn(128, 256)
    ref = fp8_linear(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fp8_linear(x, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_fp8_linear_module_is_drop_in():
    torch.manual_seed(1)
    ref = nn.Linear(160, 96)
    mod = FP8Linear(160, 96)
    mod.load_state_dict(ref.state_dict())
    assert set(mod.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 9, 160)
    assert _rel(mod(x), ref(x)) < 0.05
    shared = FP8Linear.from_linear(ref)
    assert shared.weight is ref.weight and shared.bias is ref.bias
    torch.testing.assert_close(shared(x), mod(x))
    assert "FP8Linear" in repr(mod)


def test_fp8_linear_trains_like_fp32():
    """SGD on a small regression: the FP8 loss curve tracks the fp32 one."""
    curves = []
    for cls in (nn.Linear, FP8Linear):
        torch.manual_seed(2)
        x = torch.randn(256, 128)
        target = x @ torch.randn(128, 64) * 0.1
        mod = cls(128, 64, bias=False)
        opt = torch.optim.SGD(mod.parameters(), lr=0.5)
        losses = []
        for _ in range(30):
            loss = F.mse_loss(mod(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    ref, got = curves
    assert got[-1] < 0.5 * got[0]
    assert abs(got[-1] - ref[-1]) / ref[-1] < 0.02


def test_backend_selection():
    assert fp8_backend("cpu") == "simulated"
    assert fp8_backend() in ("simulated", "scaled_mm")
    fp8.set_fp8_backend("simulated")
    try:
        assert fp8_backend() == "simulated" and fp8_backend("cuda") == "simulated"
    finally:
        fp8.set_fp8_backend(None)
    with pytest.raises(ValueError):
        fp8.set_fp8_backend("bogus")


def test_no_torch_distributed_import():
    src = open(fp8.__file__).read()
    assert "torch.distributed" not in src.replace("never imports torch.distributed", "")


# ---------------------------------------------------------------------------------- CUDA
def _fp8_cuda():
    return torch.cuda.is_available() and fp8._cuda_fp8_supported()


@pytest.mark.skipif(not _fp8_cuda(), reason="needs a CUDA GPU with FP8 (sm_89+) and torch._scaled_mm")
def test_scaled_mm_backend_matches_simulation():
    assert fp8_backend("cuda") == "scaled_mm"
    dev = torch.device("cuda")
    x = torch.randn(3, 100, 640, device=dev, requires_grad=True)  # tokens not a multiple of 16
    w = (torch.randn(300, 640, device=dev) / 25).requires_grad_()
    b = torch.randn(300, device=dev, requires_grad=True)
    dy = torch.randn(3, 100, 300, device=dev)

    def run():
        for t in (x, w, b):
            t.grad = None
        y = fp8_linear(x, w, b)
        y.backward(dy)
        return y.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()

    got = run()
    fp8.set_fp8_backend("simulated")
    try:
        ref = run()
    finally:
        fp8.set_fp8_backend(None)
    for g, r in zip(got, ref):
        # same quantised operands; only the fp32 accumulation order differs
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    # and the bf16 input path
    xb = x.detach().bfloat16()
    yb = fp8_linear(xb, w.detach())
    assert yb.dtype == torch.bfloat16
    assert _rel(yb.float(), F.linear(xb.float(), w.detach())) < 0.05
