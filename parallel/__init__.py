"""Everything that knows about ranks: layout and process groups (parallel.topology),
expert-parallel dispatch (parallel.dispatch), pipeline schedules
(parallel.pipeline), ZeRO-1 (parallel.zero), gradient reduction and norms (parallel.grads), the planner
(parallel.planner), and a multi-process test runner (parallel.testing).

Rank layout: world = pp × dp, rank = pp_rank·dp + dp_rank (consecutive ranks share a pipeline
stage); EP groups are consecutive dp indices of one stage, expert-DP groups share pp and ep index.
See parallel/topology.py.
"""
import importlib

# Re-exports are resolved lazily, so `import parallel` (e.g. `from parallel import planner`) does
# not pull in torch.distributed or the model.
_EXPORTS = {
    "AllToAllDispatcher": "parallel.dispatch", "LocalDispatcher": "parallel.dispatch",
    "allreduce_gradients": "parallel.grads", "apply_expert_parallel": "parallel.dispatch",
    "global_expert_load": "parallel.dispatch", "shard_experts": "parallel.dispatch",
    "Layout": "parallel.topology", "LayoutError": "parallel.topology", "Topology": "parallel.topology",
    "init_distributed": "parallel.topology", "validate_for_model": "parallel.topology",
    "validate_layout": "parallel.topology",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")
