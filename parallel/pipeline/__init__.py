"""Pipeline parallelism: schedules as pure data (IR), their generators and a unit-cost simulator.

``get_schedule(name, pp, n_microbatches)`` maps ``parallel.schedule`` (1f1b | dualpipe |
dualpipev) to a :class:`Schedule`; the runtime executes ``schedule.actions[pp_rank]`` in order.
"""
from .dualpipe import dualpipe
from .dualpipev import dualpipev
from .one_f_one_b import one_f_one_b
from .schedule import (B, F, FB, W, Action, Kind, Message, Schedule, ScheduleError,
                       forward_only, replay_order, validate)
from .simulator import Costs, SimResult, Timed, simulate, to_chrome_trace

SCHEDULES = {"1f1b": one_f_one_b, "dualpipe": dualpipe, "dualpipev": dualpipev}


def get_schedule(name: str, pp: int, n_microbatches: int) -> Schedule:
    try:
        build = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(f"unknown parallel.schedule={name!r}; choose one of "
                            f"{sorted(SCHEDULES)}") from None
    return build(pp, n_microbatches)


__all__ = ["Action", "B", "Costs", "F", "FB", "Kind", "Message", "SCHEDULES", "Schedule",
           "ScheduleError", "SimResult", "Timed", "W", "dualpipe", "dualpipev", "forward_only", "get_schedule",
           "one_f_one_b", "replay_order", "simulate", "to_chrome_trace", "validate"]
