"""Preemption notices (SIGTERM, SIGUSR1) become a checkpoint at one agreed step, then an exit that
asks for a restart.

A scheduler's notice reaches ranks at different moments (torchrun forwards SIGTERM to every worker;
`scancel --signal` or an operator may reach one), so the handler only sets a flag. The loop
folds the flag into the step's agreement all-reduce (trainer/step_guard.py) before the optimizer
step: every rank then finishes the same step, saves it, and exits with PREEMPTED_EXIT_CODE.
"""
from __future__ import annotations

import signal

# 128 + SIGTERM: "terminated by the scheduler's notice". Non-zero, so torchrun --max-restarts
# restarts the group (which resumes from the checkpoint just written) and SLURM may requeue.
PREEMPTED_EXIT_CODE = 143


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


def parse_signals(names) -> list[signal.Signals]:
    """`checkpoint.preemption_signals` (e.g. [SIGTERM, SIGUSR1]) as signals; a named ConfigError
    for an unknown name."""
    from model import ConfigError

    out = []
    for name in names:
        sig = getattr(signal.Signals, str(name).upper(), None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"checkpoint.preemption_signals: {name!r} is not a catchable signal name "
                              f"(e.g. SIGTERM, SIGUSR1)")
        out.append(sig)
    return out


class PreemptionFlag:
    """Installs the handlers for `signals` (main thread only) and remembers whether one arrived;
    restore() puts the previous handlers back."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, _frame) -> None:
        # No printing here: a handler that writes to a stream the interrupted code was writing to
        # can raise a reentrant-call error. The exit line is printed by launch/train.py.
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
