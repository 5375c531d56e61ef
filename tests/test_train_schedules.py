"""Token-based schedules (lr, global-batch ramp, router bias speed γ, MTP weight λ), data position
by samples, and resume under another global batch or layout."""
from __future__ import annotations

import math

import pytest
import torch

from model import ConfigError
from tests.helpers import compose, read_metrics, run_cli, train_in_process
from trainer.schedules import BatchRamp, Schedules


def _paper(**over):
    cfg = compose(["model=deepseek_v3_671b", "parallel=deepseek_v3_2048", "train=deepseek_v3"]
                  + [f"train.{k}={v}" for k, v in over.items()])
    from omegaconf import OmegaConf
    from model import ModelConfig

    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    return Schedules.from_config(cfg.train, 1, mcfg, unit=2 * 128)  # DualPipe at DP 128, 1 seq/micro-batch


T = 1e12
SEQ = 4096


def test_paper_lr_at_every_boundary():
    s = _paper()
    lr = lambda step, tokens: s.lr(step, tokens)  # noqa: E731
    assert lr(0, 0) == pytest.approx(2.2e-4 / 2000)  # linear warm-up over 2K steps
    assert lr(999, 0) == pytest.approx(2.2e-4 * 1000 / 2000)
    assert lr(1999, 0) == pytest.approx(2.2e-4)
    assert lr(2000, 1e9) == 2.2e-4  # constant ...
    assert lr(10**6, 10 * T - 1) == 2.2e-4  # ... until 10T tokens
    assert lr(10**6, 10 * T) == pytest.approx(2.2e-4)  # cosine starts at the peak
    assert lr(10**6, 12.15 * T) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-12)  # halfway: the mean
    assert lr(10**6, 10 * T + 4.3 * T / 4) == pytest.approx(2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5) * (1 + math.cos(math.pi / 4)))
    assert lr(10**6, 14.3 * T - 1) == pytest.approx(2.2e-5, rel=1e-9)  # ... down to 2.2e-5 over 4.3T
    assert lr(10**6, 14.3 * T) == 2.2e-5  # 2.2e-5 for 333B tokens
    assert lr(10**6, 14.633 * T - 1) == 2.2e-5
    assert lr(10**6, 14.633 * T) == 7.3e-6  # 7.3e-6 for the last 167B
    assert lr(10**6, 14.8 * T) == 7.3e-6


def test_paper_gamma_and_lambda_at_every_boundary():
    s = _paper()
    at = lambda tokens: s.at(10**6, math.ceil(tokens / SEQ))  # the first step at or after `tokens`  # noqa: E731
    assert at(0)["bias_update_gamma"] == 0.001 and at(0)["mtp_lambda"] == 0.3
    assert at(10 * T - SEQ)["mtp_lambda"] == 0.3 and at(10 * T)["mtp_lambda"] == 0.1
    assert at(14.3 * T - SEQ)["bias_update_gamma"] == 0.001 and at(14.3 * T)["bias_update_gamma"] == 0.0
    assert at(14.8 * T)["mtp_lambda"] == 0.1


def test_paper_batch_ramp():
    s = _paper(batch_ramp_start=3072)  # the report's figure (the preset starts at 4096: see below)
    b = s.batch
    assert b.batch_at(0) == 3072 and b.increment == 256  # (15360 - 3072) / 256 = 48 increments
    ramp = 469e9 / SEQ
    assert b.batch_at(int(ramp) - 1) == 15360 - 256 and b.batch_at(int(ramp) + 1) == 15360
    assert b.batch_at(int(ramp / 48) - 1) == 3072 and b.batch_at(int(ramp / 48) + 1) == 3072 + 256
    assert b.sizes()[0] == 3072 and b.sizes()[-1] == 15360 and len(b.sizes()) == 49
    # the ramp's steps, then 15360 per step, reach 14.8T tokens
    steps = b.steps_for_tokens(14.8 * T, SEQ)
    assert b.samples_before(steps) * SEQ >= 14.8 * T > b.samples_before(steps - 1) * SEQ


def test_report_ramp_start_does_not_fit_dualpipe_at_dp128():
    """3072 sequences over DP 128 are 24 micro-batches per rank, fewer than DualPipe's 2·pp = 32:
    the preset starts at 4096, and the report's figure gets a named error on this layout."""
    from trainer.dry_run import dry_run

    assert _paper().batch.batch_at(0) == 4096
    cfg = compose(["model=deepseek_v3_671b", "parallel=deepseek_v3_2048", "train=deepseek_v3", "precision=fp8",
                   "debug.dry_run=true", "train.batch_ramp_start=3072"])
    with pytest.raises(ConfigError, match=r"^train\.batch_ramp_start: .*3072.* 32"):
        dry_run(cfg)


def test_ramp_arithmetic_and_errors():
    b = BatchRamp(final=16, start=4, increment=4, ramp_samples=60)  # 3 increments, one per 20 samples
    seen, samples = [], 0
    for step in range(10):
        assert b.samples_before(step) == samples
        seen.append(b.batch_at(samples))
        samples += seen[-1]
    assert seen == [4, 4, 4, 4, 4, 8, 8, 8, 12, 12]  # 12 from sample 40, 16 from 60
    with pytest.raises(ConfigError, match="train.batch_ramp_start"):
        _paper(batch_ramp_start=3000)
    with pytest.raises(ConfigError, match="train.lr_tail"):
        _paper(lr_tail="[[2,1],[1,1]]")


# A toy run with every switch inside 24 steps: batch 4 → 16 over the first 120 samples (+4 every 40
# samples: 10 steps of 4, 5 of 8, 4 of 12, then 16), lr cosine between 40 and 120 samples then two
# tail stages, γ 0.01 → 0 at 150 samples, λ 0.3 → 0.1 at 100 samples.
SEQ_LEN = 32
TOY = ["train.seq_len=32", "train.global_batch=16", "train.micro_batch=2", "train.steps=24",
       "train.batch_ramp_start=4", "train.batch_ramp_increment=4", f"train.batch_ramp_tokens={120 * SEQ_LEN}",
       "train.warmup_steps=2", f"train.lr_decay_start_tokens={40 * SEQ_LEN}", f"train.lr_decay_end_tokens={120 * SEQ_LEN}",
       f"train.lr_tail=[[{120 * SEQ_LEN},3e-4],[{160 * SEQ_LEN},1e-4]]",
       f"train.bias_update_gamma=[[0,0.01],[{150 * SEQ_LEN},0]]", f"train.mtp_lambda=[[0,0.3],[{100 * SEQ_LEN},0.1]]"]
BATCHES = [4] * 10 + [8] * 5 + [12] * 4 + [16] * 5


def test_toy_ramp_consumes_every_sample_once_and_switches(tmp_path, monkeypatch):
    from trainer.data import TokenDataset

    consumed = []
    real = TokenDataset.batch

    def spy(self, indices, split="train"):
        if split == "train":
            consumed.extend(indices)
        return real(self, indices, split)

    monkeypatch.setattr(TokenDataset, "batch", spy)
    rows = train_in_process([f"run.dir={tmp_path}"] + TOY)
    assert [r["global_batch"] for r in rows] == BATCHES
    assert consumed == list(range(sum(BATCHES))), "every sample index consumed exactly once, in order"
    assert rows[-1]["samples"] == sum(BATCHES) == 208
    for r in rows:  # the logged loss is lm + λ·mtp + aux with the step's λ
        lam = 0.3 if r["samples"] - r["global_batch"] < 100 else 0.1
        assert r["loss"] == pytest.approx(r["lm_loss"] + lam * r["mtp_loss"] + r["aux_loss"], rel=1e-9)
    lrs = {r["samples"] - r["global_batch"]: r["lr"] for r in rows}
    assert lrs[0] == pytest.approx(2.2e-3 / 2) and lrs[36] == 2.2e-3  # warm-up 2 steps, then constant
    assert lrs[40] == pytest.approx(2.2e-3) and lrs[80] == pytest.approx((2.2e-3 + 2.2e-4) / 2)  # cosine midpoint
    assert lrs[128] == 3e-4 and lrs[160] == 1e-4 and lrs[192] == 1e-4


def test_gamma_switch_stops_bias_updates(tmp_path):
    from trainer.trainer import Trainer

    base = ["model=tiny", "data=tiny", "logging.progress=false", "logging.peak_tflops=1", f"run.dir={tmp_path}"] + TOY
    first = Trainer(compose(base + ["train.exit_after_steps=21"]))  # step 22 starts at sample 160 ≥ 150
    first.train()
    before = [m.gate.bias.clone() for m in first.model.moe_layers().values()]
    assert all(b.abs().sum() > 0 for b in before), "γ = 0.01 moved the biases during the first 21 steps"
    second = Trainer(compose(base))
    second.train()
    after = [m.gate.bias for m in second.model.moe_layers().values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "γ = 0 must leave the router biases alone"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train_in_process([f"run.dir={tmp_path_factory.mktemp('straight')}"] + TOY)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A copy-able run stopped after 7 steps, mid-ramp (batch 4)."""
    run = tmp_path_factory.mktemp("stopped")
    first = train_in_process([f"run.dir={run}", "train.exit_after_steps=7"] + TOY)
    assert len(first) == 7 and first[-1]["global_batch"] == 4
    return run


def _resume_copy(stopped, dest):
    import shutil

    shutil.copytree(stopped, dest)
    return dest


def test_resume_mid_ramp_is_bit_identical(straight, stopped, tmp_path):
    run = _resume_copy(stopped, tmp_path / "run")
    resumed = train_in_process([f"run.dir={run}"] + TOY)
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["grad_norm"], a["lr"], a["global_batch"]) == (b["loss"], b["grad_norm"], b["lr"], b["global_batch"])


@pytest.mark.parametrize("layout", [
    ["parallel.ep=2", "parallel.expert_nodes=1"],  # DP 2, experts over EP 2
    ["parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batch=1"],  # a DualPipe per micro-batch count
], ids=["dp2_ep2", "pp2_dualpipe"])
def test_resume_mid_ramp_under_another_layout(straight, stopped, tmp_path, layout):
    run = _resume_copy(stopped, tmp_path / "run")
    res = run_cli([f"run.dir={run}", "model=tiny", "data=tiny"] + TOY + layout, nproc=2, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(str(run))
    assert [r["step"] for r in rows] == list(range(1, 25))
    for a, b in zip(straight[7:], rows[7:]):
        assert (b["global_batch"], b["samples"], b["lr"]) == (a["global_batch"], a["samples"], a["lr"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])


def test_resume_under_another_global_batch_continues_the_stream(tmp_path, capfd):
    train_in_process([f"run.dir={tmp_path}", "train.steps=3", "train.global_batch=8", "train.exit_after_steps=2"])
    rows = train_in_process([f"run.dir={tmp_path}", "train.steps=4", "train.global_batch=4"])
    assert "train.global_batch=4 (checkpoint: 8)" in capfd.readouterr().out
    assert [(r["step"], r["global_batch"], r["samples"]) for r in rows] == [(1, 8, 8), (2, 8, 16), (3, 4, 20), (4, 4, 24)]


def test_plan_whole_recipe_cost_integrates_the_ramp(capsys):
    """launch.plan with train.tokens: Σ over the ramp's batch sizes of steps × planned step time,
    checked against a step-by-step walk of the schedule."""
    import json

    from launch.plan import run
    from parallel.planner import PlanLayout, Recipe, load_hardware, plan

    over = ["model=toy", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.schedule=dualpipe",
            "train.micro_batch=1", "train.seq_len=128", "train.global_batch=32", "train.steps=0", "train.tokens=100000",
            "train.batch_ramp_start=8", "train.batch_ramp_increment=8", "train.batch_ramp_tokens=20000",
            "plan.format=json", "plan.sensitivity=[]"]
    assert run(compose(over)) == 0
    r = json.loads(capsys.readouterr().out)
    lay = PlanLayout(pp=2, dp=2, ep=2, world_size=4, schedule="dualpipe")
    cfg = compose(over)
    from omegaconf import OmegaConf
    from model import ModelConfig

    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    hw = load_hardware("h800")
    step_time = {b: plan(mcfg, lay, Recipe(precision="fp32", recompute="none", seq_len=128, micro_batch=1,
                                           global_batch=b), hw, 0.4, [])["step_time_s"] for b in (8, 16, 24, 32)}
    seconds, samples, steps = 0.0, 0, 0
    while samples * 128 < 100000:  # the ramp: +8 every 20000 / 128 / 3 samples
        b = min(32, 8 + 8 * int(samples // (20000 / 128 / 3)))
        seconds, samples, steps = seconds + step_time[b], samples + b, steps + 1
    assert r["total_steps"] == steps and r["total_tokens"] == samples * 128
    assert r["total_gpu_hours"] == pytest.approx(seconds * 4 / 3600, rel=1e-12)
    assert r["total_days"] == pytest.approx(seconds / 86400, rel=1e-12)
    assert r["total_cost_usd"] == pytest.approx(2 * r["total_gpu_hours"], rel=1e-12)
    assert [p["global_batch"] for p in r["recipe_phases"]] == [8, 16, 24, 32]
