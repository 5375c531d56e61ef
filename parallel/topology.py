"""Topology: the PP × DP (× EP inside DP) layout, its validation, and every process group.

Rank layout (kept fixed; other modules rely on it)::

    world = pp × dp,    rank = pp_rank · dp + dp_rank

so CONSECUTIVE RANKS SHARE A PIPELINE STAGE (torchrun puts consecutive ranks on one node, so a
stage's data-parallel/expert-parallel traffic stays as local as possible; pipeline p2p crosses
nodes). Inside the dp ranks of one stage:

    dp_rank = edp_rank · ep + ep_rank

- EP group: the ``ep`` consecutive dp indices of one stage (same pp_rank, same edp_rank). Each
  EP rank holds n_routed_experts/ep experts of every MoE layer (global ids
  ``ep_rank·n_local … ep_rank·n_local + n_local − 1``).
- expert-DP group: same pp_rank, same ep_rank (size dp/ep): the replicas of one expert shard.
- DP group: same pp_rank (size dp): replicas of the non-expert parameters.
- PP group: same dp_rank (size pp): one pipeline.
- DualPipe stage pair: ranks with pipeline indices r and pp−1−r and the same dp index (they hold
  the same two stages); for odd pp the middle stage pairs with itself.
- A "node" is ``gpus_per_node`` consecutive EP ranks; an EP group spans
  ``n_nodes_ep = ceil(ep / gpus_per_node)`` nodes (the unit of node-limited routing).
- EP inter-node group: the ranks of one EP group with the same local index on every node; EP
  intra-node group: one node's ranks of an EP group (the two hops of two_hop dispatch).

`validate_layout` is a pure function and raises `LayoutError` naming the offending key; call it
(or `init_distributed`, which does) BEFORE any process group exists, so a bad layout never
leaves half-initialised collectives behind. `Layout` is the pure rank arithmetic (no processes);
`Topology` adds this process's rank, the DeviceMesh ("pp", "dp") and the process groups, each
built exactly once. Backend: NCCL when CUDA is available, gloo otherwise.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class LayoutError(ValueError):
    """The parallel layout is inconsistent. The message names the offending key."""


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class Layout:
    """Pure rank arithmetic of a validated layout (no processes, no groups)."""

    world_size: int
    pp: int
    dp: int
    ep: int
    gpus_per_node: int

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def n_nodes_ep(self) -> int:
        """Nodes spanned by one EP group (a node = gpus_per_node consecutive EP ranks)."""
        return math.ceil(self.ep / self.gpus_per_node)

    def rank_of(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank

    def coords(self, rank: int) -> dict[str, int]:
        """rank → {pp_rank, dp_rank, ep_rank, edp_rank, ep_node} (ep_node = node inside the EP group)."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside world size {self.world_size}")
        pp_rank, dp_rank = divmod(rank, self.dp)
        edp_rank, ep_rank = divmod(dp_rank, self.ep)
        return {"pp_rank": pp_rank, "dp_rank": dp_rank, "ep_rank": ep_rank, "edp_rank": edp_rank,
                "ep_node": ep_rank // self.gpus_per_node}

    # every group of each kind, as lists of global ranks (the order process groups are built in)
    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d) for p in range(self.pp)] for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d) for d in range(self.dp)] for p in range(self.pp)]

    def ep_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, e * self.ep + i) for i in range(self.ep)]
                for p in range(self.pp) for e in range(self.edp)]

    def edp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, e * self.ep + i) for e in range(self.edp)]
                for p in range(self.pp) for i in range(self.ep)]

    @property
    def ep_gpus(self) -> int:
        """EP ranks per node inside an EP group (the whole group when it fits in one node)."""
        return min(self.gpus_per_node, self.ep)

    def ep_inter_groups(self) -> list[list[int]]:
        """Per EP group and local index l: the ranks with local index l on each of its nodes (the
        inter-node hop of two_hop dispatch)."""
        g = self.ep_gpus
        return [[grp[node * g + l] for node in range(self.ep // g)] for grp in self.ep_groups() for l in range(g)]

    def ep_intra_groups(self) -> list[list[int]]:
        """Per EP group and node: that node's ranks of the group (the intra-node hop)."""
        g = self.ep_gpus
        return [grp[node * g:(node + 1) * g] for grp in self.ep_groups() for node in range(self.ep // g)]

    def stage_pair_groups(self) -> list[list[int]]:
        out = []
        for d in range(self.dp):
            for r in range((self.pp + 1) // 2):
                out.append(sorted({self.rank_of(r, d), self.rank_of(self.pp - 1 - r, d)}))
        return out

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The ranks of `rank`'s group of `kind` (pp | dp | ep | ep_inter | ep_intra | edp | stage_pair)."""
        groups = getattr(self, f"{kind}_groups")()
        return next(g for g in groups if rank in g)


def layout_problems(
    world_size: int,
    pp: int,
    dp: Optional[int] = None,
    ep: int = 1,
    gpus_per_node: int = 8,
    n_routed_experts: Optional[int] = None,
    max_nodes_per_token: int = 0,
    n_activated_experts: Optional[int] = None,
) -> list[str]:
    """Every problem of a layout (and, optionally, of the model on it), each naming its key; []
    when it is valid. dp = 0/None means world_size // pp. Pure: no torch.distributed calls. The
    trainer stops at the first (validate_layout), the planner lists them all.

    A node limit with a single node in the EP group is vacuous (allowed: the same model config
    runs on one process); with several nodes it must not exceed their number.
    """
    def positive_int(v, key: str) -> list[str]:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        return [] if ok else [f"{key} must be an integer >= 1, got {v!r}"]

    out = positive_int(world_size, "world size") + positive_int(pp, "parallel.pp")
    if out:
        return out
    if dp in (0, None):
        if world_size % pp:
            return [f"parallel.pp={pp} does not divide world size {world_size}"]
        dp = world_size // pp
    out = positive_int(dp, "parallel.dp") + positive_int(ep, "parallel.ep") + positive_int(gpus_per_node, "parallel.gpus_per_node")
    if out:
        return out
    if pp * dp != world_size:
        out.append(f"parallel.pp*parallel.dp={pp * dp} != world size {world_size}")
    if dp % ep:
        out.append(f"parallel.ep={ep} does not divide parallel.dp={dp}")
    if not (ep <= gpus_per_node or ep % gpus_per_node == 0):
        out.append(f"parallel.ep={ep} is not a multiple of parallel.gpus_per_node={gpus_per_node} "
                   "(an EP group larger than a node must span whole nodes)")
    if n_routed_experts is not None and n_routed_experts % ep:
        out.append(f"model.n_routed_experts={n_routed_experts} not divisible by parallel.ep={ep}")
    n_nodes = math.ceil(ep / gpus_per_node)
    if max_nodes_per_token:
        if max_nodes_per_token < 0:
            out.append(f"model.max_nodes_per_token={max_nodes_per_token} must be >= 0")
        elif n_nodes > 1 and max_nodes_per_token > n_nodes:
            out.append(f"model.max_nodes_per_token={max_nodes_per_token} > nodes in an EP group ({n_nodes})")
        elif n_nodes > 1 and max_nodes_per_token < n_nodes and n_routed_experts and n_activated_experts:
            per_node = n_routed_experts // n_nodes
            if n_activated_experts > max_nodes_per_token * per_node:
                out.append(f"model.n_activated_experts={n_activated_experts} > model.max_nodes_per_token="
                           f"{max_nodes_per_token} x experts per node ({per_node})")
    return out


def validate_layout(world_size: int, pp: int, dp: Optional[int] = None, ep: int = 1, gpus_per_node: int = 8,
                    n_routed_experts: Optional[int] = None, max_nodes_per_token: int = 0,
                    n_activated_experts: Optional[int] = None) -> Layout:
    """The Layout, or LayoutError naming the first of layout_problems(...) (same arguments)."""
    problems = layout_problems(world_size, pp, dp, ep, gpus_per_node, n_routed_experts, max_nodes_per_token,
                               n_activated_experts)
    if problems:
        raise LayoutError(problems[0])
    return Layout(world_size, pp, dp or world_size // pp, ep, gpus_per_node)


def model_fields(model_cfg: Any) -> dict:
    """The ModelConfig fields a layout is checked against (layout_problems' keyword arguments)."""
    return dict(n_routed_experts=model_cfg.n_routed_experts, max_nodes_per_token=model_cfg.max_nodes_per_token,
                n_activated_experts=model_cfg.n_activated_experts)


def validate_for_model(world_size: int, pp: int, dp: Optional[int], ep: int, gpus_per_node: int, model_cfg: Any) -> Layout:
    """validate_layout with the model fields read from a ModelConfig."""
    return validate_layout(world_size, pp, dp, ep, gpus_per_node, **model_fields(model_cfg))


@dataclass(eq=False)
class Topology:
    """This process's place in the layout plus the process groups (built once, in __post_init__).

    Coordinates: pp_rank, dp_rank, ep_rank, edp_rank, ep_node. Groups (None when
    torch.distributed is not initialised, e.g. a single-process run): pp_group, dp_group,
    ep_group, ep_inter_group / ep_intra_group (ep > 1: the two hops of two_hop dispatch),
    edp_group, stage_pair_group; `mesh` is the DeviceMesh ("pp", "dp").
    Pipeline neighbours (global ranks, None at the ends): pp_prev_rank, pp_next_rank;
    stage_pair_rank is the DualPipe partner (pipeline index pp−1−pp_rank, same dp index).
    Pass build_groups=False for coordinates only (no collectives).
    """

    world_size: int
    rank: int
    pp: int
    dp: Optional[int] = None
    ep: int = 1
    gpus_per_node: int = 8
    backend: Optional[str] = None
    build_groups: bool = True
    timeout: Optional[Any] = None  # datetime.timedelta for every group's collectives (None: torch's default)
    layout: Layout = field(init=False)
    mesh: Any = field(init=False, default=None)
    pp_group: Any = field(init=False, default=None)
    dp_group: Any = field(init=False, default=None)
    ep_group: Any = field(init=False, default=None)
    ep_inter_group: Any = field(init=False, default=None)
    ep_intra_group: Any = field(init=False, default=None)
    edp_group: Any = field(init=False, default=None)
    stage_pair_group: Any = field(init=False, default=None)
    _background_group: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.layout = validate_layout(self.world_size, self.pp, self.dp, self.ep, self.gpus_per_node)
        self.dp = self.layout.dp
        if self.backend is None:
            self.backend = default_backend()
        c = self.layout.coords(self.rank)
        self.pp_rank, self.dp_rank = c["pp_rank"], c["dp_rank"]
        self.ep_rank, self.edp_rank, self.ep_node = c["ep_rank"], c["edp_rank"], c["ep_node"]
        self.pp_prev_rank = self.layout.rank_of(self.pp_rank - 1, self.dp_rank) if self.pp_rank > 0 else None
        self.pp_next_rank = self.layout.rank_of(self.pp_rank + 1, self.dp_rank) if self.pp_rank < self.pp - 1 else None
        self.stage_pair_rank = self.layout.rank_of(self.pp - 1 - self.pp_rank, self.dp_rank)
        self.pp_ranks = self.layout.group_of("pp", self.rank)
        self.dp_ranks = self.layout.group_of("dp", self.rank)
        self.ep_ranks = self.layout.group_of("ep", self.rank)
        self.edp_ranks = self.layout.group_of("edp", self.rank)
        self.stage_pair_ranks = self.layout.group_of("stage_pair", self.rank)
        if self.build_groups:
            self._build_groups()

    # ----- construction -----
    @classmethod
    def from_env(cls, pp: int = 1, dp: Optional[int] = None, ep: int = 1, gpus_per_node: int = 8,
                 timeout: Optional[Any] = None) -> "Topology":
        """From an initialised torch.distributed (else a 1-process topology without groups)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), pp, dp, ep, gpus_per_node, dist.get_backend(),
                       timeout=timeout)
        return cls(1, 0, pp, dp, ep, gpus_per_node, default_backend(), build_groups=False)

    def _build_groups(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise LayoutError(f"Topology(world_size={self.world_size}, rank={self.rank}) does not match "
                              f"torch.distributed (world {dist.get_world_size()}, rank {dist.get_rank()})")
        device = "cuda" if self.backend == "nccl" else "cpu"
        self.mesh = init_device_mesh(device, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))
        # The collectives run on groups built here with an explicit timeout (DeviceMesh's own
        # sub-groups would get torch's 30-minute default, so a hang would not surface for that long).
        self.pp_group = self.new_group_of(self.layout.pp_groups())
        self.dp_group = self.new_group_of(self.layout.dp_groups())
        build = self.new_group_of
        self.ep_group = build(self.layout.ep_groups())
        if self.ep > 1:  # the two hops of two_hop dispatch
            self.ep_inter_group = build(self.layout.ep_inter_groups())
            self.ep_intra_group = build(self.layout.ep_intra_groups())
        self.edp_group = build(self.layout.edp_groups())
        self.stage_pair_group = build(self.layout.stage_pair_groups())

    def new_group_of(self, groups: list[list[int]]):
        """Create one process group per rank list (every rank creates every group, in the same
        order, as torch requires) with this topology's timeout; return the one this rank is in."""
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = g
        return mine

    def background_group(self):
        """A gloo group over every rank for collectives issued from a background thread (the
        asynchronous checkpoint writer), so that they never interleave with the training's own
        collectives on the default group. Built on first use: every rank must ask at the same point."""
        if self._background_group is None and dist.is_available() and dist.is_initialized():
            self._background_group = dist.new_group(backend="gloo", timeout=self.timeout)
        return self._background_group

    def new_ep_groups(self) -> tuple:
        """A fresh (ep, ep_inter, ep_intra) triple of groups over the same ranks (collective over
        the default group: every rank calls it in the same order), for a second model chunk whose
        all-to-alls may run concurrently with the first's (DualPipe)."""
        return (self.new_group_of(self.layout.ep_groups()), self.new_group_of(self.layout.ep_inter_groups()),
                self.new_group_of(self.layout.ep_intra_groups()))

    # ----- convenience -----
    @property
    def edp(self) -> int:
        return self.layout.edp

    @property
    def n_nodes_ep(self) -> int:
        return self.layout.n_nodes_ep

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    def __repr__(self) -> str:
        return (f"Topology(rank={self.rank}/{self.world_size}, pp={self.pp}, dp={self.dp}, ep={self.ep}, "
                f"gpus_per_node={self.gpus_per_node}, pp_rank={self.pp_rank}, dp_rank={self.dp_rank}, "
                f"ep_rank={self.ep_rank}, edp_rank={self.edp_rank}, backend={self.backend})")


def init_distributed(
    pp: int = 1,
    dp: Optional[int] = None,
    ep: int = 1,
    gpus_per_node: int = 8,
    model_cfg: Any = None,
    backend: Optional[str] = None,
    timeout_s: float = 1800.0,
) -> Topology:
    """Validate the layout (from WORLD_SIZE/RANK set by torchrun) BEFORE any collective, then
    init_process_group (NCCL on CUDA, else gloo; the CUDA device is LOCAL_RANK) and build the
    Topology. Without WORLD_SIZE (plain `python`), returns a 1-process topology."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if model_cfg is not None:
        validate_for_model(world_size, pp, dp, ep, gpus_per_node, model_cfg)
    else:
        validate_layout(world_size, pp, dp, ep, gpus_per_node)
    backend = backend or default_backend()
    if world_size == 1 and not dist.is_initialized():
        return Topology(1, 0, pp, dp, ep, gpus_per_node, backend, build_groups=False)
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s)
        # Under `torchrun --max-restarts`, the agent's store outlives a failed attempt and still holds
        # that attempt's gloo/NCCL addresses: give every attempt its own key space.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"dsv3/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return Topology(world_size, rank, pp, dp, ep, gpus_per_node, dist.get_backend(),
                    timeout=timedelta(seconds=timeout_s))
