"""Pipeline schedules as data + the unit-cost simulator (pure Python, no processes).

Simulated figures at f=1, b=2 (full backward), w=1, fb=2.5, p2p=0 (bubble = max over ranks of
makespan - busy; activations in stage units):

  pp  n    1F1B bubble (=(pp-1)(F+B))  DualPipe bubble / paper formula   peak act. 1F1B / DualPipe
  2   4    3                           0.0 / 0.0   (makespan 11.5)       2 / 3
  4   8    9                           1.5 / 1.5   (makespan 24.0)       4 / 5
  8   16   21                          4.5 / 4.5   (makespan 49.0)       8 / 9

DualPipe's bubble equals (pp/2-1)(F&B+B-3W) exactly at these costs and stays at or below it for
the other cost sets tried below. DualPipeV (2pp half-size stages) matches DualPipe over 2pp ranks:
bubble (pp-1)(F&B+B-3W), peak 2pp+1 half-stage activations.
"""
import json

import pytest

from parallel.pipeline import (B, F, FB, W, Costs, Kind, ScheduleError, dualpipe, dualpipev,
                               get_schedule, one_f_one_b, simulate, to_chrome_trace, validate)
from parallel.pipeline.schedule import Schedule

PAPER = Costs(f=1, b=2, w=1, fb=2.5)
PPS = (2, 4, 8)


def mb_counts(pp):
    return sorted({2 * pp, 2 * pp + 2, 3 * pp + (3 * pp) % 2, 4 * pp})


def all_schedules():
    for pp in PPS:
        for n in mb_counts(pp):
            yield one_f_one_b(pp, n)
            yield dualpipe(pp, n)
            yield dualpipev(pp, n)


def test_validate_all():
    for s in all_schedules():
        validate(s)
        # every rank's work is complete: n forwards and n backwards per chunk it holds
        for r in range(s.pp):
            parts = [p for a in s.actions[r] for p in a.parts()]
            for c in range(s.n_chunks(r)):
                for kind in (Kind.F, Kind.B):
                    assert sum(p.kind is kind and p.chunk == c for p in parts) == \
                        sum(s.loc(m, s.stage_of(r, c)) == (r, c) for m in range(s.n_microbatches))


@pytest.mark.parametrize("pp,n", [(1, 1), (1, 3), (4, 1), (4, 3), (8, 5)])
def test_one_f_one_b_few_microbatches(pp, n):
    s = one_f_one_b(pp, n)
    validate(s)
    res = simulate(s, PAPER)
    assert res.makespan == pytest.approx((n + pp - 1) * (PAPER.f + PAPER.b))


@pytest.mark.parametrize("f,b", [(1, 2), (1, 1), (1.5, 3.25), (2, 3)])
def test_one_f_one_b_bubble_exact(f, b):
    costs = Costs(f=f, b=b, w=0.5, fb=f + b)
    for pp in PPS:
        for n in mb_counts(pp):
            res = simulate(one_f_one_b(pp, n), costs)
            for bubble in res.bubble_per_rank:
                assert bubble == pytest.approx((pp - 1) * (f + b), abs=1e-12)
            assert res.makespan == pytest.approx((n + pp - 1) * (f + b))
            assert res.peak_activations == pp


def dualpipe_formula(pp, c):
    return (pp / 2 - 1) * (c.fb + c.b - 3 * c.w)


@pytest.mark.parametrize("costs", [PAPER, Costs(1, 2, 0.5, 2.8), Costs(2, 4, 1.5, 5),
                                   Costs(1, 2, 1, 3), Costs(1, 2, 1, 2)])
def test_dualpipe_bubble_within_paper_formula(costs):
    for pp in PPS:
        for n in mb_counts(pp):
            res = simulate(dualpipe(pp, n), costs)
            assert res.bubble <= dualpipe_formula(pp, costs) * 1.05 + 1e-9


def test_documented_figures():
    expected = {2: (0.0, 11.5), 4: (1.5, 24.0), 8: (4.5, 49.0)}
    for pp, (bubble, makespan) in expected.items():
        res = simulate(dualpipe(pp, 2 * pp), PAPER)
        assert res.bubble == pytest.approx(bubble)
        assert res.bubble == pytest.approx(dualpipe_formula(pp, PAPER))
        assert res.makespan == pytest.approx(makespan)
        assert res.peak_activations == pp + 1
        assert simulate(one_f_one_b(pp, 2 * pp), PAPER).bubble == (pp - 1) * 3


def test_peak_activations():
    for pp in PPS:
        for n in mb_counts(pp):
            assert simulate(one_f_one_b(pp, n), PAPER).peak_activations == pp
            d = simulate(dualpipe(pp, n), PAPER)
            assert d.peak_activations == pp + 1
            assert max(d.peak_activations_per_rank) == pp + 1
            v = simulate(dualpipev(pp, n), PAPER)
            assert v.peak_activations == 2 * pp + 1  # half-size stages


def test_dualpipev_matches_dualpipe_over_twice_the_ranks():
    for pp in PPS:
        res = simulate(dualpipev(pp, 2 * pp + 2), PAPER)
        assert res.bubble == pytest.approx(dualpipe_formula(2 * pp, PAPER))


@pytest.mark.parametrize("build,pp,n", [
    (dualpipe, 3, 12), (dualpipe, 0, 4), (dualpipe, 4, 6), (dualpipe, 4, 9), (dualpipe, 8, 14),
    (dualpipev, 4, 7), (dualpipev, 0, 4), (one_f_one_b, 0, 4), (one_f_one_b, 2, 0),
])
def test_invalid_inputs(build, pp, n):
    with pytest.raises(ScheduleError, match="parallel.pp|train.microbatches|micro-batch"):
        build(pp, n)


def test_error_messages_name_config_keys():
    with pytest.raises(ScheduleError, match="parallel.pp"):
        dualpipe(5, 20)
    with pytest.raises(ScheduleError, match="train.microbatches"):
        dualpipe(4, 10 - 1)
    with pytest.raises(ScheduleError, match="unknown parallel.schedule"):
        get_schedule("gpipe", 2, 4)
    assert get_schedule("dualpipe", 2, 4).name == "dualpipe"


def _replace(s: Schedule, rank: int, acts) -> Schedule:
    actions = list(s.actions)
    actions[rank] = tuple(acts)
    return Schedule(s.name, s.pp, s.n_microbatches, s.n_stages, s.placement, s.paths,
                    s.mb_path, tuple(actions))


def test_validate_rejects_broken_schedules():
    s = one_f_one_b(2, 4)
    acts = list(s.actions[1])
    with pytest.raises(ScheduleError, match="misses"):
        validate(_replace(s, 1, acts[:-1]))
    with pytest.raises(ScheduleError, match="second F"):
        validate(_replace(s, 1, acts + [F(0)]))
    with pytest.raises(ScheduleError, match="B before its F"):
        validate(_replace(s, 1, [B(0)] + [a for a in acts if a != B(0)]))
    with pytest.raises(ScheduleError, match="W after a full backward"):
        validate(_replace(s, 1, acts + [W(3)]))
    d = dualpipe(2, 4)
    acts0 = list(d.actions[0])
    split = [i for i, a in enumerate(acts0) if a.kind is Kind.W]
    with pytest.raises(ScheduleError, match="no W"):
        validate(_replace(d, 0, [a for i, a in enumerate(acts0) if i not in split]))
    with pytest.raises(ScheduleError, match="does not pass"):
        validate(_replace(d, 0, acts0 + [F(0, 1)]))


def test_deadlock_detected():
    s = one_f_one_b(2, 2)
    # rank 0 waits for the grad of micro-batch 0 while rank 1 waits for the activation of 1
    bad = _replace(_replace(s, 0, [F(0), B(0), F(1), B(1)]), 1, [F(0), F(1), B(0), B(1)])
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(bad)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(bad, PAPER)


def test_dualpipe_structure():
    pp, n = 8, 20
    s = dualpipe(pp, n)
    assert s.placement == tuple((r, pp - 1 - r) for r in range(pp))
    for st in range(pp):
        assert sorted(s.holders(st)) == sorted([(st, 0), (pp - 1 - st, 1)])
    assert s.mb_path == (0,) * (n // 2) + (1,) * (n // 2)
    assert s.neighbours(0) == [1] and s.neighbours(3) == [2, 4]
    kinds = [a.kind for a in s.actions[0]]
    assert kinds.count(Kind.FB) > 0
    # reference step counts for rank 0 (h=0, K=pp/2): step 1 = 2(K-1) forwards of chunk 0
    assert s.actions[0][: 2 * (pp // 2 - 1)] == tuple(F(m, 0) for m in range(2 * (pp // 2 - 1)))
    # the first-half ranks start with chunk 0, the second half with chunk 1
    assert all(s.actions[r][0].chunk == (1 if r >= pp // 2 else 0) for r in range(pp))
    # micro-batch entry points: direction 0 at rank 0 stage 0, direction 1 at rank pp-1
    assert s.loc(0, 0) == (0, 0) and s.loc(n - 1, 0) == (pp - 1, 1)


def test_w_order_is_fifo_of_split_backwards():
    """A runtime may keep split B's in a queue and pop one per W (as the reference does)."""
    for s in all_schedules():
        for r in range(s.pp):
            pending = []
            for a in s.actions[r]:
                for p in a.parts():
                    if p.kind is Kind.B and not p.full:
                        pending.append((p.microbatch, p.chunk))
                    elif p.kind is Kind.W:
                        assert pending.pop(0) == (p.microbatch, p.chunk)
            assert not pending


def test_messages():
    s = dualpipev(4, 8)
    last = s.pp - 1
    turn = [m for a in s.actions[last] for m in s.sends(last, a) if m.local]
    assert turn and all(m.src_stage in (s.pp - 1, s.pp) for m in turn)
    # every received message is sent exactly once, by the rank that holds the source stage
    for s in [dualpipe(4, 8), dualpipev(4, 8), one_f_one_b(4, 8)]:
        sent = [m for r in range(s.pp) for a in s.actions[r] for m in s.sends(r, a)]
        recv = [m for r in range(s.pp) for a in s.actions[r] for m in s.recvs(r, a)]
        assert sorted(map(repr, sent)) == sorted(map(repr, recv))
        assert len(set(map(repr, sent))) == len(sent)
        # per (src, dst, kind, dst_chunk) stream, receive order == send order
        order = s.send_order()
        for (src, dst), msgs in order.items():
            for kind in ("act", "grad"):
                for c in range(2):
                    snd = [m for m in msgs if m.kind == kind and m.dst_chunk == c]
                    rcv = [m for a in s.actions[dst] for m in s.recvs(dst, a)
                           if m.src_rank == src and m.kind == kind and m.dst_chunk == c]
                    assert snd == rcv


def test_fb_cost_and_split_costs():
    s = dualpipe(4, 8)
    res = simulate(s, PAPER)
    for r, tl in enumerate(res.timeline):
        assert [t.action for t in tl] == list(s.actions[r])
        for t in tl:
            a = t.action
            want = {Kind.F: 1, Kind.W: 1, Kind.FB: 2.5}.get(a.kind)
            if a.kind is Kind.B:
                want = 2 if a.full else 1
            assert t.end - t.start == pytest.approx(want)
        assert res.busy_per_rank[r] + res.bubble_per_rank[r] == pytest.approx(res.makespan)


def test_p2p_latency_only_delays():
    for s in (one_f_one_b(4, 8), dualpipe(4, 8), dualpipev(4, 8)):
        a = simulate(s, PAPER)
        b = simulate(s, Costs(1, 2, 1, 2.5, p2p=0.25))
        assert b.makespan > a.makespan
        assert b.busy_per_rank == a.busy_per_rank


def test_chrome_trace():
    s = dualpipe(4, 8)
    res = simulate(s, PAPER)
    ev = to_chrome_trace(s, res)
    json.dumps(ev)
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == sum(len(a) for a in s.actions)
    assert {e["pid"] for e in xs} == set(range(s.pp))
    assert all({"name", "ts", "dur", "pid", "tid"} <= e.keys() for e in xs)
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(res.makespan * 1000)


def test_action_constructors():
    fb = FB(F(1, 0), B(2, 1, full=False))
    assert fb.parts() == (F(1, 0), B(2, 1, full=False))
    assert str(fb) == "FB[F1.0|Bi2.1]"
    with pytest.raises(ScheduleError):
        FB(B(1), F(2))
