"""Data pipeline: corpus → byte-level BPE tokenizer → token memmap → deterministic samples.

Pure Python/NumPy plus Hugging Face ``tokenizers``; nothing here knows about ranks.

* Corpus: by default the Python standard library's own ``.py`` sources (real text on every
  machine with Python), in a fixed file order, capped at ``max_bytes``.  ``data.path`` may name a
  text file, a directory (its ``*.txt``/``*.md``/``*.py``/``*.rst`` files, recursively) or a glob.
* Tokenizer: byte-level BPE trained on that corpus, cached as ``tokenizer.json``.
* Tokens: one ``uint16`` (``uint32`` for vocabularies of 65536 or more) memmap ``tokens.bin``
  plus ``meta.json``; documents are separated by ``<|endoftext|>``.  The last ``val_fraction``
  of the tokens is the validation split.
* Cache: ``<root>/<key>`` where root is ``data.cache_dir``, else ``$DSV3_CACHE/data``, else
  ``~/.cache/dsv3/data``, and key hashes the file list (names, sizes, mtimes), the byte cap,
  the vocabulary size and the ``tokenizers`` version.  One process builds under an exclusive
  lock; files are written to a temporary name and ``os.replace``-d, ``meta.json`` last, so other
  processes (every torchrun rank starts at once) wait and then read complete files.
* Order: sample ``i`` of a split is the window starting at ``hash(seed, split, i)``, a pure
  function of the global sample index, so any number of processes or micro-batches that split
  a global batch see exactly the samples of the one-process run.
"""
from __future__ import annotations

import codecs
import errno
import fcntl
import glob
import hashlib
import json
import os
import socket
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DataConfig",
    "DataError",
    "TokenDataset",
    "corpus_files",
    "prepare",
]

EOT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
FORMAT_VERSION = 2  # bump when the cache layout or corpus assembly changes (2: binary files refused)
BINARY_SHARE = 0.01  # a file with more undecodable UTF-8 sequences per byte than this is binary

# Standard-library folders left out of the default corpus (tests, vendored or GUI demo code).
_STDLIB_SKIP = {
    "test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo",
    "__pycache__", "ensurepip", "tkinter", "distutils", "pydoc_data", "venv",
}


class DataError(ValueError):
    """Bad data configuration or corpus; the message starts with the offending key."""


@dataclass
class DataConfig:
    """Hydra group ``data`` (configs/data/*.yaml).  ``seq_len`` comes from ``train.seq_len``."""

    path: Optional[str] = None      # None: embedded stdlib corpus; else file, directory or glob
    max_bytes: int = 8_000_000      # cap on the corpus bytes read (files in sorted order)
    vocab_size: int = 8192          # BPE vocabulary (also the model's vocab for the toy model)
    seed: int = 0                   # seeds the sample order
    val_fraction: float = 0.01      # last fraction of the tokens held out for validation
    cache_dir: Optional[str] = None  # None: $DSV3_CACHE/data or ~/.cache/dsv3/data
    lock_timeout_s: float = 1800.0  # how long a process waits for another one's build


# --------------------------------------------------------------------------------------- corpus

def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP and not x.startswith("test"))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test"):
                out.append(os.path.join(d, f))
    return out


def corpus_files(cfg: DataConfig) -> List[str]:
    """The corpus files in their fixed order.  Raises DataError for a missing ``data.path``."""
    if cfg.path is None or str(cfg.path).strip() == "":
        return _stdlib_files()
    path = os.path.expanduser(str(cfg.path))
    if any(c in path for c in "*?["):
        matched = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        files = [p for p in matched if _is_text_name(p)]
        if not files:
            raise DataError(f"data.path: no such file or directory: {cfg.path!r} (the glob matched "
                            f"{len(matched)} file(s), none with a suffix in {TEXT_SUFFIXES})")
        return files
    if os.path.isfile(path):  # the same filter as for the files of a folder
        if not _is_text_name(path):
            raise DataError(f"data.path: {cfg.path!r} is not a text corpus file: its name needs a suffix in "
                            f"{TEXT_SUFFIXES} (the filter applied to folders too)")
        return [path]
    if os.path.isdir(path):
        out = []
        for d, dirs, files in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            out.extend(os.path.join(d, f) for f in sorted(files) if _is_text_name(f))
        return out
    raise DataError(f"data.path: no such file or directory: {cfg.path!r}")


def _is_text_name(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(TEXT_SUFFIXES) and not name.startswith(".")


def _select(files: Sequence[str], max_bytes: int) -> List[Tuple[str, int, int, int]]:
    """(path, size, mtime_ns, bytes_to_read) of the files that fit under the byte cap."""
    out, total = [], 0
    for p in files:
        st = os.stat(p)
        if st.st_size == 0:
            continue
        take = min(st.st_size, max_bytes - total)
        out.append((p, st.st_size, st.st_mtime_ns, take))
        total += take
        if total >= max_bytes:
            break
    return out


def _decode(path: str, raw: bytes, complete: bool) -> Tuple[str, int]:
    """UTF-8 text of a file's bytes and how many undecodable sequences were replaced (U+FFFD).
    Binary content (a NUL byte, or more than BINARY_SHARE undecodable sequences per byte) is a
    DataError. A file cut by max_bytes may end inside a character: that tail is dropped."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"data.path: {path} is binary (a NUL byte at offset {nul}), not text")
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=complete)
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if raw and bad / len(raw) > BINARY_SHARE:
        raise DataError(f"data.path: {path} is binary ({bad} undecodable UTF-8 sequences in {len(raw)} bytes, "
                        f"more than {BINARY_SHARE:.0%}), not text")
    return text, bad


def _read_docs(selected) -> Tuple[List[str], int]:
    """(documents, undecodable UTF-8 sequences replaced in all of them)."""
    docs, invalid = [], 0
    for p, size, _mtime, take in selected:
        with open(p, "rb") as f:
            raw = f.read(take)
        text, bad = _decode(p, raw, complete=take >= size)
        if bad:
            print(f"warning: data.path: {p}: {bad} invalid UTF-8 sequence(s) replaced by U+FFFD", flush=True)
        invalid += bad
        if text.strip():
            docs.append(text)
    return docs, invalid


def _cache_key(cfg: DataConfig, selected) -> str:
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps({
        "format": FORMAT_VERSION,
        "max_bytes": int(cfg.max_bytes),
        "vocab_size": int(cfg.vocab_size),
        "tokenizers": tokenizers.__version__,
        "files": [[os.path.abspath(p), s, m, t] for p, s, m, t in selected],
    }, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _cache_root(cfg: DataConfig) -> str:
    if cfg.cache_dir:
        return os.path.expanduser(str(cfg.cache_dir))
    if os.environ.get("DSV3_CACHE"):
        return os.path.join(os.path.expanduser(os.environ["DSV3_CACHE"]), "data")
    return os.path.join(os.path.expanduser("~"), ".cache", "dsv3", "data")


def _validate(cfg: DataConfig, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"train.seq_len: must be a positive integer, got {seq_len!r}")
    if not isinstance(cfg.vocab_size, int) or not 258 <= cfg.vocab_size < 2 ** 32:
        raise DataError(f"data.vocab_size: must be an integer in [258, 2**32) (256 byte tokens + "
                        f"{EOT} + at least one merge), got {cfg.vocab_size!r}")
    if not isinstance(cfg.max_bytes, int) or cfg.max_bytes < 1:
        raise DataError(f"data.max_bytes: must be a positive integer, got {cfg.max_bytes!r}")
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise DataError(f"data.val_fraction: must be in [0, 1), got {cfg.val_fraction!r}")


# ---------------------------------------------------------------------------------------- lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(lock_path: str) -> Tuple[Optional[int], str]:
    try:
        with open(lock_path) as f:
            info = json.loads(f.read() or "{}")
        return int(info.get("pid")), str(info.get("host", ""))
    except (OSError, ValueError, TypeError):
        return None, ""


class _BuildLock:
    """Exclusive lock on ``<dir>/.lock``: fcntl.flock, falling back to an O_EXCL pid file where
    the filesystem refuses flock.  The holder's pid and host are written into the file so a
    waiter can tell a live builder from a stale lock (its owner died)."""

    def __init__(self, directory: str, timeout_s: float):
        self.path = os.path.join(directory, ".lock")
        self.timeout_s = timeout_s
        self.fd: Optional[int] = None
        self.exclusive_file = False

    def _owner_note(self) -> str:
        pid, host = _read_owner(self.path)
        if pid is None:
            return ""
        same_host = host == socket.gethostname()
        alive = _pid_alive(pid) if same_host else None
        state = "alive" if alive else ("dead" if alive is False else "on another host")
        return f" (held by pid {pid} on {host or '?'}, {state})"

    def __enter__(self):
        deadline = time.monotonic() + self.timeout_s
        warned = False
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:  # flock not supported here (some network filesystems)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(self.fd)
                    self.fd = None
                    return self._enter_exclusive_file(deadline)
                raise
            pid, host = _read_owner(self.path)
            if (pid is not None and host == socket.gethostname() and not _pid_alive(pid)
                    and not warned):
                warnings.warn(
                    f"data cache lock {self.path} is held but the pid written in it ({pid}) is "
                    "dead: a child process that inherited the lock may still be running. Waiting; "
                    f"if nothing is building, end that process or delete {self.path}.")
                warned = True
            if time.monotonic() > deadline:
                os.close(self.fd)
                self.fd = None
                raise DataError(
                    f"data.cache_dir: timed out after {self.timeout_s:.0f}s waiting for the "
                    f"lock {self.path}{self._owner_note()}; another process is building this "
                    "dataset or died holding the lock — delete the lock file if no process is "
                    "building (data.lock_timeout_s sets the wait)")
            time.sleep(0.2)
        self._write_owner()
        return self

    def _enter_exclusive_file(self, deadline: float):
        self.exclusive_file = True
        while True:
            try:
                self.fd = os.open(self.path + ".x", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                pid, host = _read_owner(self.path + ".x")
                if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
                    warnings.warn(f"removing stale data cache lock {self.path}.x: its owner pid "
                                  f"{pid} on {host} is dead (a crashed build)")
                    try:
                        os.unlink(self.path + ".x")
                    except FileNotFoundError:
                        pass
                    continue
                if time.monotonic() > deadline:
                    raise DataError(
                        f"data.cache_dir: timed out after {self.timeout_s:.0f}s waiting for the "
                        f"lock {self.path}.x (owner pid {pid} on {host or '?'}); delete it if no "
                        "process is building")
                time.sleep(0.2)
        self._write_owner()
        return self

    def _write_owner(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(),
                  0)

    def __exit__(self, *exc):
        if self.fd is None:
            return
        if self.exclusive_file:
            os.close(self.fd)
            try:
                os.unlink(self.path + ".x")
            except FileNotFoundError:
                pass
        else:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = None


# --------------------------------------------------------------------------------------- build

def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _train_tokenizer(docs: List[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def _build(cfg: DataConfig, selected, directory: str, seq_len: int) -> dict:
    t0 = time.perf_counter()
    docs, invalid = _read_docs(selected)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    if n_bytes == 0:
        raise DataError(f"data.path: corpus {_corpus_name(cfg)} has 0 tokens, need at least "
                        f"seq_len+1 = {seq_len + 1} (no text in {len(selected)} file(s))")
    tok = _train_tokenizer(docs, cfg.vocab_size)
    t_tok = time.perf_counter() - t0
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if cfg.vocab_size <= 65536 else np.uint32
    parts = []
    for enc in tok.encode_batch(docs):
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(np.asarray([eot], dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    os.makedirs(directory, exist_ok=True)
    _atomic_write_bytes(os.path.join(directory, "tokenizer.json"), tok.to_str().encode())
    _atomic_write_bytes(os.path.join(directory, "tokens.bin"), tokens.tobytes())
    meta = {
        "format": FORMAT_VERSION,
        "n_tokens": int(tokens.size),
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(cfg.vocab_size),
        "tokenizer_vocab_size": int(tok.get_vocab_size()),
        "eot_id": int(eot),
        "n_files": len(selected),
        "n_docs": len(docs),
        "n_bytes": int(n_bytes),
        "n_invalid_utf8": int(invalid),
        "source": _corpus_name(cfg),
        "built_by_pid": os.getpid(),
        "tokenizer_train_s": round(t_tok, 3),
        "build_s": round(time.perf_counter() - t0, 3),
    }
    _atomic_write_bytes(os.path.join(directory, "meta.json"), json.dumps(meta, indent=1).encode())
    return meta


def _corpus_name(cfg: DataConfig) -> str:
    return repr(cfg.path) if cfg.path else "<python stdlib sources>"


def _load_meta(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT_VERSION else None


def prepare(cfg: DataConfig, seq_len: int) -> Tuple[str, dict]:
    """Validate, then build (or find) the cache; returns ``(cache_dir, meta)``.

    Safe to call from every rank at once: one builds, the others wait on the lock."""
    _validate(cfg, seq_len)
    files = corpus_files(cfg)
    selected = _select(files, int(cfg.max_bytes))
    if not selected:
        raise DataError(f"data.path: corpus {_corpus_name(cfg)} has 0 tokens, need at least "
                        f"seq_len+1 = {seq_len + 1} ({len(files)} file(s), all empty or none "
                        f"with a suffix in {TEXT_SUFFIXES})")
    directory = os.path.join(_cache_root(cfg), _cache_key(cfg, selected))
    meta = _load_meta(directory)
    if meta is None:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise DataError(f"data.cache_dir: cannot create {directory}: {e}") from e
        with _BuildLock(directory, float(getattr(cfg, "lock_timeout_s", 1800.0))):
            meta = _load_meta(directory)
            if meta is None:
                meta = _build(cfg, selected, directory, seq_len)
    elif meta.get("n_invalid_utf8"):  # built earlier: the build printed it per file
        print(f"warning: data.path: corpus {_corpus_name(cfg)} had {meta['n_invalid_utf8']} invalid UTF-8 "
              "sequence(s), replaced by U+FFFD", flush=True)
    if meta["n_tokens"] < seq_len + 1:
        raise DataError(f"data.path: corpus {_corpus_name(cfg)} has {meta['n_tokens']} tokens, "
                        f"need at least seq_len+1 = {seq_len + 1}")
    return directory, meta


# ------------------------------------------------------------------------------------- dataset

_SPLITS = {"train": 0x747261696E, "val": 0x76616C}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wraps modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TokenDataset:
    """Random windows of ``seq_len + 1`` tokens; sample ``i`` depends only on (seed, split, i).

    ``batch(indices)[:, :-1]`` are the inputs and ``batch(indices)[:, 1:]`` the targets."""

    def __init__(self, cfg: DataConfig, seq_len: int):
        self.cfg = cfg
        if isinstance(seq_len, np.integer):
            seq_len = int(seq_len)
        self.seq_len = seq_len
        self.cache_dir, self.meta = prepare(cfg, self.seq_len)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(os.path.join(self.cache_dir, "tokenizer.json"))
        self.eot_id: int = int(self.meta["eot_id"])
        self.tokens = np.memmap(os.path.join(self.cache_dir, "tokens.bin"),
                                dtype=np.dtype(self.meta["dtype"]), mode="r",
                                shape=(int(self.meta["n_tokens"]),))
        n, w = self.tokens.size, self.seq_len + 1
        n_val = int(round(n * float(cfg.val_fraction))) if cfg.val_fraction > 0 else 0
        if n_val:
            n_val = max(n_val, w)
            if n - n_val < w:  # too small to hold both splits: all for training, no val split
                n_val = 0
        self.n_train = n - n_val
        self.n_val = n_val
        self._seed_key = int(_mix64(np.array([int(cfg.seed) & (2 ** 64 - 1)],
                                             dtype=np.uint64))[0])

    def fingerprint(self) -> dict:
        """What a checkpoint's data position depends on: the tokenizer, the token stream's length
        and the held-out split (the sample order's seed is data.seed, added by the caller)."""
        with open(os.path.join(self.cache_dir, "tokenizer.json"), "rb") as f:
            tok = hashlib.sha256(f.read()).hexdigest()[:16]
        return {"tokenizer_sha256": tok, "n_tokens": int(self.meta["n_tokens"]),
                "data.val_fraction": float(self.cfg.val_fraction)}

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (``data.vocab_size``); every token id is below it."""
        return int(self.cfg.vocab_size)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _range(self, split: str) -> Tuple[int, int]:
        if split == "train":
            return 0, self.n_train
        if split == "val":
            if self.n_val == 0:
                raise DataError(
                    f"data.val_fraction: no validation split ({self.cfg.val_fraction} of "
                    f"{self.tokens.size} tokens is fewer than seq_len+1 = {self.seq_len + 1} "
                    "tokens, or val_fraction is 0)")
            return self.n_train, self.tokens.size
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def windows(self, split: str = "train") -> int:
        """Distinct sample windows of ``split`` (a DataError if the split is empty)."""
        lo, hi = self._range(split)
        return hi - lo - self.seq_len

    def starts(self, indices, split: str = "train") -> np.ndarray:
        """Window start offsets (int64) of the given global sample indices."""
        lo = self._range(split)[0]
        n_windows = self.windows(split)  # starts lo .. hi-(seq_len+1) inclusive
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and idx.min() < 0:
            raise ValueError("sample indices must be >= 0")
        key = np.uint64(self._seed_key ^ _SPLITS[split])
        h = _mix64(_mix64(idx.astype(np.uint64) ^ key))
        return lo + (h % np.uint64(n_windows)).astype(np.int64)

    def sample(self, global_index: int, split: str = "train") -> np.ndarray:
        """Tokens of sample ``global_index``: int64 array of length ``seq_len + 1``."""
        s = int(self.starts([global_index], split)[0])
        return np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices, split: str = "train") -> np.ndarray:
        """int64 array ``[len(indices), seq_len + 1]``; row k is ``sample(indices[k])``."""
        starts = self.starts(indices, split)
        out = np.empty((starts.size, self.seq_len + 1), dtype=np.int64)
        for k, s in enumerate(starts):
            out[k] = self.tokens[s:s + self.seq_len + 1]
        return out

    def __repr__(self) -> str:
        return (f"TokenDataset({self.meta['source']}, {self.meta['n_tokens']} tokens, "
                f"vocab {self.vocab_size}, seq_len {self.seq_len}, cache {self.cache_dir})")


def _main(argv: Optional[List[str]] = None) -> None:
    """``python -m trainer.data [vocab_size] [max_bytes]``: build the default cache, print meta."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = DataConfig()
    if argv:
        cfg.vocab_size = int(argv[0])
    if len(argv) > 1:
        cfg.max_bytes = int(argv[1])
    t0 = time.perf_counter()
    ds = TokenDataset(cfg, seq_len=256)
    print(json.dumps({**ds.meta, "cache_dir": ds.cache_dir,
                      "wall_s": round(time.perf_counter() - t0, 3), "config": asdict(cfg)}))


if __name__ == "__main__":
    _main()
