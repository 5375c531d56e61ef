"""CPUEMA: fp32 CPU EMA of the parameters, arithmetic in a background thread."""
import threading

import pytest
import torch
import torch.nn as nn

from trainer.ema import CPUEMA


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _perturb(model, step):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)))


def test_matches_python_reference():
    model = _model()
    decay = 0.9
    ema = CPUEMA(model, decay=decay)
    ref = {n: [float(v) for v in p.detach().flatten()] for n, p in model.named_parameters()}
    for step in range(12):
        _perturb(model, step)
        ema.update(model)
        for n, p in model.named_parameters():  # plain-python reference (float64)
            ref[n] = [decay * e + (1 - decay) * float(v) for e, v in zip(ref[n], p.detach().flatten())]
    ema.wait()
    shadow = ema.shadow()
    assert ema.num_updates == 12
    for n, p in model.named_parameters():
        got = shadow[n]
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == p.shape
        torch.testing.assert_close(got.flatten().double(), torch.tensor(ref[n], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)
    ema.close()


def test_per_call_decay_override():
    model = _model()
    ema = CPUEMA(model, decay=0.999)
    _perturb(model, 0)
    ema.update(model, decay=0.0)  # ema := params
    ema.wait()
    for n, p in model.named_parameters():
        assert torch.equal(ema.shadow()[n], p.detach())
    ema.close()


def test_update_is_async_and_wait_makes_it_consistent():
    model = _model()
    ema = CPUEMA(model, decay=0.5)
    gate, started = threading.Event(), threading.Event()
    orig_apply = ema._apply

    def slow_apply(snap, d):
        started.set()
        assert gate.wait(timeout=30)
        orig_apply(snap, d)

    ema._apply = slow_apply
    before = {n: t.clone() for n, t in ema._shadow.items()}
    _perturb(model, 1)
    ema.update(model)  # must return while the math is blocked
    assert started.wait(timeout=30)
    for n, t in ema._shadow.items():  # math not done yet
        assert torch.equal(t, before[n])
    gate.set()
    ema.wait()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema._shadow[n], 0.5 * before[n] + 0.5 * p.detach())
    ema.close()


def test_snapshot_semantics_params_modified_right_after_update():
    model = _model()
    ema = CPUEMA(model, decay=0.5)
    gate = threading.Event()
    orig_apply = ema._apply
    ema._apply = lambda snap, d: (gate.wait(timeout=30), orig_apply(snap, d))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    _perturb(model, 3)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update(model)
    with torch.no_grad():  # "optimizer step" overwrites params before the math has run
        for p in model.parameters():
            p.mul_(-7.0).add_(1000.0)
    gate.set()
    ema.wait()
    for n in init:
        torch.testing.assert_close(ema._shadow[n], 0.5 * init[n] + 0.5 * snapshot[n])
    ema.close()


def test_state_dict_round_trip():
    model = _model()
    ema = CPUEMA(model, decay=0.99)
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
    sd = ema.state_dict()  # waits
    assert sd["num_updates"] == 3 and sd["decay"] == 0.99
    ema2 = CPUEMA(_model(seed=5), decay=0.5)
    ema2.load_state_dict(sd)
    assert ema2.decay == 0.99 and ema2.num_updates == 3
    for n, t in sd["shadow"].items():
        assert torch.equal(ema2.shadow()[n], t)
    # state_dict tensors are copies: later updates do not change a saved state dict
    saved = {n: t.clone() for n, t in sd["shadow"].items()}
    _perturb(model, 9)
    ema.update(model)
    ema.wait()
    for n in saved:
        assert torch.equal(sd["shadow"][n], saved[n])
    bad = {"shadow": {"nope": torch.zeros(1)}}
    with pytest.raises(KeyError):
        ema2.load_state_dict(bad)
    ema.close()
    ema2.close()


def test_swapped_into_and_copy_to():
    model = _model()
    ema = CPUEMA(model, decay=0.5)
    for step in range(4):
        _perturb(model, step)
        ema.update(model)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    shadow = {n: t.clone() for n, t in ema.state_dict()["shadow"].items()}
    with ema.swapped_into(model):
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), shadow[n])
        assert torch.is_grad_enabled()  # the context does not leak no_grad into the body
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), orig[n])  # restored bit-exactly
    with pytest.raises(ZeroDivisionError):
        with ema.swapped_into(model):
            1 / 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), orig[n])  # restored on exception too
    other = _model(seed=7)
    ema.copy_to(other)
    for n, p in other.named_parameters():
        assert torch.equal(p.detach(), shadow[n])
    ema.close()


def test_partial_model_keys_and_name_checks():
    """A pipeline stage holds only part of the model: keys are whatever names it is given."""
    model = _model()
    stage = dict(model.named_parameters())
    stage = {f"layers.{n}": p for n, p in stage.items() if n.startswith("2.")}
    ema = CPUEMA(stage, decay=0.9)
    assert set(ema.shadow()) == {"layers.2.weight", "layers.2.bias"}
    ema.update(stage)
    ema.update(list(stage.items()))
    with pytest.raises(KeyError):
        ema.update(model)  # different names
    ema.wait()
    with pytest.raises(KeyError):
        ema.copy_to({"unknown": torch.zeros(1)})
    ema.close()


def test_close_and_errors():
    model = _model()
    with CPUEMA(model) as ema:
        ema.update(model)
        thread = ema._thread
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        ema.update(model)
    ema.close()  # idempotent
    # a failure in the worker surfaces in wait()
    ema = CPUEMA(model)
    ema._apply = lambda snap, d: (_ for _ in ()).throw(ValueError("boom"))
    ema.update(model)
    with pytest.raises(RuntimeError, match="background"):
        ema.wait()
    ema.close()


def test_bf16_params_keep_fp32_ema():
    model = _model().to(torch.bfloat16)
    ema = CPUEMA(model, decay=0.5)
    for n, t in ema.shadow().items():
        assert t.dtype == torch.float32
    ema.update(model)
    ema.wait()
    ema.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshot_pinned_and_async():
    model = _model().cuda()
    ema = CPUEMA(model, decay=0.5)
    assert all(b.is_pinned() for b in ema._snap.values())
    init = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    _perturb_cuda = {n: p.detach().cpu() + 1.0 for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    with torch.no_grad():  # overwritten right after update(): stream order protects the snapshot
        for p in model.parameters():
            p.zero_()
    ema.wait()
    for n in init:
        torch.testing.assert_close(ema.shadow()[n], 0.5 * init[n] + 0.5 * _perturb_cuda[n])
    ema.close()
