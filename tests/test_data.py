"""trainer/data.py: determinism, layout-independent order, tokenizer, user corpora, errors."""
import dataclasses
import fcntl
import json
import multiprocessing as mp
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from trainer.data import DataConfig, DataError, TokenDataset

SEQ = 64


def _text(n_lines=400):
    return "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                   for i in range(n_lines))


def test_same_index_same_sample_across_instances(tiny_data_cfg, tiny_dataset):
    other = TokenDataset(dataclasses.replace(tiny_data_cfg), seq_len=SEQ)  # loads from the cache
    assert other.cache_dir == tiny_dataset.cache_dir
    for i in (0, 1, 17, 10_000, 2 ** 40):
        a, b = tiny_dataset.sample(i), other.sample(i)
        assert a.dtype == np.int64 and a.shape == (SEQ + 1,)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tiny_dataset.sample(3, "val"), other.sample(3, "val"))


def test_rebuild_in_another_cache_is_identical(tiny_data_cfg, tiny_dataset, tmp_path):
    # Every node may build its own cache: the tokenizer and tokens must come out the same.
    fresh = TokenDataset(dataclasses.replace(tiny_data_cfg, cache_dir=str(tmp_path)), seq_len=SEQ)
    assert fresh.cache_dir != tiny_dataset.cache_dir
    np.testing.assert_array_equal(np.asarray(fresh.tokens), np.asarray(tiny_dataset.tokens))
    np.testing.assert_array_equal(fresh.batch(range(32)), tiny_dataset.batch(range(32)))


def test_global_batch_independent_of_split(tiny_dataset):
    whole = tiny_dataset.batch(range(0, 8))
    parts = np.concatenate([tiny_dataset.batch(range(0, 4)), tiny_dataset.batch(range(4, 8))])
    np.testing.assert_array_equal(whole, parts)
    assert whole.shape == (8, SEQ + 1) and whole.dtype == np.int64
    for k in range(8):
        np.testing.assert_array_equal(whole[k], tiny_dataset.sample(k))
    # micro-batches of a global batch (samples 24 … 31) cover exactly that batch
    idx = range(24, 32)
    micro = np.concatenate([tiny_dataset.batch(idx[j:j + 2]) for j in range(0, 8, 2)])
    np.testing.assert_array_equal(micro, tiny_dataset.batch(idx))


def test_windows_stay_in_their_split_and_seed_matters(tiny_data_cfg, tiny_dataset):
    ds = tiny_dataset
    st = ds.starts(range(2000), "train")
    assert st.min() >= 0 and st.max() + SEQ + 1 <= ds.n_train
    sv = ds.starts(range(200), "val")
    assert sv.min() >= ds.n_train and sv.max() + SEQ + 1 <= ds.tokens.size
    assert len(set(st.tolist())) > 1900  # spread out, not a constant
    assert ds.n_val >= SEQ + 1
    b = ds.batch(range(64))
    assert b.min() >= 0 and b.max() < ds.vocab_size
    other = TokenDataset(dataclasses.replace(tiny_data_cfg, seed=1), seq_len=SEQ)
    assert other.cache_dir == ds.cache_dir  # the seed changes the order, not the cache
    assert not np.array_equal(other.batch(range(8)), b[:8])


def test_tokenizer_round_trip_on_stdlib_snippet(tiny_dataset):
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8") as f:
        text = f.read()[:4000]
    text += "\n# unicode: héllo wörld — ∑ 你好 🙂\n\t tabs  and   spaces\n"
    ids = tiny_dataset.encode(text)
    assert max(ids) < tiny_dataset.vocab_size
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    assert tiny_dataset.decode(ids) == text
    assert tiny_dataset.tokenizer.get_vocab_size() <= tiny_dataset.vocab_size


def test_user_text_file_directory_and_glob(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(_text())
    (d / "b.md").write_text("# Title\n\n" + _text(200))
    (d / "skip.bin").write_bytes(b"\x00\x01" * 100)
    cache = str(tmp_path / "cache")
    one = TokenDataset(DataConfig(path=str(d / "a.txt"), vocab_size=300, cache_dir=cache), SEQ)
    assert one.meta["n_files"] == 1 and one.meta["n_bytes"] == len(_text())
    assert "quick brown fox" in one.decode(one.sample(0))
    both = TokenDataset(DataConfig(path=str(d), vocab_size=300, cache_dir=cache), SEQ)
    assert both.meta["n_files"] == 2 and both.cache_dir != one.cache_dir
    glob_ds = TokenDataset(DataConfig(path=str(d / "*.txt"), vocab_size=300, cache_dir=cache), SEQ)
    assert glob_ds.cache_dir == one.cache_dir


def test_missing_path_is_named_error(tmp_path):
    with pytest.raises(DataError, match=r"^data\.path: no such file or directory: .*nope"):
        TokenDataset(DataConfig(path=str(tmp_path / "nope.txt"), cache_dir=str(tmp_path)), SEQ)
    with pytest.raises(DataError, match=r"^data\.path: no such file"):
        TokenDataset(DataConfig(path=str(tmp_path / "*.nothing"), cache_dir=str(tmp_path)), SEQ)
    assert not (tmp_path / "nope.txt").exists()


def test_empty_corpus_is_named_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"^data\.path: corpus .* has 0 tokens, need at least "
                                        r"seq_len\+1 = 65"):
        TokenDataset(DataConfig(path=str(tmp_path / "empty.txt"), cache_dir=cache), SEQ)
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "x.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match=r"^data\.path: corpus .* has 0 tokens"):
        TokenDataset(DataConfig(path=str(tmp_path / "no_text"), cache_dir=cache), SEQ)
    assert not os.path.exists(cache)  # nothing was built or written
    (tmp_path / "short.txt").write_text("hello world\n")
    with pytest.raises(DataError, match=r"^data\.path: corpus .* has \d+ tokens, need at least "
                                        r"seq_len\+1 = 65"):
        TokenDataset(DataConfig(path=str(tmp_path / "short.txt"), vocab_size=300,
                                cache_dir=cache), SEQ)


def test_bad_values_are_named_errors(tmp_path):
    with pytest.raises(DataError, match=r"^data\.vocab_size"):
        TokenDataset(DataConfig(vocab_size=100, cache_dir=str(tmp_path)), SEQ)
    with pytest.raises(DataError, match=r"^data\.val_fraction"):
        TokenDataset(DataConfig(val_fraction=1.5, cache_dir=str(tmp_path)), SEQ)
    with pytest.raises(DataError, match=r"^train\.seq_len"):
        TokenDataset(DataConfig(cache_dir=str(tmp_path)), 0)


def _build_in_child(args):
    path, cache = args
    ds = TokenDataset(DataConfig(path=path, vocab_size=300, cache_dir=cache), SEQ)
    return ds.meta["built_by_pid"], int(np.asarray(ds.tokens, dtype=np.int64).sum())


def test_concurrent_processes_build_once(tmp_path):
    (tmp_path / "c.txt").write_text(_text(2000))
    args = (str(tmp_path / "c.txt"), str(tmp_path / "cache"))
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build_in_child, [args] * 3)
    assert len({r[0] for r in results}) == 1, results  # one builder, the others read its files
    assert len({r[1] for r in results}) == 1
    (cache_dir,) = [p for p in (tmp_path / "cache").iterdir()]
    assert sorted(os.listdir(cache_dir)) == [".lock", "meta.json", "tokenizer.json", "tokens.bin"]


def test_lock_held_by_dead_pid_is_explained(tmp_path):
    (tmp_path / "c.txt").write_text(_text())
    cfg = DataConfig(path=str(tmp_path / "c.txt"), vocab_size=300,
                     cache_dir=str(tmp_path / "cache"), lock_timeout_s=0.5)
    with pytest.raises(DataError):  # learn the cache dir: make the corpus too short for seq 10**6
        TokenDataset(cfg, 10 ** 6)
    (cache_dir,) = list((tmp_path / "cache").iterdir())
    os.remove(cache_dir / "meta.json")  # force a rebuild, which must wait for the lock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, e.g. by a child of a crashed builder
        os.write(fd, json.dumps({"pid": dead.pid, "host": os.uname().nodename}).encode())
        with pytest.warns(UserWarning, match="dead"):
            with pytest.raises(DataError, match=r"^data\.cache_dir: timed out .*dead"):
                TokenDataset(cfg, SEQ)
    finally:
        os.close(fd)
    assert TokenDataset(cfg, SEQ).meta["n_tokens"] > SEQ  # lock released: builds fine
