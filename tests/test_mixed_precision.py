"""Mixed-precision master weights (model/mixed.py, parallel/zero.py): under precision=bf16|fp8 the
weights are BF16, every read of a weight goes through model.mixed.weight (fp32 compute on CPU),
gradients accumulate in fp32 `main_grad` (no BF16 `.grad`), the FP32 master and the BF16 moments
live only in the ZeRO-1 range, and checkpoints carry the masters.

Layout invariance for bf16/fp8 is checked to a MEASURED floor: one process against one process
with another micro-batching (same precision, same global batch): the fp32 gradient sums group
differently, and a BF16 rounding boundary crossed by one master weight changes the weights every
later step reads, so the runs drift apart chaotically at that floor."""
from __future__ import annotations

import json

import pytest
import torch

from model import DeepSeekV3
from model.mixed import numerics_for
from parallel.grads import grad_of
from tests.helpers import preset_model_cfg, read_metrics, run_cli, tiny_model_cfg, train_in_process
from tests.shared_runs import LOW, LOW_LAYOUTS, LOW_STEPS, low_job


def _model(precision: str, recompute: str = "none", **kw) -> DeepSeekV3:
    return DeepSeekV3(tiny_model_cfg(**kw), numerics=numerics_for(precision), recompute=recompute)


def _tokens(n=4, seq=33):
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(0))


def _backward(model, tokens, micro=2):
    for mb in tokens.split(micro):
        (model(mb[:, :-1], mb[:, 1:]).loss / (tokens.shape[0] // micro)).backward()


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("precision", LOW)
def test_weights_are_the_rounded_fp32_init_and_every_read_goes_through_weight(precision):
    """BF16 storage holding the seeded FP32 initialisation rounded; after a backward every parameter
    has an fp32 main_grad and no .grad: a parameter read without model.mixed.weight would have a
    BF16 .grad (or no gradient at all) and fails here."""
    ref, model = _model("fp32"), _model(precision)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), n
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith(("bias", "rope")))
    assert any(getattr(m, "fp8", False) for m in model.modules()) == (precision == "fp8")
    _backward(model, _tokens())
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert grad_of(p) is not None and grad_of(p).dtype == torch.float32, n
        assert grad_of(p).shape == p.shape, n


def test_fp32_parameters_skip_the_upcast():
    model = _model("fp32")
    _backward(model, _tokens())
    for n, p in model.named_parameters():
        assert p.grad is not None and grad_of(p) is p.grad and not hasattr(p, "main_grad"), n


@pytest.mark.parametrize("mode", ["norm_and_up_proj", "full"])
def test_recompute_gives_the_same_fp32_grads(mode):
    """Activation recompute re-runs the upcasts; the gradients still land once, in main_grad."""
    plain, rec = _model("bf16"), _model("bf16", recompute=mode)
    _backward(plain, _tokens())
    _backward(rec, _tokens())
    for (n, p), (_, q) in zip(plain.named_parameters(), rec.named_parameters()):
        assert q.grad is None and torch.equal(grad_of(q), grad_of(p)), n


@pytest.mark.parametrize("precision", LOW)
def test_weight_grad_split_fills_main_grad(precision):
    """The pipeline's B (input grads) + W (weight grads) on a BF16 stage: W produces the same fp32
    weight grads as one full backward (autograd.grad sees None where the upcast wrote main_grad)."""
    from parallel.pipeline.weight_grad import backward_input, backward_weight

    cfg = tiny_model_cfg(n_layers=3)
    x0 = torch.randn(2, 16, cfg.dim, generator=torch.Generator().manual_seed(1))
    ids = _tokens(2, 17)

    def run(split: bool):
        m = DeepSeekV3(cfg, layer_ids=[1, 2], has_embed=False, has_head=True, numerics=numerics_for(precision))
        x = x0.clone().requires_grad_()
        loss = m.head_loss(m.forward_layers(x), ids[:, :-1], ids[:, 1:]).loss
        if split:
            (dx,), state = backward_input([loss], [None], [x], list(m.parameters()))
            assert all(grad_of(p) is None for p in m.parameters())
            backward_weight(state)
        else:
            loss.backward()
            dx = x.grad
        assert all(p.grad is None for p in m.parameters())
        return dx, {n: grad_of(p) for n, p in m.named_parameters()}

    dx_full, g_full = run(False)
    dx_split, g_split = run(True)
    torch.testing.assert_close(dx_split, dx_full, rtol=0, atol=0)
    for n, g in g_full.items():
        assert g_split[n] is not None, n
        torch.testing.assert_close(g_split[n], g, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ one process through the trainer
def _pieces_and_elements() -> tuple[int, int]:
    """(parameter tensors, elements) of the tiny preset the trainer runs."""
    with torch.device("meta"):
        params = list(DeepSeekV3(preset_model_cfg("tiny")).parameters())
    return len(params), sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return {p: train_in_process(["train.steps=3", f"precision={p}", f"run.dir={tmp_path_factory.mktemp(p)}"])
            for p in ("fp32",) + LOW}


@pytest.mark.parametrize("precision", LOW)
def test_one_process_bytes_and_loss(one_process, precision):
    """param bytes halve; grads 4 B per parameter; optimizer 4 (master) + 2 + 2 (BF16 moments) B per
    element of the (here whole) shard + one fp32 step per piece; the loss stays close to fp32."""
    fp32, rows = one_process["fp32"], one_process[precision]
    n_pieces, n = _pieces_and_elements()
    for a, b in zip(fp32, rows):
        assert a["param_bytes"] == 4 * n and b["param_bytes"] == 2 * n == a["param_bytes"] // 2
        assert a["grad_bytes"] == b["grad_bytes"] == 4 * n
        assert b["optimizer_state_bytes"] == (4 + 2 + 2) * n + 4 * n_pieces
        assert a["optimizer_state_bytes"] == (4 + 4) * n + 4 * n_pieces
        if precision == "bf16":  # fp32 compute saves the same activations; the weights' fp32 copies are not ones
            assert b["saved_activation_bytes"] == a["saved_activation_bytes"]
        rel = abs(b["loss"] - a["loss"]) / a["loss"]
        print(f"{precision} step {a['step']}: loss {b['loss']:.6f} vs fp32 {a['loss']:.6f}, rel. diff {rel:.2e}")
        assert rel < 0.02, (a["step"], a["loss"], b["loss"])
    assert any(a["loss"] != b["loss"] for a, b in zip(fp32, rows)), "bf16 identical to fp32?"


# ------------------------------------------------------------------ checkpoints
def test_resume_restores_the_fp32_master_not_the_rounded_weights(tmp_path):
    from tests.helpers import compose
    from trainer.trainer import Trainer

    train_in_process(["train.steps=2", "precision=bf16", f"run.dir={tmp_path / 'a'}"])
    step = tmp_path / "a" / "checkpoints" / "step_2"
    cfg = compose(["model=tiny", "data=tiny", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
                   "logging.peak_tflops=1", "precision=bf16", "train.steps=4", f"run.dir={tmp_path / 'b'}",
                   f"checkpoint.resume={step}"])
    t = Trainer(cfg)
    before = [sh.state["master"].clone() for sh in t.optimizer.shards()]
    assert t._resume() == 2
    finer = False
    for sh, old in zip(t.optimizer.shards(), before):
        master, w = sh.state["master"], sh.param.detach().view(-1)[sh.start:sh.stop]
        assert torch.equal(master.to(torch.bfloat16), w), sh.name  # the weights are the masters rounded
        finer |= not torch.equal(master, w.float())
        assert not torch.equal(master, old) or sh.name.endswith("norm.weight"), sh.name
    assert finer, "the masters equal the BF16 weights: they were not restored from the checkpoint"
    t.engine.close()
    t.writer.close()


def test_fp32_checkpoint_into_bf16_is_a_named_error(tmp_path):
    from trainer.checkpoint import CheckpointError

    train_in_process(["train.steps=1", f"run.dir={tmp_path / 'a'}"])
    step = tmp_path / "a" / "checkpoints" / "step_1"
    assert "fp32 weights" in json.loads((step / "meta.json").read_text())["weights"]["storage"]
    with pytest.raises(CheckpointError, match=r"weights\.storage: saved fp32 weights .*this run bf16 weights"):
        train_in_process([f"run.dir={tmp_path / 'b'}", "train.steps=2", "precision=bf16", f"checkpoint.resume={step}"])


# ------------------------------------------------------------------ layouts, to the measured floor
# The layout runs are tests/shared_runs.py's low-precision jobs (LOW_PIPE: global batch 16 of
# micro-batch 1, 4 layers, 4 steps, recompute norm_and_up_proj); tests/test_plan_vs_run.py checks
# the same runs' bytes. The one-process reference and floor runs use the same config.
# What one process and an EP layout can share, they do: the same BF16 weights and master updates,
# and the one-process dispatcher rounds the all-to-all payloads (forward and backward) exactly where
# the EP exchanges do. So under bf16 a layout equals one process to fp32 round-off while routing is
# unchanged (measured, steps 1-2: loss <= 4e-9, grad norm <= 3e-7 relative), and over the 4 steps it
# stays inside the floor (one process vs one process with micro-batch 2; measured: floor loss
# 1.3e-6 / grad norm 5.3e-5, layouts at most 1.1e-6 / 4.5e-5). Under fp8 an EP rank's expert GEMMs
# see tokens of all DP ranks' micro-batches, so the FP8 weight-gradient tiles (128 tokens) group
# other tokens than in one process: step 1's grad norm already differs by ~1.2e-4 (as micro-batch 2
# does), and over 4 steps the layouts measured 1.5e-4 / 1.7e-3 against a floor of 9.0e-5 / 7.4e-4
# (each floor is one sample of a chaotic process: tests/test_layouts.py's fp8 tests show seeds
# where EP sits below it). Hence: bf16 tight for 2 steps and <= floor after; fp8 step-1 loss tight
# and <= FP8_FACTOR x floor after.
TIGHT = {"bf16": dict(steps=2, loss=1e-6, grad_norm=1e-5), "fp8": dict(steps=1, loss=1e-6, grad_norm=None)}
FACTOR = {"bf16": 1.0, "fp8": 3.0}


def _run(run_dir, nproc, precision, args, timeout=900):
    res = run_cli([f"run.dir={run_dir}"] + low_job(precision, args), nproc=nproc, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return read_metrics(str(run_dir))


def _worst(rows, ref, key, first=0):
    return max(abs(r[key] - q[key]) / abs(q[key]) for r, q in list(zip(rows, ref))[first:])


@pytest.fixture(scope="module")
def floors(tmp_path_factory):
    """Per precision: the one-process reference and the floor (worst rel. diff of loss and grad
    norm over the steps) against one process with micro-batch 2."""
    out = {}
    for precision in LOW:
        d = tmp_path_factory.mktemp(f"floor_{precision}")
        ref = _run(d / "single", 1, precision, [])
        other = _run(d / "single_mb2", 1, precision, ["train.micro_batch=2"])
        out[precision] = ref, {k: _worst(other, ref, k) for k in ("loss", "grad_norm")}
    return out


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision", LOW)
def test_layouts_match_one_process_to_the_measured_floor(floors, shared_runs, precision):
    ref, floor = floors[precision]
    assert floor["loss"] > 0, "micro-batching changed nothing: no floor to measure"
    tight = TIGHT[precision]
    for name, nproc, args, _ in LOW_LAYOUTS:
        run_dir, res = shared_runs.get(nproc, low_job(precision, args))
        assert res.returncode == 0, res.stderr[-3000:]
        rows = read_metrics(str(run_dir))
        assert [r["step"] for r in rows] == list(range(1, LOW_STEPS + 1))
        for r, q in zip(rows[:tight["steps"]], ref):  # same weights, same rounding: fp32 round-off
            assert r["loss"] == pytest.approx(q["loss"], rel=tight["loss"]), (name, r["step"])
            if tight["grad_norm"]:
                assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=tight["grad_norm"]), (name, r["step"])
        for key in ("loss", "grad_norm"):
            err = _worst(rows, ref, key)
            print(f"{precision} {name} {key}: worst rel. diff {err:.2e}, floor {floor[key]:.2e}")
            assert err <= FACTOR[precision] * floor[key], (name, key, err, floor[key])


@pytest.mark.timeout(1200)
def test_bf16_checkpoint_reshards_and_resumes_bit_identically(floors, tmp_path):
    """Save at dp2×ep2 (bf16) after 4 of 8 steps; resume at the same layout: steps 5-8 bit-identical
    to the uninterrupted run; at dp4×ep4 and at one process: step 5 (the same loaded BF16 weights,
    FP32 masters and moments) equal to fp32 round-off, steps 5-8 within the measured floor."""
    ref, floor = floors["bf16"]
    bf16 = ["train.steps=8"]
    whole = _run(tmp_path / "dp2_ep2", 2, "bf16", bf16 + ["parallel.ep=2", "checkpoint.every=4"])
    saved = tmp_path / "dp2_ep2" / "checkpoints" / "step_4"
    assert (saved / "meta.json").exists()
    same = _run(tmp_path / "same", 2, "bf16", bf16 + ["parallel.ep=2", f"checkpoint.resume={saved}"])
    assert [r["step"] for r in same] == [5, 6, 7, 8]
    for a, b in zip(whole[4:], same):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    for name, nproc, args in [("dp4_ep4", 4, ["parallel.ep=4"]), ("single", 1, [])]:
        rows = _run(tmp_path / name, nproc, "bf16", bf16 + args + [f"checkpoint.resume={saved}"])
        assert [r["step"] for r in rows] == [5, 6, 7, 8]
        assert rows[0]["loss"] == pytest.approx(whole[4]["loss"], rel=1e-6), name
        assert rows[0]["grad_norm"] == pytest.approx(whole[4]["grad_norm"], rel=1e-5), name
        for key in ("loss", "grad_norm"):
            err = _worst(rows, whole[4:], key)
            print(f"bf16 resume at {name} {key}: worst rel. diff {err:.2e}, floor {floor[key]:.2e}")
            assert err <= floor[key], (name, key, err, floor[key])
