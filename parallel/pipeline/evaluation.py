"""The forward-only pass that evaluation runs on a pipeline.

The same ranks run ``schedule.forward_only`` — their F actions in training order, on a P2P of its
own (its messages are the forward sends only) — with autograd off and the modules in eval mode
(``StageEngine.eval_mode``); nothing is kept for a backward and no gradient is touched. Built on
first use and kept per schedule (a batch ramp switches schedules).
"""
from __future__ import annotations

from .p2p import P2P
from .schedule import Schedule, forward_only


class ForwardOnly:
    """This rank's forward-only actions of ``schedule`` and their P2P plan."""

    def __init__(self, schedule: Schedule, pp_rank: int, ranks, group, device):
        fwd = forward_only(schedule)
        self.actions = fwd.actions[pp_rank]
        self.p2p = P2P(fwd, pp_rank, ranks, group, device)
