"""Surviving what clusters do: preemption notices, non-finite values, asynchronous checkpoints
(single process here; the torchrun cases are in tests/test_chaos.py)."""
from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from tests.helpers import compose, read_metrics, run_cli, train_in_process
from trainer.preemption import PREEMPTED_EXIT_CODE


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP step folder, by key (model., optim., ema.)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(os.path.dirname(path), os.path.basename(path) + ".pt")
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


def test_skip_leaves_every_state_untouched(tmp_path):
    """on_nonfinite=skip at step 4: the weights, AdamW moments and step counts, router biases and
    EMA after step 4 are those after step 3 of a run that stopped there; the step is counted."""
    common = ["checkpoint.final=true", "train.ema_decay=0.9"]
    train_in_process([f"run.dir={tmp_path / 'ref'}", "train.steps=3", *common])
    rows = train_in_process([f"run.dir={tmp_path / 'skip'}", "train.steps=4", *common, "train.on_nonfinite=skip",
                             "debug.inject_nonfinite_at_step=4"])
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1]
    assert rows[3]["grad_norm"] != rows[3]["grad_norm"], "the injected NaN reaches the logged grad norm"
    ref = load_checkpoint(str(tmp_path / "ref" / "checkpoints" / "step_3"))
    skip = load_checkpoint(str(tmp_path / "skip" / "checkpoints" / "step_4"))
    assert any(k.startswith("ema.") for k in ref) and any(k.endswith("bias") for k in ref)
    assert_same_tensors(ref, skip)
    meta = json.load(open(tmp_path / "skip" / "checkpoints" / "step_4" / "meta.json"))
    assert meta["skipped_steps"] == 1 and meta["ema_updates"] == 3


def test_stop_names_step_rank_and_parameter_and_keeps_last_good_checkpoint(tmp_path):
    res = run_cli([f"run.dir={tmp_path}", "train.steps=6", "checkpoint.every=2", "debug.inject_nonfinite_at_step=5"],
                  timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    injected = [ln for ln in res.stdout.splitlines() if "puts a NaN into the gradient of" in ln]
    name = injected[0].split("gradient of ")[1].split(" at step")[0]
    assert len(errors) == 1 and "step 5" in errors[0] and "rank(s) 0" in errors[0], res.stderr
    assert errors[0].startswith("error: train.on_nonfinite=stop") and errors[0].endswith(
        "No checkpoint was written from this state") and f": {name}." in errors[0], (errors, name)
    assert ".experts." in name and name.rsplit(".", 1)[1].isdigit(), "a routed expert is named by its global id"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2", "step_4"]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_sigterm_checkpoints_the_current_step_and_resumes_bit_exactly(tmp_path):
    """A SIGTERM arriving during step 3 (debug.faults term): step 3 completes, is checkpointed, the
    run exits with 143; the resumed run matches the uninterrupted one bit for bit, no step lost."""
    straight = train_in_process([f"run.dir={tmp_path / 'a'}", "train.steps=6"])
    run = [f"run.dir={tmp_path / 'b'}", "train.steps=6", "checkpoint.every=5"]
    with pytest.raises(SystemExit) as stop:
        train_in_process(run + ["debug.faults=[0:3:0:term]"])
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert os.listdir(tmp_path / "b" / "checkpoints") == ["step_3"]
    assert [r["step"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2, 3], "steps lost: 0"
    resumed = train_in_process(run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]


def test_async_save_resumes_bit_exactly_and_blocks_less(tmp_path):
    """checkpoint.async_save: resume from an asynchronous checkpoint is bit-exact, and the loop
    is blocked for less time than by a synchronous save (median over the saves of the run)."""
    common = ["train.steps=8", "checkpoint.every=1", "checkpoint.keep=2"]
    sync = train_in_process([f"run.dir={tmp_path / 'sync'}", *common])
    first = train_in_process([f"run.dir={tmp_path / 'async'}", *common, "checkpoint.async_save=true",
                              "train.exit_after_steps=5"])
    assert sorted(os.listdir(tmp_path / "async" / "checkpoints")) == ["step_4", "step_5"], "committed, pruned"
    resumed = train_in_process([f"run.dir={tmp_path / 'async'}", *common, "checkpoint.async_save=true"])
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(sync, resumed):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    block_sync = statistics.median(r["checkpoint_block_s"] for r in sync)
    block_async = statistics.median(r["checkpoint_block_s"] for r in first + resumed[5:])
    print(f"checkpoint_block_s median: sync {block_sync:.4f} s, async {block_async:.4f} s")
    assert block_async < block_sync, (block_async, block_sync)


@pytest.mark.parametrize("args, key", [
    (["train.on_nonfinite=ignore"], "train.on_nonfinite"),
    (["checkpoint.preemption_signals=[SIGNOPE]"], "checkpoint.preemption_signals"),
    (["debug.faults=[1:2:kill]"], "debug.faults"),
])
def test_bad_resilience_keys_are_named(args, key):
    from model import ConfigError
    from trainer.trainer import Trainer

    with pytest.raises(ConfigError, match=key):
        Trainer(compose(["model=tiny", "data=tiny", "train.seq_len=32", "train.global_batch=8", *args]))
