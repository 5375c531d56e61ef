"""No silent wrong results and no lost runs: resume compatibility, never overwriting another run,
the path from training to Hugging Face weights, the README's Python example, corpus checks and
thread counts. Each test names the new-user report it answers."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from tests.helpers import REPO_ROOT, compose, run_cli, train_in_process
from trainer.checkpoint import CheckpointError


def _snapshot(run_dir) -> dict:
    """Every file under run_dir with its bytes (to show nothing was touched); Hydra's own job log
    (train.log, appended to by every invocation) left out."""
    out = {}
    for d, _, files in os.walk(run_dir):
        for f in files:
            if f == "train.log":
                continue
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, run_dir)] = fh.read()
    return out


# ---- "Resume loads the wrong model without a word" -------------------------------------------
def test_resume_refuses_a_checkpoint_of_another_model_config(tmp_path):
    run = tmp_path / "run"
    train_in_process([f"run.dir={run}", "train.steps=2", "model.n_layers=4"])
    before = _snapshot(run)
    res = run_cli([f"run.dir={run}", "train.steps=4"], timeout=120)  # the 3-layer default of model=tiny
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint.resume") and "model.n_layers: saved 4, this run 3" in line, line
    assert str(run / "checkpoints" / "step_2") in line
    assert _snapshot(run) == before, "nothing of the earlier run changed"


@pytest.mark.parametrize("change, tensor", [
    ("model.dim=32", "tensor model.embed.weight: saved shape (512, 64), expected (512, 32)"),
    ("model.n_layers=4", "tensor model.layers.3.attn.kv_norm.weight: absent from the checkpoint"),
])
def test_dcp_load_errors_name_the_tensor_and_the_folder(tmp_path, change, tensor):
    """A checkpoint without the recorded model config (written before it was recorded): DCP's
    CheckpointException is translated into the first differing tensor."""
    train_in_process([f"run.dir={tmp_path / 'a'}", "train.steps=1"])
    step = tmp_path / "a" / "checkpoints" / "step_1"
    meta = json.loads((step / "meta.json").read_text())
    for k in ("model", "params", "data"):
        meta.pop(k)
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        train_in_process([f"run.dir={tmp_path / 'b'}", "train.steps=2", f"checkpoint.resume={step}", change])
    assert str(err.value) == f"checkpoint.resume: cannot load {step}: {tensor}"


def test_inventory_mismatch_names_the_tensor(tmp_path):
    train_in_process([f"run.dir={tmp_path}", "train.steps=1"])
    step = tmp_path / "checkpoints" / "step_1"
    meta = json.loads((step / "meta.json").read_text())
    meta["params"]["model.head.weight"] = [512, 65]  # as if the code had changed the layer's shape
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{step} is another run's checkpoint: tensor model.head.weight: saved shape (512, 65), expected (512, 64)")):
        train_in_process([f"run.dir={tmp_path}", "train.steps=2"])


def test_data_fingerprint_mismatch_is_refused(tmp_path):
    train_in_process([f"run.dir={tmp_path}", "train.steps=1"])
    with pytest.raises(CheckpointError, match=r"data\.seed: saved 0, this run 1"):
        train_in_process([f"run.dir={tmp_path}", "train.steps=2", "data.seed=1"])


def test_allow_data_change_resumes_on_other_data_with_a_warning(tmp_path, capfd):
    train_in_process([f"run.dir={tmp_path}", "train.steps=1"])
    rows = train_in_process([f"run.dir={tmp_path}", "train.steps=2", "data.seed=1", "checkpoint.allow_data_change=true"])
    assert [r["step"] for r in rows] == [1, 2], "resumed after step 1 (metrics.jsonl holds both runs' steps)"
    out = capfd.readouterr().out
    assert "warning: checkpoint.allow_data_change: resuming" in out and "data.seed: saved 0, this run 1" in out


def test_resume_message_names_the_folder_loaded(tmp_path, capfd):
    train_in_process([f"run.dir={tmp_path / 'a'}", "train.steps=2"])
    step = tmp_path / "a" / "checkpoints" / "step_2"
    rows = train_in_process([f"run.dir={tmp_path / 'b'}", "train.steps=3", f"checkpoint.resume={step}"])
    assert f"resumed from {step}\n" in capfd.readouterr().out
    assert [r["step"] for r in rows] == [3]


# ---- "A config change destroys the previous run" ----------------------------------------------
def test_config_change_never_overwrites_the_previous_run(tmp_path):
    train_in_process([f"run.dir={tmp_path}", "train.steps=3", "checkpoint.every=1", "checkpoint.keep=0"])
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.dim: saved 64, this run 32; use a new run\.dir, or "
                                              r"checkpoint\.resume=none checkpoint\.overwrite=true"):
        train_in_process([f"run.dir={tmp_path}", "train.steps=3", "model.dim=32"])
    with pytest.raises(CheckpointError, match=r"already holds a run \(3 checkpoint\(s\)\)"):
        train_in_process([f"run.dir={tmp_path}", "train.steps=3", "model.dim=32", "checkpoint.resume=none"])
    assert _snapshot(tmp_path) == before
    rows = train_in_process([f"run.dir={tmp_path}", "train.steps=2", "model.dim=32", "checkpoint.resume=none",
                             "checkpoint.overwrite=true"])
    assert [r["step"] for r in rows] == [1, 2]
    moved = _snapshot(tmp_path / "replaced_0")
    assert moved == {k: v for k, v in before.items()}, "the earlier run is kept byte for byte"


def test_metrics_without_checkpoint_are_not_overwritten(tmp_path):
    train_in_process([f"run.dir={tmp_path}", "train.steps=2", "checkpoint.final=false"])
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl but no checkpoint"):
        train_in_process([f"run.dir={tmp_path}", "train.steps=2", "checkpoint.final=false"])
    assert _snapshot(tmp_path) == before


def test_keep_prunes_only_checkpoints_of_this_lineage(tmp_path):
    train_in_process([f"run.dir={tmp_path}", "train.steps=2", "checkpoint.every=1", "checkpoint.keep=0"])
    foreign = tmp_path / "checkpoints" / "step_1"  # e.g. left by another run of the same config
    meta = json.loads((foreign / "meta.json").read_text())
    meta["lineage"] = "another-run"
    (foreign / "meta.json").write_text(json.dumps(meta))
    train_in_process([f"run.dir={tmp_path}", "train.steps=5", "checkpoint.every=1", "checkpoint.keep=1"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1", "step_5"]


# ---- "No way from training to weights" ----------------------------------------------------------
def test_train_export_transformers_same_logits(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from launch.convert import main as convert
    from trainer.trainer import Trainer

    from tests.helpers import TINY

    trainer = Trainer(compose(TINY + [f"run.dir={tmp_path / 'run'}", "train.steps=3"]))
    trainer.train()  # no checkpoint.* key: the final checkpoint is the default
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_3")
    convert(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
    ours = trainer.model.eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    diff = float((a - b).abs().max())
    with capsys.disabled():
        print(f"\ntrain -> export -> transformers: max |logits difference| = {diff:.3e} (logits std {float(a.std()):.3f})")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # a step folder works the same way, and a folder with no checkpoint is one named error
    convert(["export", str(tmp_path / "run" / "checkpoints" / "step_3"), str(tmp_path / "hf2")])
    assert (tmp_path / "hf2" / "config.json").exists()
    with pytest.raises(SystemExit, match=r"^error: export: .*no checkpoints/ and not a step_N folder"):
        convert(["export", str(tmp_path), str(tmp_path / "hf3")])


def test_readme_python_example_gives_finite_logits():
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the example reads configs/model/*.yaml like a user in the checkout
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    logits = scope["logits"]
    assert logits.shape[:2] == scope["token_ids"].shape and logits.shape[-1] == scope["cfg"].vocab_size
    assert torch.isfinite(logits).all()


def test_model_is_initialised_at_construction_and_meta_stays_cheap():
    from model import DeepSeekV3
    from tests.helpers import tiny_model_cfg

    cfg = tiny_model_cfg()
    built = DeepSeekV3(cfg)
    ref = DeepSeekV3(cfg, init_seed=None)
    ref.init_weights(0)
    for (n, a), (_, b) in zip(built.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.device("meta"):
        m = DeepSeekV3(cfg)
    assert all(p.is_meta for p in m.parameters())


# ---- "Any single file is accepted as a corpus" -------------------------------------------------
def test_corpus_checks(tmp_path, capfd):
    import sys

    from trainer.data import DataConfig, DataError, TokenDataset

    cache = str(tmp_path / "cache")
    exe = tmp_path / "python"
    shutil.copy(sys.executable, exe)
    with pytest.raises(DataError, match=r"^data\.path: .*python' is not a text corpus file"):
        TokenDataset(DataConfig(path=str(exe), vocab_size=300, cache_dir=cache), 16)
    disguised = tmp_path / "python.txt"
    shutil.copy(sys.executable, disguised)
    with pytest.raises(DataError, match=r"^data\.path: .*python\.txt is binary"):
        TokenDataset(DataConfig(path=str(disguised), vocab_size=300, cache_dir=cache), 16)
    noisy = tmp_path / "latin1.txt"
    noisy.write_bytes(b"\xff\xfe" + ("caf\u00e9 " * 2000).encode("latin-1"))  # 2002 undecodable of 10002 bytes
    with pytest.raises(DataError, match=r"latin1\.txt is binary \(2002 undecodable"):
        TokenDataset(DataConfig(path=str(noisy), vocab_size=300, cache_dir=cache), 16)
    few = tmp_path / "few.txt"
    few.write_bytes(("the quick brown fox jumps over the lazy dog\n" * 200).encode() + b"\xff\xfe\xfd")
    ds = TokenDataset(DataConfig(path=str(few), vocab_size=300, cache_dir=cache), 16)
    assert "few.txt: 3 invalid UTF-8 sequence(s) replaced" in capfd.readouterr().out
    assert ds.meta["n_invalid_utf8"] == 3


# ---- "Threads" ---------------------------------------------------------------------------------
def test_threads_follow_train_threads_then_omp_num_threads(monkeypatch):
    from launch.train import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(0) == 1
    assert cpu_threads(3) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(0) == max(1, (os.cpu_count() or 1) // 2)
