"""Exponential moving average of the parameters, kept in CPU memory (DeepSeek-V3 §3.2.3).

``ema = decay · ema + (1 − decay) · p`` after each optimizer step, in fp32 on the CPU, with the
arithmetic done by a background thread so that it is off the training critical path:

* ``update(model)`` takes a *synchronous snapshot* of the parameters — on CUDA non-blocking
  device→host copies into pinned CPU buffers on the current stream plus a CUDA event; on CPU a
  copy into preallocated buffers — and queues the arithmetic to the worker thread. Because the
  D2H copies are enqueued on the current stream, any kernel that later overwrites a parameter
  (the next optimizer step) is ordered after them, and on CPU the copy is complete when
  ``update`` returns: the caller may modify parameters immediately. The worker waits on the
  event, then does the fp32 math.
* One snapshot buffer set is reused, so ``update`` first waits for the *previous* update's math
  (normally long finished — a whole training step has passed).
* ``wait()`` joins pending work (and re-raises a worker exception); ``state_dict``,
  ``load_state_dict``, ``copy_to`` and ``swapped_into`` wait first.

Keys are parameter names as given by ``model.named_parameters()`` (or any mapping / iterable of
``(name, tensor)``), so a pipeline stage that holds part of the model keeps the EMA of just its
parameters; use globally unique names (e.g. the full-model names) if stage EMAs are merged for a
checkpoint. With ZeRO / mixed precision, pass the fp32 master parameters if the model params
are bf16. Buffers (e.g. a router bias kept as a buffer) are not averaged.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["CPUEMA"]

NamedTensors = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]


def _named(params: NamedTensors) -> Dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        return dict(params.named_parameters())
    if isinstance(params, Mapping):
        return dict(params)
    return dict(params)


def _worker(jobs: "queue.Queue") -> None:
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            job()
        finally:
            jobs.task_done()


class CPUEMA:
    """fp32 CPU EMA of named parameters, updated asynchronously.

    Args:
        params: the model (``nn.Module``) or a mapping / iterable of ``(name, tensor)``; the EMA
            is initialised to a copy of these values.
        decay: EMA decay (e.g. 0.999).
    """

    def __init__(self, params: NamedTensors, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        named = _named(params)
        self._shadow: Dict[str, torch.Tensor] = {}
        self._snap: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in named.items():
                self._shadow[name] = p.detach().to("cpu", torch.float32, copy=True)
                pin = p.is_cuda and torch.cuda.is_available()
                # snapshot buffers keep the param dtype (bf16 params → half the D2H bytes)
                self._snap[name] = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
        self._error: Optional[BaseException] = None
        self._closed = False
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=_worker, args=(self._jobs,), name="CPUEMA", daemon=True)
        self._thread.start()
        # stop the thread if the object is garbage-collected without close()
        self._finalizer = weakref.finalize(self, CPUEMA._stop, self._jobs, self._thread)

    # -- worker plumbing ------------------------------------------------------------------------
    @staticmethod
    def _stop(jobs: "queue.Queue", thread: threading.Thread) -> None:
        if thread.is_alive():
            jobs.put(None)
            thread.join()

    def _submit(self, fn: Callable[[], None]) -> None:
        def job():
            try:
                fn()
            except BaseException as e:  # surfaced by wait()
                self._error = e

        self._jobs.put(job)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CPUEMA is closed")

    def wait(self) -> None:
        """Block until all queued updates are applied; re-raise a worker error if there was one."""
        self._jobs.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("CPUEMA background update failed") from err

    def close(self) -> None:
        """Wait for pending work and stop the worker thread (idempotent)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "CPUEMA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- update ---------------------------------------------------------------------------------
    def _apply(self, snap: Dict[str, torch.Tensor], decay: float) -> None:
        """The arithmetic (runs in the worker thread): ema = decay·ema + (1−decay)·p."""
        w = 1.0 - decay
        for name, ema in self._shadow.items():
            ema.mul_(decay).add_(snap[name].float(), alpha=w)

    def update(self, params: NamedTensors, decay: Optional[float] = None) -> None:
        """Snapshot ``params`` now and fold them into the EMA in the background.

        Parameters may be modified as soon as this returns. ``decay`` overrides the configured
        decay for this update only (e.g. for a warm-up schedule)."""
        self._check_open()
        d = self.decay if decay is None else float(decay)
        named = _named(params)
        if named.keys() != self._shadow.keys():
            missing = sorted(self._shadow.keys() - named.keys())
            extra = sorted(named.keys() - self._shadow.keys())
            raise KeyError(f"CPUEMA.update: parameter names differ from the EMA's; "
                           f"missing={missing[:5]}{'…' if len(missing) > 5 else ''} "
                           f"unexpected={extra[:5]}{'…' if len(extra) > 5 else ''}")
        # the snapshot buffers are reused: the previous update's math must be finished
        self.wait()
        event = None
        with torch.no_grad():
            for name, p in named.items():
                buf = self._snap[name]
                if buf.shape != p.shape:
                    raise ValueError(f"CPUEMA.update: {name} has shape {tuple(p.shape)}, "
                                     f"EMA has {tuple(buf.shape)}")
                buf.copy_(p.detach(), non_blocking=p.is_cuda)
            if any(p.is_cuda for p in named.values()):
                event = torch.cuda.Event()
                event.record()  # on the current stream, after the D2H copies
        self.num_updates += 1
        snap = self._snap

        def job():
            if event is not None:
                event.synchronize()
            self._apply(snap, d)

        self._submit(job)

    # -- read out -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """``{"decay", "num_updates", "shadow": {name: fp32 CPU tensor (a copy)}}``."""
        self.wait()
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self._shadow.items()},
        }

    def load_state_dict(self, state: Mapping[str, object], strict: bool = True) -> None:
        self.wait()
        shadow = state["shadow"]
        if strict and shadow.keys() != self._shadow.keys():
            missing = sorted(self._shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self._shadow.keys())
            raise KeyError(f"CPUEMA.load_state_dict: missing={missing[:5]} unexpected={extra[:5]}")
        with torch.no_grad():
            for k, v in shadow.items():
                if k in self._shadow:
                    self._shadow[k].copy_(v)
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))

    def shadow(self) -> Dict[str, torch.Tensor]:
        """The live fp32 CPU EMA tensors (after waiting); do not keep them across ``update``."""
        self.wait()
        return self._shadow

    def _targets(self, params: NamedTensors) -> Dict[str, torch.Tensor]:
        named = _named(params)
        unknown = sorted(named.keys() - self._shadow.keys())
        if unknown:
            raise KeyError(f"CPUEMA: no EMA for parameters {unknown[:5]}")
        return named

    def copy_to(self, params: NamedTensors) -> None:
        """Overwrite the (matching) parameters with the EMA values (e.g. for evaluation)."""
        self.wait()
        with torch.no_grad():
            for name, p in self._targets(params).items():
                p.copy_(self._shadow[name])

    @contextlib.contextmanager
    def swapped_into(self, params: NamedTensors) -> Iterator[None]:
        """``with ema.swapped_into(model): evaluate(model)`` — EMA weights inside, the original
        weights (bit-exact, backed up to CPU) restored on exit, also on an exception."""
        self.wait()
        named = self._targets(params)
        with torch.no_grad():
            backup = {name: p.detach().to("cpu", copy=True) for name, p in named.items()}
        try:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(self._shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(backup[name])
