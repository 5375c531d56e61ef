"""Bytes of one all-to-all row: the one formula the runtime's byte counts and the planner share.

A row is its payload (model/wire.py formats) plus the metadata that travels with it:

==============================  =====================================  =========================
exchange                        payload                                metadata
==============================  =====================================  =========================
flat dispatch (token, expert)   x in the dispatch format               none (order = expert order)
two_hop hop 1 (token, node)     x in the dispatch format               k int32 node-local expert
                                                                       ids (-1: other node) +
                                                                       k fp32 gate weights
two_hop hop 2 (token, GPU)      the same encoded x, forwarded as is    k int32 GPU-local ids
combine rows (every exchange)   y in the combine format                none (rows return in the
                                                                       order they came)
==============================  =====================================  =========================

The source position of a row never travels: every exchange returns rows in the order it
received them, so the sender knows which token each returning row belongs to. The split sizes
(one int64 per peer per exchange) are not counted.
"""
from __future__ import annotations

import math

PAYLOAD_FORMATS = ("fp32", "bf16", "fp8")
TILE = 128  # FP8 scaling tile (model/fp8.py)


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


def two_hop_inter_node_bytes(token_nodes: float, dim: int, k: int, dispatch_fmt: str, combine_fmt: str) -> float:
    """Forward inter-node bytes of two_hop for `token_nodes` (token, remote destination node)
    pairs: one hop-1 dispatch row out and one combine partial back per pair."""
    b = two_hop_forward_bytes(token_nodes, 0, 0, dim, k, dispatch_fmt, combine_fmt)
    return b["dispatch_inter"] + b["combine_inter"]


def flat_inter_node_bytes(token_experts: float, dim: int, dispatch_fmt: str, combine_fmt: str) -> float:
    """Forward inter-node bytes of flat for `token_experts` (token, expert on a remote node) pairs."""
    return token_experts * (dispatch_row_bytes(dim, 0, dispatch_fmt, "flat") + combine_row_bytes(dim, combine_fmt))


def two_hop_forward_bytes(token_nodes: float, token_gpus: float, token_experts: float, dim: int, k: int,
                          dispatch_fmt: str, combine_fmt: str) -> dict:
    """Forward bytes of two_hop sent over each link kind, from pair counts: `token_nodes`
    (token, remote node) pairs cross inter-node once each way; `token_gpus` (row, other GPU of
    the node) hop-2 rows and `token_experts` (token, expert on another GPU of the node) expert
    outputs cross intra-node. The runtime's measured counts obey this (tests/test_two_hop.py);
    the planner feeds it expected counts."""
    return {
        "dispatch_inter": token_nodes * dispatch_row_bytes(dim, k, dispatch_fmt, "hop1"),
        "combine_inter": token_nodes * combine_row_bytes(dim, combine_fmt),
        "dispatch_intra": token_gpus * dispatch_row_bytes(dim, k, dispatch_fmt, "hop2"),
        "combine_intra": token_experts * combine_row_bytes(dim, combine_fmt),
    }
