"""The ZeRO-1 partition: which elements of a replicated parameter list each rank of its group
updates and keeps optimizer state for. One pure function (no torch), used by the optimizer
(parallel/zero.py) and by the planner (parallel/planner.py), so planned bytes are the run's bytes.

The parameters of one optimizer part (the non-expert ones over DP, the expert ones over
expert-DP) are laid end to end in optimizer order, as Megatron's and DeepSpeed's flat buffers
do, and the concatenation is cut into `group_size` contiguous ranges whose lengths differ by at
most one element: every rank holds within one element of 1/N of the state, whatever the
parameter sizes (a whole-parameter owner, as torch's ZeroRedundancyOptimizer assigns, leaves a
rank with the whole embedding at 2048 GPUs). A range may start and end inside a parameter; each
rank's share is listed per parameter as (index, start, stop) flat element offsets, so states keep
their parameter's global name (trainer/checkpoint.py saves them as pieces that DCP reshards).
"""
from __future__ import annotations

import bisect
from typing import Any, List, Sequence, Tuple

from parallel.param_groups import optimizer_param_groups  # torch-free

Piece = Tuple[int, int, int]  # (parameter index, first flat element, one past the last)


def shard_range(total: int, group_size: int, rank: int) -> Tuple[int, int]:
    """[lo, hi) of rank `rank` over `total` concatenated elements: lengths differ by <= 1."""
    if group_size < 1 or not 0 <= rank < group_size:
        raise ValueError(f"rank {rank} outside a group of {group_size}")
    return total * rank // group_size, total * (rank + 1) // group_size


def offsets_of(numels: Sequence[int]) -> List[int]:
    """Where each of the tensors (of `numels` elements) starts in their concatenation, then the total."""
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + int(n))
    return offsets


def pieces_between(offsets: Sequence[int], lo: int, hi: int) -> List[Piece]:
    """The non-empty pieces (index, start, stop) of the tensors that make up elements lo … hi-1 of
    their concatenation (`offsets`: offsets_of)."""
    out: List[Piece] = []
    i = bisect.bisect_right(offsets, lo) - 1
    while lo < hi:
        a, b = lo - offsets[i], min(hi, offsets[i + 1]) - offsets[i]
        if b > a:
            out.append((i, a, b))
        lo, i = offsets[i] + b, i + 1
    return out


def zero_partition(numels: Sequence[int], group_size: int) -> List[List[Piece]]:
    """Per rank of the group, the pieces of the parameters (of `numels` elements, in optimizer
    order) whose optimizer state it holds: [[(index, start, stop), ...] for each rank]."""
    offsets = offsets_of(numels)
    return [pieces_between(offsets, *shard_range(offsets[-1], group_size, rank)) for rank in range(group_size)]


def rank_elements(numels: Sequence[int], group_size: int, rank: int) -> int:
    """Elements of optimizer state rank `rank` holds (sum of its pieces)."""
    lo, hi = shard_range(sum(int(n) for n in numels), group_size, rank)
    return hi - lo


def rank_state_elements(named_params: Sequence[Tuple[str, Any]], dp: int, edp: int, dp_rank: int,
                        edp_rank: int, zero: bool = True) -> Tuple[int, int]:
    """(elements, pieces) of optimizer state a rank holds for `named_params` (what it trains, in
    its engine's order) under parallel/zero.ShardedAdamW: per part of optimizer_param_groups
    (non-expert over the DP group of `dp` ranks, expert over the expert-DP group of `edp`), the
    part's parameters cut by zero_partition when zero, whole otherwise. A piece is one parameter's
    range on this rank (it carries one AdamW step counter). Works on anything with .numel() and
    .dim() (meta-device parameters: the planner)."""
    elems = pieces = 0
    for is_expert, groups in optimizer_param_groups(named_params, 0.0):
        world, me = (edp, edp_rank) if is_expert else (dp, dp_rank)
        if not zero or world <= 1:
            world, me = 1, 0
        mine = zero_partition([p.numel() for g in groups for p in g["params"]], world)[me]
        elems += sum(b - a for _, a, b in mine)
        pieces += len(mine)
    return elems, pieces
