"""The trainer's CPU EMA (train.ema_decay) against a reference computed from parameter snapshots
taken right after every optimizer step, and across a checkpoint resume."""
from __future__ import annotations

import torch

from tests.helpers import TINY, compose, read_metrics
from trainer.trainer import Trainer

DECAY = 0.9


def _trainer(overrides: list[str]) -> Trainer:
    return Trainer(compose(TINY + [f"train.ema_decay={DECAY}"] + overrides))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}


def _record_steps(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Wrap trainer.optimizer.step so that every call leaves a parameter snapshot behind."""
    snaps: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        snaps.append(_snapshot(trainer.model))
        return out

    trainer.optimizer.step = recording_step
    return snaps


def test_ema_matches_reference(tmp_path):
    trainer = _trainer(["train.steps=3", f"run.dir={tmp_path}"])
    assert trainer.ema is not None and trainer.ema.decay == DECAY
    ref = _snapshot(trainer.model)  # the EMA starts from the initial parameters
    snaps = _record_steps(trainer)
    trainer.train()
    assert len(snaps) == 3 and len(read_metrics(str(tmp_path))) == 3
    for snap in snaps:
        for n in ref:
            ref[n] = DECAY * ref[n] + (1 - DECAY) * snap[n]
    shadow = trainer.ema.shadow()
    assert trainer.ema.num_updates == 3
    assert shadow.keys() == ref.keys()
    for n, t in shadow.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32
        torch.testing.assert_close(t, ref[n], rtol=1e-6, atol=1e-9, msg=lambda m, n=n: f"{n}: {m}")
    # the EMA really lags the parameters (it is not just a copy of the last snapshot)
    last = snaps[-1]
    assert any(not torch.allclose(shadow[n], last[n]) for n in shadow)


def test_ema_survives_resume(tmp_path):
    straight = _trainer(["train.steps=4", f"run.dir={tmp_path / 'a'}"])
    straight.train()
    expected = {n: t.clone() for n, t in straight.ema.shadow().items()}

    first = _trainer(["train.steps=4", "train.exit_after_steps=2", f"run.dir={tmp_path / 'b'}"])
    first.train()
    assert first.ema.num_updates == 2
    assert (tmp_path / "b" / "checkpoints" / "step_2").is_dir()

    resumed = _trainer(["train.steps=4", f"run.dir={tmp_path / 'b'}"])
    resumed.train()
    assert resumed.ema.num_updates == 4
    assert [r["step"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2, 3, 4]
    shadow = resumed.ema.shadow()
    assert shadow.keys() == expected.keys()
    differ = [n for n in shadow if not torch.equal(shadow[n], expected[n])]
    assert not differ, f"EMA after resume differs from the uninterrupted run: {differ[:5]}"


def test_ema_off_by_default(tmp_path):
    trainer = Trainer(compose(TINY + ["train.steps=1", f"run.dir={tmp_path}"]))
    assert trainer.ema is None

