"""Mixed precision for training (`precision: fp32 | bf16 | fp8`) and an activation-memory meter.

``apply_precision(model, precision, device)`` prepares the model for the chosen precision and
returns a factory of the context that must wrap every forward pass (``with autocast(): ...``):

=========  ==============================================================================  =====
precision  what happens                                                                    CPU
=========  ==============================================================================  =====
fp32       nothing; the factory yields a null context                                      yes
bf16       CUDA: ``torch.autocast("cuda", dtype=torch.bfloat16)`` around the forward;       no
           parameters (master weights), gradients and optimizer states stay fp32
fp8        ``enable_fp8(model)``: attention, MLP and expert projections run their three    yes
           GEMMs in fine-grained FP8 (E4M3, 1×128 / 128×128 scales, fp32 accumulation);     (sim)
           embedding, head, router, norms and the attention core stay high precision —
           on CUDA in bf16 autocast, on CPU in fp32 (FP8 is simulated exactly there).
           Weights and gradients stay fp32 (so no separate master copy).
=========  ==============================================================================  =====

bf16 on CPU is refused with a ConfigError (docs/architecture.md invariant 4: CPU runs are fp32; bf16
matmuls on these CPUs are ~400× slower), so ``launch.train precision=bf16`` without a GPU ends
with one line ``error: precision=bf16: ...``.

Whatever the precision, the AdamW moments are stored in ``optim.moment_dtype`` (auto: bf16 under
bf16/fp8) and a non-FP32 weight gets an FP32 master copy, both only in this rank's ZeRO-1 range
(parallel/zero.py).

Only the forward needs the context: autograd runs each backward op in the dtype its forward op
used, and non-reentrant activation checkpointing restores the forward's autocast state when it
recomputes.

``SavedActivations`` measures activation memory on any device: the bytes of the distinct
storages that autograd saves for backward inside the context (via
``torch.autograd.graph.saved_tensors_hooks``), parameters and buffers excluded. Unlike the
process RSS peak (``ru_maxrss``, monotonic and including the Python heap) it isolates what
activation recomputation saves: tensors saved inside a checkpointed region never reach the
outer hook (the checkpoint keeps only its inputs, which are counted).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, ContextManager, Iterable, Optional, Union

import torch
from torch import nn

from model.config import PRECISIONS, ConfigError
from model.transformer import enable_fp8

__all__ = ["PRECISIONS", "LiveSavedActivations", "SavedActivations", "apply_precision", "check_precision", "saved_activation_bytes"]

AutocastFactory = Callable[[], ContextManager]


def check_precision(precision: str, device: Union[torch.device, str]) -> None:
    """Named errors for a precision this device cannot run (no side effects; call it early)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected fp32|bf16|fp8, got {precision!r}")
    if precision == "bf16" and torch.device(device).type != "cuda":
        raise ConfigError("precision=bf16: CPU runs are fp32; bf16 is for CUDA")


def apply_precision(model: nn.Module, precision: str, device: Union[torch.device, str]) -> AutocastFactory:
    """Prepare ``model`` for ``precision`` on ``device``; return the forward's context factory.

    Usage::

        autocast = apply_precision(model, cfg.precision, device)
        with autocast():
            out = model(tokens, labels)
        out.loss.backward()
    """
    check_precision(precision, device)
    device = torch.device(device)
    if precision == "fp8":
        enable_fp8(model)
    if device.type == "cuda" and precision in ("bf16", "fp8"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---------------------------------------------------------------------------------------------
# activation memory
# ---------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


class SavedActivations:
    """Context manager: distinct storages autograd saves for backward while it is active.

    ``exclude`` (modules or tensors): their parameters and buffers are not activations (a linear
    saves its weight, RoPE saves a slice of the cos/sin buffer) and are not counted. Each
    storage is counted once, with its full size, however many views of it are saved.

    After the ``with`` block: ``.bytes`` (total), ``.count`` (distinct storages),
    ``.bytes_by_dtype()``.
    """

    def __init__(self, exclude: Optional[Union[nn.Module, Iterable[Union[nn.Module, torch.Tensor]]]] = None):
        if exclude is None:
            exclude = []
        elif isinstance(exclude, (nn.Module, torch.Tensor)):
            exclude = [exclude]
        self._exclude_items = list(exclude)
        self._excluded: set = set()
        self._seen: dict = {}
        self._dtypes: dict = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and not t.is_meta:
            key, nbytes = _storage_key(t)
            if key not in self._excluded and nbytes > 0:
                self._seen[key] = max(nbytes, self._seen.get(key, 0))
                self._dtypes[key] = t.dtype
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedActivations":
        self._excluded.clear()
        self._seen.clear()
        self._dtypes.clear()
        for item in self._exclude_items:
            tensors = [item] if isinstance(item, torch.Tensor) else [*item.parameters(), *item.buffers()]
            for t in tensors:
                self._excluded.add(_storage_key(t.detach())[0])
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def bytes(self) -> int:
        return int(sum(self._seen.values()))

    @property
    def count(self) -> int:
        return len(self._seen)

    def bytes_by_dtype(self) -> dict:
        """{dtype: bytes} of the saved storages (a storage counts under the dtype it was saved as)."""
        out: dict = {}
        for key, n in self._seen.items():
            out[self._dtypes[key]] = out.get(self._dtypes[key], 0) + n
        return out


def saved_activation_bytes(model: nn.Module, fn: Callable[[], torch.Tensor], backward: bool = True) -> int:
    """Bytes of activations ``fn()`` (a forward returning a scalar loss) saves for backward.

    Runs ``loss.backward()`` afterwards unless ``backward=False`` (then the graph is freed by
    dropping it)."""
    with SavedActivations(exclude=model) as meter:
        loss = fn()
    if backward:
        loss.backward()
    del loss
    return meter.bytes


class _Held:
    """A saved tensor while autograd keeps it: dropping the last one of a storage frees its bytes."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key, meter: "LiveSavedActivations"):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class LiveSavedActivations:
    """The PEAK of the bytes autograd holds for backward over a step (``saved_activation_bytes``).

    ``hooks()`` is a context (enter it around every forward, in the thread that runs it: saved
    tensor hooks are thread-local) that wraps each saved tensor in a holder; a storage counts, at
    full size, from its first save until autograd drops its last holder (after that backward).
    Parameters and buffers of ``exclude`` are not activations and are not counted. ``reset()``
    starts a step; ``peak`` is the largest live total since."""

    def __init__(self, exclude: Iterable[nn.Module] = ()):
        self._excluded = {_storage_key(t.detach())[0] for m in exclude for t in (*m.parameters(), *m.buffers())}
        self._refs: dict = {}
        self._sizes: dict = {}
        self._live = 0
        self.peak = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.peak = self._live

    def _pack(self, t: torch.Tensor):
        if t.layout != torch.strided or t.is_meta:
            return t
        key, nbytes = _storage_key(t)
        if key in self._excluded or nbytes == 0:
            return t
        with self._lock:
            if key not in self._refs:
                self._refs[key], self._sizes[key] = 0, nbytes
                self._live += nbytes
                self.peak = max(self.peak, self._live)
            self._refs[key] += 1
        return _Held(t, key, self)

    def _release(self, key) -> None:
        with self._lock:
            self._refs[key] -= 1
            if not self._refs[key]:
                del self._refs[key]
                self._live -= self._sizes.pop(key)

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Held) else h

    def hooks(self) -> ContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def metered(forward_context: AutocastFactory, meter: LiveSavedActivations) -> AutocastFactory:
    """The forward's context factory that also enters ``meter.hooks()``."""
    @contextlib.contextmanager
    def both():
        with forward_context(), meter.hooks():
            yield
    return both
