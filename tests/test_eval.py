"""Evaluation (train.eval_every): held-out loss of the weights and of the CPU EMA weights.

The layout invariance of the validation losses (every pipeline schedule, EP, DP, resharded EMA)
is checked in tests/test_layouts.py; this file checks what they are equal TO, and that
evaluating does not disturb training.
"""
from __future__ import annotations

import pytest
import torch

from parallel.pipeline import Kind, dualpipe, dualpipev, forward_only, one_f_one_b, replay_order
from parallel.pipeline.schedule import iter_parts
from tests.helpers import TINY, compose, read_metrics, train_in_process


@pytest.mark.parametrize("build, pp, n", [(one_f_one_b, 2, 4), (one_f_one_b, 4, 8), (dualpipe, 2, 4),
                                          (dualpipe, 4, 8), (dualpipev, 2, 4), (dualpipev, 4, 8)])
def test_forward_only_schedule_keeps_every_forward_in_training_order(build, pp, n):
    train = build(pp, n)
    fwd = forward_only(train)
    assert fwd.placement == train.placement and fwd.paths == train.paths
    for r in range(pp):
        assert all(a.kind is Kind.F for a in fwd.actions[r])
        assert list(fwd.actions[r]) == [a for a in iter_parts(train.actions[r]) if a.kind is Kind.F]
    # one F per (micro-batch, stage), and an execution order exists (no deadlock)
    done = sorted((a.microbatch, fwd.stage_of(r, a.chunk)) for r in range(pp) for a in fwd.actions[r])
    assert done == [(m, s) for m in range(n) for s in range(train.n_stages)]
    assert len(replay_order(fwd)) == n * train.n_stages


def _heldout_loss(trainer, model) -> tuple[float, float]:
    """lm and mtp loss of ``model`` on the trainer's evaluation batches, computed directly."""
    t = trainer.cfg.train
    lm = mtp = 0.0
    model.eval()
    with torch.no_grad():
        for k in range(t.eval_batches):
            tokens = torch.from_numpy(trainer.data.batch(range(k * t.global_batch, (k + 1) * t.global_batch), "val"))
            out = model(tokens[:, :-1], tokens[:, 1:])
            lm, mtp = lm + float(out.lm_loss), mtp + float(out.mtp_loss)
    model.train()
    return lm / t.eval_batches, mtp / t.eval_batches


def test_validation_losses_of_weights_and_ema(tmp_path):
    from trainer.trainer import Trainer

    cfg = compose(TINY + [f"run.dir={tmp_path}", "train.steps=3", "train.eval_every=2", "train.eval_batches=2",
                          "train.ema_decay=0.5"])
    trainer = Trainer(cfg)
    trainer.train()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]  # every 2 steps and the last one
    last = rows[-1]
    model, lam = trainer.model, trainer.model_cfg.mtp_lambda

    lm, mtp = _heldout_loss(trainer, model)  # the final weights
    assert last["val_lm_loss"] == pytest.approx(lm, rel=1e-6)
    assert last["val_mtp_loss"] == pytest.approx(mtp, rel=1e-6)
    assert last["val_loss"] == pytest.approx(lm + lam * mtp, rel=1e-6)

    # held-out, not training data: a different loss from the step's training lm_loss
    assert abs(last["val_lm_loss"] - last["lm_loss"]) > 1e-4

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.ema.copy_to(dict(model.named_parameters()))  # the EMA weights
    lm_e, mtp_e = _heldout_loss(trainer, model)
    assert last["val_lm_loss_ema"] == pytest.approx(lm_e, rel=1e-6)
    assert last["val_loss_ema"] == pytest.approx(lm_e + lam * mtp_e, rel=1e-6)
    assert abs(last["val_loss_ema"] - last["val_loss"]) > 1e-4  # decay 0.5 over 3 steps: not the weights
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_evaluation_does_not_disturb_training(tmp_path):
    """Same training losses, grad norms and expert-load statistics, bit for bit, with and without
    evaluating (and swapping the EMA in and out) every step."""
    plain = train_in_process([f"run.dir={tmp_path / 'plain'}", "train.steps=4", "train.ema_decay=0.5"])
    evald = train_in_process([f"run.dir={tmp_path / 'eval'}", "train.steps=4", "train.ema_decay=0.5",
                              "train.eval_every=1", "train.eval_batches=1"])
    assert all("val_loss_ema" in r for r in evald)
    for a, b in zip(plain, evald):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "expert_load_cv"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
