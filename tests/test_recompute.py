"""Activation recomputation (train.recompute = none | norm_and_up_proj | full).

Recompute must be numerically invisible (bit-identical losses and gradients), must actually
save activation memory (measured with trainer.precision.SavedActivations), and must not make the
MoE layers count routed tokens twice (the recomputed forward in backward re-routes every token).
"""
from __future__ import annotations

import pytest
import torch

from model import DeepSeekV3, ModelConfig
from tests.helpers import preset_model_cfg, train_in_process
from trainer.precision import SavedActivations, saved_activation_bytes

MODES = ("none", "norm_and_up_proj", "full")


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return preset_model_cfg("tiny")


@pytest.fixture(scope="module")
def tokens(tiny_cfg) -> torch.Tensor:
    return torch.randint(0, tiny_cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))


def _model(cfg: ModelConfig, mode: str) -> DeepSeekV3:
    model = DeepSeekV3(cfg, recompute=mode)
    model.init_weights(0)
    return model


def _run(cfg, tokens, mode):
    """One forward+backward: (loss, lm_loss, mtp_loss), grads, tokens_per_expert, saved bytes."""
    model = _model(cfg, mode)
    with SavedActivations(exclude=model) as meter:
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    losses = (out.loss.detach(), out.lm_loss.detach(), out.mtp_loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = {n: m.tokens_per_expert.clone() for n, m in model.moe_layers().items()}
    return losses, grads, counts, meter.bytes


@pytest.fixture(scope="module")
def results(tiny_cfg, tokens):
    torch.manual_seed(0)
    return {mode: _run(tiny_cfg, tokens, mode) for mode in MODES}


def test_flags_follow_the_mode(tiny_cfg):
    from model.attention import MLA
    from model.transformer import Block

    for mode in MODES:
        model = _model(tiny_cfg, mode)
        mlas = [m for m in model.modules() if isinstance(m, MLA)]
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        assert mlas and blocks
        assert all(m.recompute_up_proj == (mode == "norm_and_up_proj") for m in mlas)
        assert all(b.recompute == (mode == "full") for b in blocks)
    with pytest.raises(ValueError, match="train.recompute"):
        _model(tiny_cfg, "some")


@pytest.mark.parametrize("mode", ["norm_and_up_proj", "full"])
def test_losses_and_gradients_are_bit_identical(results, mode):
    ref_losses, ref_grads, _, _ = results["none"]
    losses, grads, _, _ = results[mode]
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b), (mode, a, b)
    assert grads.keys() == ref_grads.keys()
    differ = [n for n in grads if not torch.equal(grads[n], ref_grads[n])]
    assert not differ, f"{mode}: gradients differ for {differ[:5]}"


def test_saved_activation_bytes_decrease(results):
    none, up, full = (results[m][3] for m in MODES)
    assert 0 < up < none, (none, up)
    assert full < up, (up, full)
    # full recompute keeps only the block inputs (plus head/MTP/loss tensors outside the blocks)
    assert full < 0.5 * none, (none, full)


def test_saved_activation_bytes_helper_matches_meter(tiny_cfg, tokens):
    model = _model(tiny_cfg, "none")
    nbytes = saved_activation_bytes(model, lambda: model(tokens[:, :-1], tokens[:, 1:]).loss)
    assert nbytes > 0
    assert all(p.grad is not None for p in model.layers["0"].parameters())  # backward ran
    # parameters are excluded: a model-free meter counts them too (each linear saves its weight)
    model2 = _model(tiny_cfg, "none")
    with SavedActivations() as everything:
        model2(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert everything.bytes > nbytes


def test_meter_dedupes_storages():
    x = torch.randn(64, 64, requires_grad=True)
    with SavedActivations() as meter:
        y = x.sin()  # saves x
        z = x[:32].cos()  # saves a view of x: same storage
    assert meter.count == 1 and meter.bytes == 64 * 64 * 4
    (y.sum() + z.sum()).backward()


def test_full_recompute_does_not_double_count_routing(results):
    ref_counts = results["none"][2]
    for mode in ("norm_and_up_proj", "full"):
        counts = results[mode][2]
        assert counts.keys() == ref_counts.keys() and counts
        for name in counts:
            assert torch.equal(counts[name], ref_counts[name]), (mode, name, counts[name], ref_counts[name])
    # and the reference is one count per (token, slot): B·T·k per MoE layer (MTP: B·(T-1)·k)
    n_tokens = {name: float(c.sum()) for name, c in ref_counts.items()}
    assert all(v in (2 * 32 * 2, 2 * 31 * 2) for v in n_tokens.values()), n_tokens


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    return train_in_process(["train.steps=3", f"run.dir={tmp_path_factory.mktemp('recompute_none')}"])


@pytest.mark.parametrize("mode", ["norm_and_up_proj", "full"])
def test_training_run_is_bit_identical(tmp_path, reference_rows, mode):
    ref = reference_rows
    rows = train_in_process(["train.steps=3", f"run.dir={tmp_path}", f"train.recompute={mode}"])
    assert len(rows) == len(ref) == 3
    for a, b in zip(ref, rows):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "expert_load_cv"):
            assert a[key] == b[key], (mode, a["step"], key, a[key], b[key])
