"""Stage groups: the pure rules (who is in a group, who steps down, which group a newcomer joins, who moves to
an empty stage), the balancer, the attempt's paths, the all-reduce's membership check, and the worker's exact
state copy and averaged prepare."""

from __future__ import annotations

import pytest
import torch

from cfnode.config import preset
from cfnode.model.stages import build_stage
from cfnode.net.groups import group_to_join, stage_to_move_to, step_down_reason
from cfnode.net.records import PeerRecord, StageRecord, StageState, SwarmView
from cfnode.train.averaging import AveragingError, averaging_prefix, check_gathered
from cfnode.train.balancer import Balancer, choose, expected_finish
from cfnode.train.paths import AttemptPaths
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

NOW = 100.0
ONLINE, STANDBY, JOINING = StageState.ONLINE, StageState.STANDBY, StageState.JOINING


def rec(peer: str, *, gen: int = 1, joined: str = "", state: StageState = ONLINE, step: int = 5,
        tput: float = 0.0) -> PeerRecord:
    return PeerRecord(peer_id=peer, record=StageRecord(state=state, step=step, generation=gen, joined_from=joined,
                                                       throughput=tput), expiration_time=NOW + 5)


def view(stages: dict[int, tuple[PeerRecord, ...]], standby: tuple[PeerRecord, ...] = ()) -> SwarmView:
    return SwarmView(stages=stages, standby=standby, now=NOW)


def test_a_group_is_its_founder_and_the_members_that_joined_it_at_the_top_generation() -> None:
    v = view({1: (rec("B", joined="A"), rec("A"), rec("Z"), rec("C", gen=0), rec("D", state=JOINING))})
    assert [p.peer_id for p in v.group(1)] == ["A", "B"]  # Z: a second founder; C: older; D: not ONLINE
    assert v.online_owner(1).peer_id == "A"
    assert view({1: (rec("B", joined="A"), rec("C", joined="A"))}).group(1)[0].peer_id == "B"  # the founder died
    led = view({0: (rec("0a", joined="M"), rec("M"), rec("0b", joined="M"))})
    assert [p.peer_id for p in led.group(0)] == ["M", "0a", "0b"]  # the founder leads, whatever its id
    assert led.online_owner(0).peer_id == "M"


def test_step_down_one_peer_per_stage_is_todays_rule() -> None:
    v = view({1: (rec("A"), rec("B"))})
    assert step_down_reason(v, 1, "B", 1, joined_from="", replicas=1) is not None
    assert step_down_reason(v, 1, "A", 1, joined_from="", replicas=1) is None


def test_step_down_in_groups_higher_generation_or_an_outranking_founder() -> None:
    v = view({1: (rec("A"), rec("B", joined="A"), rec("C"))})
    assert step_down_reason(v, 1, "B", 1, joined_from="A", replicas=2) is None  # joined: stays
    assert "founded" in step_down_reason(v, 1, "C", 1, joined_from="", replicas=2)
    assert step_down_reason(v, 1, "A", 1, joined_from="", replicas=2) is None
    rebuilt = view({1: (rec("A"), rec("N", gen=2))})
    assert "rebuilt" in step_down_reason(rebuilt, 1, "A", 1, joined_from="", replicas=2)


def test_a_newcomer_joins_the_group_with_the_least_throughput_stage_0_only_when_the_others_are_full() -> None:
    v = view({0: (rec("S0"),), 1: (rec("A", tput=9.0),), 2: (rec("B", tput=4.0), rec("C", joined="B", tput=4.0)),
              3: (rec("D", tput=5.0),)})
    assert group_to_join(v, 3, 2) == 3
    assert group_to_join(v, 3, 3) == 3  # 5 < 8 < 9
    assert group_to_join(v, 3, 1) is None
    assert group_to_join(v, 3, 2, wanted=2) is None and group_to_join(v, 3, 2, wanted=1) == 1
    assert group_to_join(v, 3, 2, wanted=0) == 0  # pinned: a hot copy of the driver
    full = view({0: (rec("S0"),), 1: (rec("A"), rec("B", joined="A")), 2: (rec("C"), rec("D", joined="C"))})
    assert group_to_join(full, 2, 2) == 0  # every transformer group is full
    full0 = view({**full.stages, 0: (rec("S0"), rec("S1", joined="S0"))})
    assert group_to_join(full0, 2, 2) is None and group_to_join(full0, 2, 2, wanted=0) is None


def test_the_last_member_of_the_largest_group_moves_to_an_empty_stage_when_no_spare_waits() -> None:
    v = view({0: (rec("S0"),), 1: (rec("A"), rec("B", joined="A")), 2: (), 3: (rec("D"),)})
    assert stage_to_move_to(v, 3, 1, "B", replicas=2) == 2
    assert stage_to_move_to(v, 3, 1, "A", replicas=2) is None  # one member moves: the one that sorts last
    assert stage_to_move_to(v, 3, 3, "D", replicas=2) is None  # never the last member of its group
    spare = view(dict(v.stages), standby=(rec("S", state=STANDBY),))
    assert stage_to_move_to(spare, 3, 1, "B", replicas=2) is None  # the spare rebuilds it
    claimed = view({**v.stages, 2: (rec("R", state=JOINING),)})
    assert stage_to_move_to(claimed, 3, 1, "B", replicas=2) is None
    untrained = view({i: tuple(PeerRecord(peer_id=p.peer_id, record=StageRecord(
        state=ONLINE, step=0, generation=1, joined_from=p.record.joined_from), expiration_time=NOW + 5) for p in ps)
        for i, ps in v.stages.items()})
    assert stage_to_move_to(untrained, 3, 1, "B", replicas=2) is None


def test_balancer_picks_the_earliest_expected_finish_and_breaks_ties_by_peer_id() -> None:
    assert expected_finish(0, 2.0) == 0.5 and expected_finish(3, 2.0) == 2.0
    assert choose([("b", 1.0), ("a", 1.0)], {}) == "a"
    assert choose([("a", 1.0), ("b", 3.0)], {"b": 2}) == "a"  # a tie (1.0 s each): the smaller id
    assert choose([("a", 1.0), ("b", 4.0)], {"b": 2}) == "b"  # b: 3/4 < a: 1
    assert choose([("a", 0.0), ("b", 2.0)], {"b": 1}) == "a"  # unmeasured counts as the slowest measured
    b = Balancer()
    picks = [b.take([("a", 1.0), ("b", 1.0)]) for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]
    b.release(["a", "a"])
    assert b.take([("a", 1.0), ("b", 1.0)]) == "a"
    with pytest.raises(ValueError):
        choose([], {})


def test_attempt_paths_pin_one_member_per_stage_and_count_samples() -> None:
    paths = AttemptPaths()
    paths.start({1: [("a", 1.0), ("b", 1.0)], 2: [("c", 1.0)]})
    p0, p1 = paths.pin("train", 0, [1, 2]), paths.pin("train", 1, [2, 1])
    assert p0 == ["a", "c"] and p1 == ["c", "b"]
    paths.pin("val", 0, [1, 2])
    assert paths.samples_of(1, "a") == 1 and paths.samples_of(1, "b") == 1 and paths.samples_of(2, "c") == 2
    assert paths.group(1) == ["a", "b"]
    paths.done("train", 0)
    assert paths.balancer.queued.get("c") == 2  # released once by mb 0, taken by mb 1 and the val mb


def test_the_all_reduce_must_have_had_exactly_the_named_members_at_the_same_attempt() -> None:
    ok = {"x": {"peer": "a", "step": 3, "attempt": 7}, "y": {"peer": "b", "step": 3, "attempt": 7}}
    check_gathered(ok, ["b", "a"], (3, 7))
    with pytest.raises(AveragingError):
        check_gathered(ok, ["a", "b", "c"], (3, 7))
    with pytest.raises(AveragingError):
        check_gathered({**ok, "y": {"peer": "b", "step": 3, "attempt": 6}}, ["a", "b"], (3, 7))
    assert averaging_prefix("my.run:1", 2) == "cfnode_my_run_1_stage2"


def _worker(seed: int = 0) -> StageWorker:
    torch.manual_seed(seed)
    return StageWorker(build_stage(preset("tiny", num_stages=2), 1), stage_idx=1, lr=1e-3, clip_norm=1.0)


def _train_step(w: StageWorker, key: AttemptKey, x: torch.Tensor) -> None:
    w.begin(key)
    y = w.forward(key, 0, x)
    w.backward(key, 0, torch.ones_like(y))
    w.commit(key, 1)


def test_an_exact_copy_of_a_member_stays_bit_identical_after_further_steps() -> None:
    x = torch.randn(2, 32, 64)
    a, b = _worker(0), _worker(1)
    for s in range(3):
        _train_step(a, AttemptKey(s, s + 1), x)
    meta, state = a.export_state()
    b.install_state(meta, state)
    assert b.step == a.step == 3 and (b.base_step, b.updates) == (3, 0)
    for s in range(3, 6):
        _train_step(a, AttemptKey(s, s + 1), x * (s + 1))
        _train_step(b, AttemptKey(s, s + 1), x * (s + 1))
    assert all(torch.equal(v, b.module.state_dict()[k]) for k, v in a.module.state_dict().items())


def test_members_that_average_their_gradients_apply_the_summed_gradient() -> None:
    """Two members, one microbatch each, averaged and weighted by samples: the same update as one worker that
    accumulated both microbatches (what a one-peer stage does)."""
    key = AttemptKey(0, 1)
    x0, x1 = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    alone, m0, m1 = _worker(), _worker(), _worker()
    alone.begin(key)
    for mb, x in enumerate((x0, x1)):
        y = alone.forward(key, mb, x)
        alone.backward(key, mb, torch.ones_like(y) / 2)
    alone.prepare(key, 2)
    vectors = []
    for m, x in ((m0, x0), (m1, x1)):
        m.begin(key)
        y = m.forward(key, 0, x)
        m.backward(key, 0, torch.ones_like(y) / 2)
        vectors.append(m.gradient_vector(key, 1))
    total = (vectors[0] * 1 + vectors[1] * 1) / 2 * 2  # hivemind's weighted mean, times the step's samples
    results = [m.prepare_averaged(key, total) for m in (m0, m1)]
    assert results[0] == results[1]  # same norms, same gradient digest
    assert results[0][1] == pytest.approx(alone.prepared[2], rel=1e-5)
    for m in (m0, m1, alone):
        m.apply(key)
    assert all(torch.equal(v, m1.module.state_dict()[k]) for k, v in m0.module.state_dict().items())
    for k, v in alone.module.state_dict().items():
        torch.testing.assert_close(m0.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_stage_0_reporting_a_group_lost_empties_its_stage_before_the_records_expire() -> None:
    from cfnode.net.groups import without_confirmed_lost
    from cfnode.net.records import first_empty_stage

    def head(lost: tuple[tuple[int, int], ...]) -> PeerRecord:
        return PeerRecord(peer_id="S0", record=StageRecord(state=ONLINE, step=5, generation=1, lost=lost),
                          expiration_time=NOW + 5)

    stages = {1: (rec("A"),), 2: (rec("B"), rec("C", joined="B")), 3: (rec("D"),)}
    assert first_empty_stage(without_confirmed_lost(view({0: (head(()),), **stages})), 3) is None
    reported = without_confirmed_lost(view({0: (head(((2, 1),)),), **stages}))
    assert reported.group(2) == () and first_empty_stage(reported, 3) == 2 and len(reported.group(1)) == 1
    rebuilt = {**stages, 2: (*stages[2], rec("N", gen=2))}  # a report about an older generation drops nothing newer
    assert [p.peer_id for p in without_confirmed_lost(view({0: (head(((2, 1),)),), **rebuilt})).group(2)] == ["N"]
    bad = StageRecord.from_wire({"state": "ONLINE", "lost": [[1]], "version": 2})
    assert bad is None


def test_a_prepare_round_stops_waiting_once_a_member_is_unreachable() -> None:
    import asyncio

    from cfnode.errors import PeerUnavailableError
    from cfnode.train.commit import _until_one_unreachable

    async def ok() -> dict:
        return {"grad_norm": 1.0}

    async def dead() -> dict:
        raise PeerUnavailableError("gone")

    async def stuck() -> dict:  # a sibling waiting for the dead member in its all-reduce
        await asyncio.Event().wait()
        return {}

    async def main() -> list:
        return await _until_one_unreachable([ok(), stuck(), dead()])

    first, second, third = asyncio.run(main())
    assert first == {"grad_norm": 1.0} and second is None and isinstance(third, PeerUnavailableError)

    async def all_fine() -> list:
        return await _until_one_unreachable([ok(), ok()])

    assert asyncio.run(all_fine()) == [{"grad_norm": 1.0}] * 2


def test_a_lost_member_leaves_the_attempt_and_its_microbatches_are_pinned_to_its_sibling() -> None:
    paths = AttemptPaths()
    paths.start({1: [("a", 1.0), ("b", 1.0)], 2: [("c", 1.0), ("d", 1.0)]})
    pinned = {mb: paths.pin("train", mb, (1, 2)) for mb in range(4)}
    through_c = [mb for mb, p in pinned.items() if p[1] == "c"]
    assert through_c and paths.can_drop("c") and not paths.can_drop("zz")
    assert paths.drop("c") == through_c
    assert paths.group(2) == ["d"] and not paths.can_drop("d")  # the last member cannot be routed around
    for mb in range(4):
        assert paths.path("train", mb) == [pinned[mb][0], "d"]  # its other stages stay
    assert paths.samples_of(2, "d") == 4 and paths.samples_of(2, "c") == 0
    assert paths.samples_of(1, "a") + paths.samples_of(1, "b") == 4


def test_a_microbatch_sent_again_accumulates_once_and_passes_its_gradient_on() -> None:
    """A member that already accumulated a microbatch's gradients gets it again (an incarnation sent around a
    lost member elsewhere on its path): the same input gradient comes back, the parameters' gradients stay those
    of one pass, and a hop of the superseded incarnation is refused (KeyError: dropped)."""
    cfg = preset("tiny", num_stages=2)
    key = AttemptKey(0, 1)
    x = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    once, twice = (StageWorker(build_stage(cfg, 1), stage_idx=1, lr=1e-3, clip_norm=1.0) for _ in range(2))
    once.begin(key)
    once.forward(key, 0, x)
    expected = once.backward(key, 0, g)
    twice.begin(key)
    twice.forward(key, 0, x)
    twice.backward(key, 0, g)
    twice.forward(key, 0, x, 1)
    with pytest.raises(KeyError):
        twice.backward(key, 0, g, 0)  # the first incarnation's gradient, late
    assert torch.equal(twice.backward(key, 0, g, 1), expected)
    with pytest.raises(KeyError):
        twice.forward(key, 0, x, 0)
    assert twice.backward_done == once.backward_done == 1
    for (name, p), q in zip(once.module.named_parameters(), twice.module.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_stage_0_counts_a_microbatch_sent_again_once_in_its_head_and_embedding() -> None:
    cfg = preset("tiny", num_stages=2)
    key = AttemptKey(0, 1)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    grad = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    workers = [StageWorker(build_stage(cfg, 0), stage_idx=0, lr=1e-3, clip_norm=1.0) for _ in range(2)]
    results = []
    for incarnations, w in zip((1, 2), workers, strict=True):
        w.begin(key)
        for inc in range(incarnations):
            hidden = w.embed(key, 0, ids, inc)
            results.append(w.head_backward(key, 0, hidden, targets, 1))
            w.embed_backward(key, 0, grad, inc)
    assert results[0][0] == results[1][0] == results[2][0]
    assert torch.equal(results[0][1], results[2][1])
    assert workers[0].backward_done == workers[1].backward_done == 1
    for p, q in zip(workers[0].module.parameters(), workers[1].module.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
