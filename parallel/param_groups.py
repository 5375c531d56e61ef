"""The AdamW parameter groups (no torch import: the planner models the trainer's optimizer with
the same code the trainer runs)."""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from model.naming import is_expert_param


def optimizer_param_groups(named_params: Sequence[Tuple[str, Any]], weight_decay: float) -> List[Tuple[bool, List[dict]]]:
    """The AdamW parameter groups of parallel/zero.ShardedAdamW, in its order: [(is_expert,
    groups)] with non-expert parameters first, then expert parameters (each part only if it has
    parameters); per part group 0 = matrices (dim >= 2, decayed) and then 1-D tensors (norm weights,
    biases: no decay), empty groups dropped, parameter order kept. Works on real parameters and on
    meta-device ones (the planner, parallel/partition.rank_state_elements), so the trainer and the planner share it."""
    out = []
    for is_expert in (False, True):
        params = [(n, p) for n, p in named_params if is_expert_param(n) == is_expert]
        if not params:
            continue
        groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
        out.append((is_expert, [g for g in groups if g["params"]]))
    return out
