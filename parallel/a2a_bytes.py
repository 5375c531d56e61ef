"""Bytes of the expert all-to-alls: the one formula the runtime's byte counts and the planner share.

A row is its payload (model/wire.py formats) plus the metadata that travels with it. Every
exchange of the forward has a backward exchange along the reverse route (parallel/a2a.py), which
sends the gradient of each row in the backward format (`wire.backward`); the split sizes (int64
counts) each forward exchange needs are sent before it, in their own small all-to-all.

==============================  ==============================  ==========================  ===================
exchange (forward)              payload                         metadata                    backward row
==============================  ==============================  ==========================  ===================
flat dispatch (token, expert)   x in the dispatch format        none (order = expert order)  dx
two_hop hop 1 (token, node)     x in the dispatch format        k int32 node-local expert   dx + k gate-weight
                                                                ids (-1: other node) +      grads (backward
                                                                k fp32 gate weights         format)
two_hop hop 2 (token, GPU)      the same encoded x, as is       k int32 GPU-local ids       dx
combine rows (every exchange)   y in the combine format         none (rows return in the    dy
                                                                order they came)
split sizes, per MoE call       flat: n_local int64 to every other EP rank; two_hop: one int64 to every other
                                rank of the inter-node group (hop 1) and of the intra-node group (hop 2)
==============================  ==============================  ==========================  ===================

The source position of a row never travels: every exchange returns rows in the order it
received them, so the sender knows which token each returning row belongs to.
"""
from __future__ import annotations

import math

PAYLOAD_FORMATS = ("fp32", "bf16", "fp8")
TILE = 128  # FP8 scaling tile (model/fp8.py)
SPLIT_BYTES = 8  # one int64 split size


def payload_row_bytes(dim: int, fmt: str) -> int:
    """One row of `dim` values: fp32 4·dim, bf16 2·dim, fp8 dim + 4·⌈dim/128⌉ (E4M3 + fp32 scales)."""
    if fmt == "fp32":
        return 4 * dim
    if fmt == "bf16":
        return 2 * dim
    if fmt == "fp8":
        return dim + 4 * math.ceil(dim / TILE)
    raise ValueError(f"unknown payload format {fmt!r}; expected one of {PAYLOAD_FORMATS}")


def meta_row_bytes(k: int, hop: str) -> int:
    """Metadata bytes of a dispatch row: hop = 'flat' | 'hop1' | 'hop2' (see the table above)."""
    return {"flat": 0, "hop1": 8 * k, "hop2": 4 * k}[hop]


def dispatch_row_bytes(dim: int, k: int, fmt: str, hop: str) -> int:
    return payload_row_bytes(dim, fmt) + meta_row_bytes(k, hop)


def combine_row_bytes(dim: int, fmt: str) -> int:
    return payload_row_bytes(dim, fmt)


def backward_row_bytes(dim: int, k: int, fmt: str, hop: str) -> int:
    """The gradient row the backward of a forward exchange sends back: dx (or dy) in `fmt`, plus
    the k gate-weight gradients for a hop-1 dispatch row (the weights travel with hop 1)."""
    return payload_row_bytes(dim, fmt) + (payload_row_bytes(k, fmt) if hop == "hop1" else 0)


def _totals(b: dict) -> dict:
    b["inter"] = sum(v for key, v in b.items() if key.endswith("_inter"))
    b["intra"] = sum(v for key, v in b.items() if key.endswith("_intra"))
    return b


def two_hop_bytes(token_nodes: float, token_gpus: float, token_experts: float, dim: int, k: int, wire,
                  calls: float = 0, n_nodes: int = 1, gpus: int = 1) -> dict:
    """Bytes two_hop sends over each link kind, forward + backward + split sizes, from pair counts:
    `token_nodes` (token, remote node) pairs cross inter-node once each way; `token_gpus` (hop-1
    row, other GPU of the node) hop-2 rows and `token_experts` (pair on an expert of another GPU
    of the node) expert outputs cross intra-node; `calls` (rank, MoE call) pairs each send one
    split size to the n_nodes − 1 other ranks of the inter-node group and the gpus − 1 of the
    intra-node group. `wire`: .dispatch / .combine / .backward formats (model/wire.Wire).
    The runtime's measured counts equal this (tests/test_two_hop.py); the planner feeds it
    expected counts. Keys: dispatch_/combine_/backward_/splits_ × inter/intra, and inter, intra."""
    bwd = wire.backward
    return _totals({
        "dispatch_inter": token_nodes * dispatch_row_bytes(dim, k, wire.dispatch, "hop1"),
        "combine_inter": token_nodes * combine_row_bytes(dim, wire.combine),
        "backward_inter": token_nodes * (backward_row_bytes(dim, k, bwd, "hop1") + backward_row_bytes(dim, k, bwd, "")),
        "splits_inter": calls * (n_nodes - 1) * SPLIT_BYTES,
        "dispatch_intra": token_gpus * dispatch_row_bytes(dim, k, wire.dispatch, "hop2"),
        "combine_intra": token_experts * combine_row_bytes(dim, wire.combine),
        "backward_intra": (token_gpus + token_experts) * backward_row_bytes(dim, k, bwd, ""),
        "splits_intra": calls * (gpus - 1) * SPLIT_BYTES,
    })


def flat_bytes(remote_pairs: float, node_pairs: float, dim: int, wire, calls: float = 0, n_local: int = 1,
               remote_peers: int = 0, node_peers: int = 0) -> dict:
    """Bytes flat sends, forward + backward + split sizes: `remote_pairs` (token, expert on
    another node) and `node_pairs` (token, expert on another GPU of the node) pairs each cross
    once each way; `calls` (rank, MoE call) pairs each send n_local int64 counts to each of
    `remote_peers` / `node_peers` other EP ranks. Same keys as two_hop_bytes."""
    bwd = 2 * backward_row_bytes(dim, 0, wire.backward, "flat")
    split = calls * n_local * SPLIT_BYTES
    return _totals({
        "dispatch_inter": remote_pairs * dispatch_row_bytes(dim, 0, wire.dispatch, "flat"),
        "combine_inter": remote_pairs * combine_row_bytes(dim, wire.combine),
        "backward_inter": remote_pairs * bwd,
        "splits_inter": split * remote_peers,
        "dispatch_intra": node_pairs * dispatch_row_bytes(dim, 0, wire.dispatch, "flat"),
        "combine_intra": node_pairs * combine_row_bytes(dim, wire.combine),
        "backward_intra": node_pairs * bwd,
        "splits_intra": split * node_peers,
    })
