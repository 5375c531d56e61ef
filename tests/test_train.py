"""The single-process trainer: run contract, resume, and clean errors for bad input."""
from __future__ import annotations

import os

import pytest

from tests.helpers import read_metrics, run_cli, train_in_process

CONTRACT = {"step", "loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "expert_load_cv"}


def test_metrics_contract_and_learning(tmp_path):
    rows = train_in_process([f"run.dir={tmp_path}", "train.steps=12", "train.lr=3e-3"])
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert CONTRACT <= set(rows[0]), CONTRACT - set(rows[0])
    for r in rows:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.3 * r["mtp_loss"] + r["aux_loss"], rel=1e-9)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu"]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.3, "the loss should fall on a tiny model in 12 steps"
    assert os.path.exists(tmp_path / "config.yaml")


def test_resume_is_bit_exact(tmp_path):
    straight = train_in_process([f"run.dir={tmp_path / 'a'}", "train.steps=8"])
    first = train_in_process([f"run.dir={tmp_path / 'b'}", "train.steps=8", "train.exit_after_steps=4"])
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    resumed = train_in_process([f"run.dir={tmp_path / 'b'}", "train.steps=8"])
    assert [r["step"] for r in resumed] == list(range(1, 9)), "no step lost or repeated in metrics.jsonl"
    for a, b in zip(straight[4:], resumed[4:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, capfd):
    train_in_process([f"run.dir={tmp_path}", "train.steps=5", "checkpoint.every=2", "train.exit_after_steps=4"])
    step4 = tmp_path / "checkpoints" / "step_4"
    for f in step4.iterdir():
        if f.suffix == ".distcp":
            f.write_bytes(f.read_bytes()[:100])  # truncate the data file
    rows = train_in_process([f"run.dir={tmp_path}", "train.steps=5", "checkpoint.every=2", "checkpoint.keep=5"])
    out = capfd.readouterr().out
    assert "step_4 is unusable" in out and "resumed from" in out and "step_2" in out
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "args, key",
    [
        (["train.foo=1"], "train.foo"),
        (["train.steps=abc"], "train.steps"),
        (["model=nope"], "model/nope"),
        (["model.n_routed_experts=10"], "model.n_expert_groups"),
        (["parallel.ep=3"], "parallel.ep"),
        (["train.global_batch=7"], "train.global_batch"),
        (["data.path=/nonexistent/corpus"], "data.path"),
        (["train.eval_every=-1"], "train.eval_every"),
        (["train.eval_every=2", "data.val_fraction=0"], "data.val_fraction"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, key):
    res = run_cli([f"run.dir={tmp_path}"] + args, timeout=120)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr, res.stderr
    assert err and err[-1].startswith("error: ") and key in err[-1], res.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_empty_corpus_is_named(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    res = run_cli([f"run.dir={tmp_path / 'run'}", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}"], timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: data.path")


def test_bad_input_keeps_existing_checkpoints(tmp_path):
    train_in_process([f"run.dir={tmp_path}", "train.steps=2", "checkpoint.every=2"])
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    metrics_before = read_metrics(str(tmp_path))
    res = run_cli([f"run.dir={tmp_path}", "train.steps=4", "parallel.ep=3"], timeout=120)
    assert res.returncode != 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert read_metrics(str(tmp_path)) == metrics_before
