"""Weight-gradient split (``backward_input`` / ``backward_weight``) for the pipeline runtime's split
``B`` / ``W`` actions (zero-bubble schedules), the technique of PyTorch's
``pipelining/_backward.py`` re-implemented here: before the input-grad pass the autograd graph is
walked once; the nodes on the input→output path ("activation closure") where a parameter's branch
joins it are the boundary nodes (for a Linear: its matmul node). The input pass
(``autograd.grad`` w.r.t. the stage input, ``retain_graph=True``) computes every activation grad
and a pre-hook captures the gradient entering each boundary node; W then re-enters the graph at
those nodes with the captured grads, per group of parameters sharing boundary nodes, and computes
only the weight side (the engine asks the matmul node for its weight output only). Cost: each
matmul's two gradient GEMMs run once each, as in a full backward; the extra is the graph walk
(~3 ms for a 2-layer toy stage) and one ``autograd.grad`` call per parameter group in W (~0.3 ms
each: the engine re-scans the graph reachable from the group's boundary nodes). Measured on the
toy model (dim 256, 2 MoE layers, 4x128 tokens, 1 thread): full B 52 ms, Bi 34 + W 30 ms; in the
pipeline benchmark Bi + W - B(full) is 3-15 ms per micro-batch. Memory: the graph and the
captured grads (one per Linear output) stay alive from B until W, like the reference
WeightGradStore. Works with activation recompute (train.recompute) and simulated FP8 (tested).
BF16 parameters (model/mixed.py): the boundary is the GEMM after the upcast node, whose backward
(run by W's ``autograd.grad`` on its way to the parameter) adds the fp32 weight grad into
``main_grad`` and hands ``autograd.grad`` a None, so the ``.grad`` updates below skip them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass
class WeightGradState:
    """What ``backward_weight`` needs: parameter groups, their boundary nodes and the gradients
    captured there during the input-grad pass. Holding it keeps the autograd graph alive."""

    groups: list  # [(params, [(node, grads tuple)])]
    eager: list = field(default_factory=list)  # params whose grads were already computed in B
    outputs: Any = None  # keeps the graph alive until W


def _node(t: torch.Tensor):
    return t.grad_fn if t.grad_fn is not None else get_gradient_edge(t).node


def backward_input(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[Optional[torch.Tensor]],
                   inputs: Sequence[torch.Tensor], params: Sequence[nn.Parameter]
                   ) -> tuple[list[Optional[torch.Tensor]], WeightGradState]:
    """Input grads of ``outputs`` (seeded with ``grad_outputs``) w.r.t. ``inputs``; weight grads
    deferred to :func:`backward_weight`. Parameters reachable only off the activation path (none in
    this model) get their grads right away."""
    roots = [o.grad_fn for o in outputs]
    consumers: dict = defaultdict(list)
    seen, stack = set(roots), list(roots)
    while stack:
        n = stack.pop()
        for c, _ in n.next_functions:
            if c is None:
                continue
            consumers[c].append(n)
            if c not in seen:
                seen.add(c)
                stack.append(c)
    closure: set = set()
    stack = [_node(x) for x in inputs if x.requires_grad]
    while stack:
        n = stack.pop()
        if n in closure:
            continue
        closure.add(n)
        stack.extend(consumers.get(n, ()))
    # boundary nodes of every parameter; union the parameters that share one
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict = {}  # boundary node -> param index
    used, eager = [], []
    for p in params:
        if not p.requires_grad:
            continue
        pn = get_gradient_edge(p).node
        if pn not in seen:
            continue  # not part of this graph (e.g. unused on this micro-batch)
        i = len(used)
        used.append(p)
        parent[i] = i
        bounds, vis, st = set(), {pn}, [pn]
        while st:
            n = st.pop()
            for c in consumers.get(n, ()):
                if c in closure:
                    bounds.add(c)
                elif c not in vis:
                    vis.add(c)
                    st.append(c)
        if not bounds:
            eager.append(p)
            parent[i] = -1
            continue
        for b in bounds:
            if b in owner:
                parent[find(i)] = find(owner[b])
            else:
                owner[b] = i
    members: dict[int, list] = defaultdict(list)
    for i, p in enumerate(used):
        if parent[i] != -1:
            members[find(i)].append(p)
    nodes_of: dict[int, list] = defaultdict(list)
    for b, i in owner.items():
        nodes_of[find(i)].append(b)
    captured: dict = {}
    handles = []
    for b in owner:
        def hook(grads, b=b):
            captured[b] = grads
        handles.append(b.register_prehook(hook))
    try:
        targets = [x for x in inputs if x.requires_grad] + eager
        grads = torch.autograd.grad(outputs, targets, grad_outputs, retain_graph=True, allow_unused=True) \
            if targets else ()
    finally:
        for h in handles:
            h.remove()
    n_in = len(targets) - len(eager)
    for p, g in zip(eager, grads[n_in:]):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    it = iter(grads[:n_in])
    dinputs = [next(it) if x.requires_grad else None for x in inputs]
    groups = []
    for root, ps in members.items():
        groups.append((ps, [(b, captured.get(b)) for b in nodes_of[root]]))
    return dinputs, WeightGradState(groups=groups, eager=eager, outputs=list(outputs))


def backward_weight(state: WeightGradState) -> None:
    """Accumulate the deferred weight grads into ``.grad`` (then the graph may be freed)."""
    for params, bounds in state.groups:
        edges, seeds = [], []
        for node, grads in bounds:
            if grads is None:
                continue
            for i, g in enumerate(grads):
                if g is not None:
                    edges.append(GradientEdge(node, i))
                    seeds.append(g)
        if not edges:
            continue
        handles = []
        if len(bounds) > 1:
            # a boundary node reachable from another one must see exactly its captured gradient
            # (what flowed into it in the input pass), never that plus a re-propagated copy
            for node, grads in bounds:
                if grads is not None:
                    handles.append(node.register_prehook(lambda _g, grads=grads: grads))
        try:
            dws = torch.autograd.grad(edges, params, seeds, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for p, g in zip(params, dws):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    state.groups, state.outputs = [], None
