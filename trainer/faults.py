"""Scripted faults for the resilience tests: `debug.faults`, a list of "attempt:step:rank:kind".

On restart attempt `attempt` (TORCHELASTIC_RESTART_COUNT) rank `rank` does `kind` at step `step`:
  kill                 SIGKILL itself as the step starts (a hardware fault: no cleanup at all)
  kill_in_checkpoint   SIGKILL itself in the save of that step, after its own write and before the
                       commit (the other ranks' saves then fail; step_N.tmp is never renamed)
  term                 SIGTERM itself as the step starts (a preemption notice reaching one rank)
A chaos test draws these from a seed, so any failure replays exactly.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, Optional

KINDS = ("kill", "kill_in_checkpoint", "term")


@dataclass(frozen=True)
class Fault:
    attempt: int
    step: int
    rank: int
    kind: str


def parse_fault(spec: str) -> Fault:
    from model import ConfigError

    parts = str(spec).split(":")
    try:
        attempt, step, rank = (int(v) for v in parts[:3])
        kind = parts[3]
    except (ValueError, IndexError):
        raise ConfigError(f"debug.faults: {spec!r} is not attempt:step:rank:kind") from None
    if len(parts) != 4 or kind not in KINDS:
        raise ConfigError(f"debug.faults: {spec!r}: kind must be one of {'|'.join(KINDS)}")
    return Fault(attempt, step, rank, kind)


class FaultPlan:
    """The faults of this rank on this attempt."""

    def __init__(self, specs, rank: int):
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.faults = [f for f in map(parse_fault, specs or []) if f.rank == rank and f.attempt == attempt]

    def _find(self, step: int, kind: str) -> bool:
        return any(f.step == step and f.kind == kind for f in self.faults)

    def at_step_start(self, step: int) -> None:
        if self._find(step, "kill"):
            print(f"debug: fault kill at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._find(step, "term"):
            print(f"debug: fault term at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    def in_checkpoint(self, step: int) -> Optional[Callable[[], None]]:
        if not self._find(step, "kill_in_checkpoint"):
            return None

        def kill() -> None:
            print(f"debug: fault kill_in_checkpoint at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        return kill
