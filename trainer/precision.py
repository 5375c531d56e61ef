"""Mixed precision for training (`precision: fp32 | bf16 | fp8`) and an activation-memory meter.

The model is built for its precision (``DeepSeekV3(..., numerics=numerics_for(precision))``,
model/mixed.py), and ``autocast_for(precision, device)`` is the factory of the context that wraps
every forward pass (``with autocast(): ...``):

=========  ==============================================================================
precision  what happens (CPU and CUDA)
=========  ==============================================================================
fp32       FP32 weights and gradients; the factory yields a null context
bf16       BF16 weights (the seeded FP32 initialisation rounded); every read goes through
           model.mixed.weight: an FP32 value for compute and an FP32 gradient accumulated in
           ``param.main_grad`` (no BF16 ``.grad``). CPU: fp32 GEMMs on the BF16 values (CPU
           BF16 matmuls are ~400× slower); CUDA: ``torch.autocast("cuda", bfloat16)`` around the
           forward, native BF16 GEMMs.
fp8        bf16's storage, and attention, MLP and expert projections run their three GEMMs in
           fine-grained FP8 (E4M3, 1×128 / 128×128 scales, fp32 accumulation); embedding, head,
           router, norms and the attention core stay high precision — on CUDA in bf16
           autocast, on CPU in fp32 (FP8 is simulated exactly there).
=========  ==============================================================================

Under bf16/fp8 the FP32 master copy of the weights and the AdamW moments (``optim.moment_dtype``,
auto: bf16) exist only in this rank's ZeRO-1 range (parallel/zero.py); the updated range is cast
to BF16 and all-gathered. ``apply_precision(model, precision, device)`` is the older path for a
model already built with FP32 weights (tests, benchmarks): it flips the FP8 switch on and
returns the factory.

Only the forward needs the context: autograd runs each backward op in the dtype its forward op
used, and non-reentrant activation checkpointing restores the forward's autocast state when it
recomputes.

``SavedActivations`` measures activation memory on any device: the bytes of the distinct
storages that autograd saves for backward inside the context (via
``torch.autograd.graph.saved_tensors_hooks``), parameters, buffers and the FP32 copies of BF16
weights that model.mixed.weight makes for CPU compute excluded. Unlike the
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
from model.mixed import Numerics, is_weight_copy, numerics_for
from model.transformer import enable_fp8

__all__ = ["PRECISIONS", "LiveSavedActivations", "Numerics", "SavedActivations", "apply_precision", "autocast_for",
           "check_precision", "numerics_for", "saved_activation_bytes"]

AutocastFactory = Callable[[], ContextManager]


def check_precision(precision: str, device: Union[torch.device, str]) -> None:
    """Named error for an unknown precision (no side effects; call it early). Every precision runs
    on CPU and CUDA (bf16 on CPU: BF16 storage, fp32 compute)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected fp32|bf16|fp8, got {precision!r}")


def autocast_for(precision: str, device: Union[torch.device, str]) -> AutocastFactory:
    """The forward's context factory: bf16 autocast on CUDA under bf16/fp8, else a null context.

    Usage::

        model = DeepSeekV3(cfg, numerics=numerics_for(cfg.precision))
        autocast = autocast_for(cfg.precision, device)
        with autocast():
            out = model(tokens, labels)
        out.loss.backward()
    """
    check_precision(precision, device)
    if torch.device(device).type == "cuda" and precision in ("bf16", "fp8"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def apply_precision(model: nn.Module, precision: str, device: Union[torch.device, str]) -> AutocastFactory:
    """For a model built with FP32 weights: FP8 projections under fp8 (FP32 storage kept), and the
    forward's context factory. The trainer builds with ``numerics_for(precision)`` instead."""
    check_precision(precision, device)
    if precision == "fp8":
        enable_fp8(model)
    return autocast_for(precision, device)


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
        if t.layout == torch.strided and not t.is_meta and not is_weight_copy(t):
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
        if t.layout != torch.strided or t.is_meta or is_weight_copy(t):
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
