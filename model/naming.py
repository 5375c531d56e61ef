"""What a parameter is, read from its global name (no torch import, so the planner can use it).

Parameter names are layout-independent (see model/transformer.py), so one predicate on the name
serves the model (FLOP counts), the trainer (optimizer groups, gradient reduction, grad norm) and
the planner (which counts modules built on the meta device). tests/test_model.py checks that it
agrees with the module structure: a name matches exactly when the parameter belongs to an
`Experts` module.
"""
from __future__ import annotations


def is_expert_param(name: str) -> bool:
    """Routed-expert parameters (sharded over EP, replicated over expert-DP): those under a module
    named `experts` (MoE.experts), whether the name is a whole model's ("layers.3.ffn.experts.w1")
    or a bare MoE layer's ("experts.w1")."""
    return "experts" in name.split(".")[:-1]
