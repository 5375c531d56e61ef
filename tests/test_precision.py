"""`precision` (fp32 | bf16 | fp8) through trainer.precision.apply_precision and the trainer.

On CPU FP8 is an exact simulation (quantise → dequantise → fp32 GEMM); bf16 runs on CPU too
(BF16 weights, fp32 compute: model/mixed.py; tests/test_mixed_precision.py holds its checks).
GPU-only checks skip without CUDA.
"""
from __future__ import annotations

import json


import pytest
import torch
from torch import nn

from model import ConfigError, DeepSeekV3, ModelConfig
from model.layers import RMSNorm
from model.moe import Experts, Router
from tests.helpers import preset_model_cfg, run_cli, train_in_process
from trainer.precision import apply_precision, autocast_for, check_precision, numerics_for

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return preset_model_cfg("tiny")


@pytest.fixture(scope="module")
def tokens(tiny_cfg) -> torch.Tensor:
    return torch.randint(0, tiny_cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))


def _model(cfg: ModelConfig) -> DeepSeekV3:
    model = DeepSeekV3(cfg)
    model.init_weights(0)
    return model


def _fp8_flags(model: nn.Module) -> dict[str, bool]:
    return {name: bool(getattr(m, "fp8", False)) for name, m in model.named_modules() if name}


# ------------------------------------------------------------------ apply_precision
def test_fp32_changes_nothing(tiny_cfg):
    model = _model(tiny_cfg)
    autocast = apply_precision(model, "fp32", "cpu")
    assert not any(_fp8_flags(model).values())
    with autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_fp8_flags_land_on_projections_only(tiny_cfg):
    model = _model(tiny_cfg)
    autocast = apply_precision(model, "fp8", "cpu")
    flags = _fp8_flags(model)
    on = {n for n, f in flags.items() if f}
    # attention projections (every layer and the MTP block), dense MLP, shared and routed experts
    for name in ("layers.0.attn.wq_a", "layers.0.attn.wq_b", "layers.0.attn.wkv_a", "layers.0.attn.wkv_b",
                 "layers.0.attn.wo", "layers.0.ffn.w1", "layers.0.ffn.w2", "layers.0.ffn.w3",
                 "layers.1.ffn.experts", "layers.1.ffn.shared_experts.w1", "layers.1.ffn.shared_experts.w2",
                 "layers.2.attn.wkv_b", "layers.2.ffn.experts", "mtp.0.block.attn.wo", "mtp.0.block.ffn.experts"):
        assert name in on, name
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if name == "head" or isinstance(mod, (nn.Embedding, RMSNorm, Router)):
            assert not flags.get(name), name
    assert not flags["head"] and not flags["embed"]
    assert not any(flags[n] for n, m in modules.items() if isinstance(m, Router))
    n_experts = sum(isinstance(m, Experts) for m in modules.values())
    assert n_experts >= 2 and all(flags[n] for n, m in modules.items() if isinstance(m, Experts))
    # master weights stay fp32; on CPU there is no autocast (the simulation is fp32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_fp8_forward_loss_close_to_fp32_at_init(tiny_cfg, tokens):
    ref_model, fp8_model = _model(tiny_cfg), _model(tiny_cfg)
    autocast = apply_precision(fp8_model, "fp8", "cpu")
    ref = ref_model(tokens[:, :-1], tokens[:, 1:])
    with autocast():
        out = fp8_model(tokens[:, :-1], tokens[:, 1:])
    assert torch.isfinite(out.loss)
    assert not torch.equal(out.loss, ref.loss), "fp8 should not be a no-op"
    assert out.lm_loss.item() == pytest.approx(ref.lm_loss.item(), rel=0.03)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=0.03)
    out.loss.backward()
    grads = [p.grad for p in fp8_model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_unknown_precision_is_refused():
    # bf16 on CPU used to be refused here; it now runs (BF16 storage, fp32 compute: model/mixed.py)
    check_precision("bf16", "cpu")
    with pytest.raises(ConfigError, match="precision"):
        check_precision("fp16", "cpu")


@requires_cuda
def test_bf16_and_fp8_autocast_on_cuda(tiny_cfg, tokens):  # pragma: no cover - GPU only
    for precision in ("bf16", "fp8"):
        model = _model(tiny_cfg).cuda()
        autocast = apply_precision(model, precision, "cuda")
        with autocast():
            assert torch.is_autocast_enabled("cuda")
            out = model(tokens[:, :-1].cuda(), tokens[:, 1:].cuda())
        out.loss.backward()
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
        assert torch.isfinite(out.loss)


@requires_cuda
def test_bf16_weights_on_cuda(tiny_cfg, tokens):  # pragma: no cover - GPU only
    """Built for bf16/fp8: BF16 weights, native BF16 GEMMs under autocast, fp32 main_grad, no .grad."""
    from parallel.grads import grad_of

    for precision in ("bf16", "fp8"):
        model = DeepSeekV3(tiny_cfg, numerics=numerics_for(precision)).cuda()
        with autocast_for(precision, "cuda")():
            out = model(tokens[:, :-1].cuda(), tokens[:, 1:].cuda())
        out.loss.backward()
        assert torch.isfinite(out.loss)
        for p in model.parameters():
            assert p.dtype == torch.bfloat16 and p.grad is None and grad_of(p).dtype == torch.float32


# ------------------------------------------------------------------ through the trainer
@pytest.fixture(scope="module")
def fp32_rows(tmp_path_factory):
    return train_in_process(["train.steps=3", f"run.dir={tmp_path_factory.mktemp('fp32')}"])


def test_fp8_training_run_close_to_fp32(tmp_path, fp32_rows):
    rows = train_in_process(["train.steps=3", "precision=fp8", f"run.dir={tmp_path}"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(fp32_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] > 0
    assert any(a["loss"] != b["loss"] for a, b in zip(fp32_rows, rows)), "fp8 run identical to fp32?"


def test_bf16_on_cpu_cli_runs(tmp_path):
    """Was: refused with one error line (CPU runs were fp32). bf16 now runs on CPU (BF16 storage,
    fp32 GEMMs), so the CLI trains and logs BF16-sized weights."""
    res = run_cli([f"run.dir={tmp_path}", "precision=bf16", "train.steps=1"], timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["param_bytes"] * 2 == row["grad_bytes"]
