"""Layout validation and rank arithmetic (pure; no processes). Real process groups are checked in
tests/test_ep.py::test_topology_groups_and_grad_reduction."""
import pytest

from parallel.topology import Layout, LayoutError, Topology, validate_layout


@pytest.mark.parametrize("kwargs, needle", [
    (dict(world_size=4, pp=1, dp=4, ep=3), "parallel.ep=3 does not divide parallel.dp=4"),
    (dict(world_size=4, pp=2, dp=4, ep=1), "parallel.pp*parallel.dp=8 != world size 4"),
    (dict(world_size=4, pp=3, dp=None, ep=1), "parallel.pp=3 does not divide world size 4"),
    (dict(world_size=4, pp=0, dp=None, ep=1), "parallel.pp"),
    (dict(world_size=4, pp=1, dp=4, ep=0), "parallel.ep"),
    (dict(world_size=4, pp=1, dp=4, ep=1, gpus_per_node=0), "parallel.gpus_per_node"),
    (dict(world_size=24, pp=1, dp=24, ep=12, gpus_per_node=8), "parallel.ep=12 is not a multiple of parallel.gpus_per_node=8"),
    (dict(world_size=6, pp=1, dp=6, ep=3, n_routed_experts=16), "model.n_routed_experts=16 not divisible by parallel.ep=3"),
    (dict(world_size=4, pp=1, dp=4, ep=4, gpus_per_node=2, n_routed_experts=16, max_nodes_per_token=4),
     "model.max_nodes_per_token=4 > nodes in an EP group (2)"),
    (dict(world_size=8, pp=1, dp=8, ep=8, gpus_per_node=2, n_routed_experts=16, max_nodes_per_token=1,
          n_activated_experts=8), "model.n_activated_experts=8 > model.max_nodes_per_token=1"),
])
def test_validation_names_the_key(kwargs, needle):
    with pytest.raises(LayoutError) as exc:
        validate_layout(**kwargs)
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_valid_layouts():
    lay = validate_layout(8, pp=2, dp=0, ep=2, gpus_per_node=8, n_routed_experts=8)
    assert (lay.dp, lay.edp, lay.n_nodes_ep) == (4, 2, 1)
    assert validate_layout(2048, 16, 128, 64, 8, 256, 4, 8).n_nodes_ep == 8  # DeepSeek-V3
    # a node limit over a single-node EP group is vacuous: the same model config runs anywhere
    assert validate_layout(1, 1, None, 1, 8, 256, 4, 8).n_nodes_ep == 1
    assert validate_layout(4, 1, 4, 4, 2, 8, 1, 2).n_nodes_ep == 2


def test_coordinates_world8_pp2_dp4_ep2():
    topo = [Topology(8, r, pp=2, dp=4, ep=2, gpus_per_node=1, build_groups=False) for r in range(8)]
    got = [(t.pp_rank, t.dp_rank, t.ep_rank, t.edp_rank) for t in topo]
    assert got == [(0, 0, 0, 0), (0, 1, 1, 0), (0, 2, 0, 1), (0, 3, 1, 1),
                   (1, 0, 0, 0), (1, 1, 1, 0), (1, 2, 0, 1), (1, 3, 1, 1)]
    t5 = topo[5]
    assert t5.dp_ranks == [4, 5, 6, 7]
    assert t5.ep_ranks == [4, 5]
    assert t5.edp_ranks == [5, 7]
    assert t5.pp_ranks == [1, 5]
    assert t5.stage_pair_ranks == [1, 5]
    assert (t5.pp_prev_rank, t5.pp_next_rank, t5.stage_pair_rank) == (1, None, 1)
    assert (topo[1].pp_prev_rank, topo[1].pp_next_rank) == (None, 5)
    assert topo[0].n_nodes_ep == 2 and topo[1].ep_node == 1  # gpus_per_node=1: each EP rank is a node
    assert topo[0].is_first_stage and topo[5].is_last_stage


def test_groups_partition_the_world():
    lay = Layout(16, pp=4, dp=4, ep=2, gpus_per_node=8)
    for kind, size in [("pp", 4), ("dp", 4), ("ep", 2), ("edp", 2), ("stage_pair", 2)]:
        groups = getattr(lay, f"{kind}_groups")()
        assert sorted(r for g in groups for r in g) == list(range(16)), kind
        assert all(len(g) == size for g in groups), kind
    # EP groups are consecutive dp indices of one stage; expert-DP share pp and ep index
    for g in lay.ep_groups():
        assert g == list(range(g[0], g[0] + 2)) and len({lay.coords(r)["pp_rank"] for r in g}) == 1
    for g in lay.edp_groups():
        assert len({(lay.coords(r)["pp_rank"], lay.coords(r)["ep_rank"]) for r in g}) == 1
    # DualPipe stage pair: pipeline indices r and pp-1-r, same dp index
    assert lay.group_of("stage_pair", 1) == [1, 13] and lay.group_of("stage_pair", 6) == [6, 10]
    # odd pp: the middle stage pairs with itself
    assert Layout(3, 3, 1, 1, 8).group_of("stage_pair", 1) == [1]


def test_from_env_without_distributed_is_one_process():
    t = Topology.from_env(pp=1, dp=None, ep=1)
    assert (t.world_size, t.rank, t.dp, t.dp_group) == (1, 0, 1, None)
