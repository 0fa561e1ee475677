"""Planning and running a stage rebuild (cfnode.recovery.coordinator) with injected, socket-free I/O."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import pytest
import torch

from cfnode.errors import PeerUnavailableError, RecoveryError, UnrecoverableError
from cfnode.recovery.checkfree import Neighbour, weighted_average
from cfnode.recovery.coordinator import Rebuilder, RecoveryPlan, RecoveryResult, check_meta, plan_recovery

HASH = "0123456789abcdef"
CLIP = 1.0

# -- plan_recovery --------------------------------------------------------------------------------------------


def test_stage_zero_is_unrecoverable() -> None:
    with pytest.raises(UnrecoverableError, match=re.escape("checkfree+")) as info:
        plan_recovery(0, {1, 2, 3, 4}, 4)
    assert info.value.exit_code == 5


@pytest.mark.parametrize(("stage", "num"), [(2, 4), (3, 4), (2, 3), (5, 8)])
def test_middle_stage_with_both_neighbours(stage: int, num: int) -> None:
    live = set(range(num + 1)) - {stage}
    plan = plan_recovery(stage, live, num)
    assert plan == RecoveryPlan(stage, stage - 1, stage + 1)
    assert not plan.degraded


def test_first_transformer_stage_copies_its_one_neighbour() -> None:
    plan = plan_recovery(1, {2, 3, 4}, 4)
    assert (plan.prev_source, plan.next_source) == (None, 2)
    assert plan.degraded
    # stage 0 alive changes nothing: it is never a source
    assert plan_recovery(1, {0, 2, 3, 4}, 4) == plan


def test_last_stage_copies_its_one_neighbour() -> None:
    plan = plan_recovery(4, {0, 1, 2, 3}, 4)
    assert (plan.prev_source, plan.next_source) == (3, None)
    assert plan.degraded


def test_adjacent_loss_uses_nearest_survivors() -> None:
    plan = plan_recovery(2, {1, 4}, 4)  # stages 2 and 3 both lost
    assert (plan.prev_source, plan.next_source) == (1, 4)
    assert plan.degraded
    plan = plan_recovery(3, {0, 1, 4}, 4)
    assert (plan.prev_source, plan.next_source) == (1, 4)
    assert plan.degraded


def test_stage_zero_is_never_a_source() -> None:
    plan = plan_recovery(1, {0}, 4)
    assert (plan.prev_source, plan.next_source) == (None, None)
    plan = plan_recovery(2, {0, 3}, 4)
    assert (plan.prev_source, plan.next_source) == (None, 3)


def test_the_lost_stage_and_out_of_range_entries_are_ignored() -> None:
    plan = plan_recovery(2, {1, 2, 3, 7, -1}, 4)
    assert (plan.prev_source, plan.next_source) == (1, 3)
    assert not plan.degraded


@pytest.mark.parametrize("stage", [5, 6, -1])
def test_out_of_range_stage(stage: int) -> None:
    with pytest.raises(ValueError, match=re.escape("outside 0..4")):
        plan_recovery(stage, {1, 2, 3, 4}, 4)


# -- check_meta -----------------------------------------------------------------------------------------------


def meta(stage: int, *, grad_norm: Any = 0.5, step: Any = 10, config_hash: Any = HASH) -> dict[str, Any]:
    return {"config_hash": config_hash, "stage": stage, "grad_norm": grad_norm, "step": step}


def test_check_meta_valid() -> None:
    assert check_meta(meta(2), stage=2, config_hash=HASH, clip_norm=CLIP) == (0.5, 10)
    norm, step = check_meta(meta(2, grad_norm=0, step=0), stage=2, config_hash=HASH, clip_norm=CLIP)
    assert (norm, step) == (0.0, 0) and isinstance(norm, float)
    # the 0.1% tolerance above the clip
    assert check_meta(meta(1, grad_norm=1.001), stage=1, config_hash=HASH, clip_norm=CLIP)[0] == 1.001
    assert check_meta(meta(1, grad_norm=2.5), stage=1, config_hash=HASH, clip_norm=2.5)[0] == 2.5


@pytest.mark.parametrize(("bad", "message"), [
    ({"config_hash": "ffffffffffffffff"}, "config ffffffffffffffff"),
    ({"config_hash": None}, "config None"),
    ({"stage": 3}, "got stage 3"),
    ({"stage": None}, "got stage None"),
    ({"grad_norm": math.nan}, "impossible post-clip gradient norm"),
    ({"grad_norm": math.inf}, "impossible post-clip gradient norm"),
    ({"grad_norm": -0.01}, "impossible post-clip gradient norm"),
    ({"grad_norm": 1.0011}, "impossible post-clip gradient norm"),
    ({"grad_norm": 3.0}, "impossible post-clip gradient norm"),
    ({"grad_norm": "0.5"}, "impossible post-clip gradient norm"),
    ({"grad_norm": None}, "impossible post-clip gradient norm"),
    ({"step": -1}, "reports step -1"),
    ({"step": 1.5}, "reports step 1.5"),
    ({"step": "7"}, "reports step '7'"),
    ({"step": None}, "reports step None"),
])
def test_check_meta_rejects(bad: dict[str, Any], message: str) -> None:
    m = {**meta(2), **bad}
    with pytest.raises(RecoveryError, match=re.escape(message)):
        check_meta(m, stage=2, config_hash=HASH, clip_norm=CLIP)


def test_check_meta_rejects_missing_fields() -> None:
    for key in ("config_hash", "stage", "grad_norm", "step"):
        m = meta(2)
        del m[key]
        with pytest.raises(RecoveryError):
            check_meta(m, stage=2, config_hash=HASH, clip_norm=CLIP)


# -- Rebuilder ------------------------------------------------------------------------------------------------


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q.weight": torch.randn(4, 4, generator=g), "layers.0.norm.weight": torch.randn(4, generator=g)}


FRESH = state(0)


class FakeFetch:
    """Returns prepared (meta, state) per stage; records every call."""

    def __init__(self, donors: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]],
                 fail: dict[int, BaseException] | None = None) -> None:
        self.donors = donors
        self.fail = fail or {}
        self.calls: list[int] = []

    async def __call__(self, stage_idx: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.calls.append(stage_idx)
        await asyncio.sleep(0)
        if stage_idx in self.fail:
            raise self.fail[stage_idx]
        return self.donors[stage_idx]


def donors(norms: dict[int, float], steps: dict[int, int]) -> dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    return {i: (meta(i, grad_norm=norms[i], step=steps[i]), state(i)) for i in norms}


def run(rebuilder: Rebuilder, plan: RecoveryPlan, fresh: dict[str, torch.Tensor] = FRESH) -> RecoveryResult:
    return asyncio.run(rebuilder.run(plan, fresh))


def rebuilder(fetch: FakeFetch, rule: str = "grad-avg", **kw: Any) -> Rebuilder:
    return Rebuilder(rule=rule, config_hash=HASH, clip_norm=CLIP, fetch=fetch, **kw)


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_rebuilder_grad_avg_from_both_neighbours() -> None:
    fetch = FakeFetch(donors({1: 0.3, 3: 0.7}, {1: 42, 3: 42}))
    result = run(rebuilder(fetch), plan_recovery(2, {0, 1, 3}, 3))
    assert sorted(fetch.calls) == [1, 3]
    assert result.how == "grad-avg"
    assert result.step == 42
    assert result.sources == {"prev": 1, "next": 3}
    assert result.fetch_s >= 0
    want = weighted_average(Neighbour(state=state(1), grad_norm=0.3), Neighbour(state=state(3), grad_norm=0.7))
    assert_state_equal(result.state, want)


def test_donors_at_different_steps_are_refused() -> None:
    fetch = FakeFetch(donors({1: 0.3, 3: 0.7}, {1: 41, 3: 42}))
    with pytest.raises(RecoveryError, match="different steps"):
        run(rebuilder(fetch), plan_recovery(2, {0, 1, 3}, 3))


def test_donor_weights_come_from_stage0_norms_not_from_the_donors() -> None:
    """A donor reporting 1.0 against an honest ~0.3 would take ~75 % of the average; stage 0's record wins."""
    fetch = FakeFetch(donors({1: 0.3, 3: 1.0}, {1: 7, 3: 7}))
    result = run(rebuilder(fetch, norms={1: (7, 0.3), 3: (7, 0.31)}), plan_recovery(2, {0, 1, 3}, 3))
    want = weighted_average(Neighbour(state=state(1), grad_norm=0.3), Neighbour(state=state(3), grad_norm=0.31))
    assert_state_equal(result.state, want)
    assert result.neighbours["next"].grad_norm == 0.31


def test_donor_at_another_step_than_stage0_recorded_is_refused() -> None:
    fetch = FakeFetch(donors({1: 0.3, 3: 0.3}, {1: 7, 3: 7}))
    with pytest.raises(RecoveryError, match="recorded its gradient norm at step 6"):
        run(rebuilder(fetch, norms={1: (7, 0.3), 3: (6, 0.3)}), plan_recovery(2, {0, 1, 3}, 3))


def test_rebuilder_passes_norm_power() -> None:
    fetch = FakeFetch(donors({1: 0.3, 3: 0.7}, {1: 5, 3: 5}))
    result = run(rebuilder(fetch, norm_power=2.0), plan_recovery(2, {1, 3}, 3))
    want = weighted_average(Neighbour(state=state(1), grad_norm=0.3), Neighbour(state=state(3), grad_norm=0.7),
                            power=2.0)
    assert_state_equal(result.state, want)


def test_rebuilder_adjacent_loss_weights_by_distance() -> None:
    fetch = FakeFetch(donors({1: 0.4, 4: 0.4}, {1: 9, 4: 9}))
    result = run(rebuilder(fetch), plan_recovery(2, {1, 4}, 4))
    assert result.sources == {"prev": 1, "next": 4}
    assert result.step == 9
    want = weighted_average(Neighbour(state=state(1), grad_norm=0.4, distance=1),
                            Neighbour(state=state(4), grad_norm=0.4, distance=2))
    assert_state_equal(result.state, want)


def test_rebuilder_edge_stage_copies_the_one_neighbour() -> None:
    fetch = FakeFetch(donors({2: 0.4}, {2: 17}))
    result = run(rebuilder(fetch), plan_recovery(1, {0, 2, 3}, 3))
    assert fetch.calls == [2]
    assert result.how == "copy(next)"
    assert result.sources == {"next": 2}
    assert result.step == 17
    assert_state_equal(result.state, state(2))


def test_rebuilder_with_no_surviving_transformer_stage_falls_back_to_the_seeded_init() -> None:
    fetch = FakeFetch({})
    fresh = state(0)
    result = asyncio.run(rebuilder(fetch).run(plan_recovery(2, {0}, 3), fresh, known_step=7))
    assert fetch.calls == []
    assert result.how == "random" and result.step == 7
    for key, t in fresh.items():
        assert torch.equal(result.state[key], t)


def test_rebuilder_rejects_a_nan_donor() -> None:
    d = donors({1: 0.3, 3: 0.7}, {1: 5, 3: 5})
    bad = state(3)
    bad["layers.0.q.weight"][1, 2] = float("nan")
    d[3] = (d[3][0], bad)
    with pytest.raises(RecoveryError, match=re.escape("next neighbour: layers.0.q.weight contains NaN")):
        run(rebuilder(FakeFetch(d)), plan_recovery(2, {1, 3}, 3))


def test_rebuilder_rejects_a_donor_with_another_config_hash() -> None:
    d = donors({1: 0.3, 3: 0.7}, {1: 5, 3: 5})
    d[1] = (meta(1, grad_norm=0.3, step=5, config_hash="deadbeefdeadbeef"), d[1][1])
    with pytest.raises(RecoveryError, match="deadbeefdeadbeef"):
        run(rebuilder(FakeFetch(d)), plan_recovery(2, {1, 3}, 3))


def test_rebuilder_rejects_a_donor_answering_for_another_stage() -> None:
    d = donors({1: 0.3, 3: 0.7}, {1: 5, 3: 5})
    d[3] = (meta(2, grad_norm=0.7, step=5), d[3][1])
    with pytest.raises(RecoveryError, match="asked stage 3"):
        run(rebuilder(FakeFetch(d)), plan_recovery(2, {1, 3}, 3))


def test_rebuilder_rejects_a_donor_with_mismatched_shapes() -> None:
    d = donors({1: 0.3, 3: 0.7}, {1: 5, 3: 5})
    d[1] = (d[1][0], {**state(1), "layers.0.norm.weight": torch.ones(5)})
    with pytest.raises(RecoveryError, match=re.escape("prev neighbour: layers.0.norm.weight")):
        run(rebuilder(FakeFetch(d)), plan_recovery(2, {1, 3}, 3))


def test_rebuilder_random_fetches_nothing() -> None:
    fetch = FakeFetch({})
    result = run(rebuilder(fetch, rule="random"), plan_recovery(2, {1, 3}, 3))
    assert fetch.calls == []
    assert result.how == "random"
    assert result.sources == {}
    assert result.step == 0
    assert_state_equal(result.state, FRESH)
    for k in result.state:
        assert result.state[k].data_ptr() != FRESH[k].data_ptr()


@pytest.mark.parametrize("error", [PeerUnavailableError("stage 3 timed out"), ConnectionResetError("reset")])
def test_rebuilder_propagates_a_fetch_error(error: BaseException) -> None:
    fetch = FakeFetch(donors({1: 0.3}, {1: 5}), fail={3: error})
    with pytest.raises(type(error), match=str(error)):
        run(rebuilder(fetch), plan_recovery(2, {1, 3}, 3))


# -- CheckFree+ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num", "stage", "partner"), [
    (4, 1, 2), (4, 2, 1), (4, 3, 4), (4, 4, 3), (6, 1, 2), (6, 2, 1), (6, 5, 6), (6, 6, 5), (8, 7, 8),
])
def test_checkfree_plus_edge_stage_copies_its_swap_partner(num: int, stage: int, partner: int) -> None:
    live = set(range(num + 1)) - {stage}
    plan = plan_recovery(stage, live, num, swaps=True)
    assert plan.kind == "partner" and not plan.degraded
    assert {plan.prev_source, plan.next_source} == {partner, None}
    assert (plan.prev_source if partner < stage else plan.next_source) == partner


@pytest.mark.parametrize(("num", "stage"), [(6, 3), (6, 4), (8, 5)])
def test_checkfree_plus_middle_stage_still_averages(num: int, stage: int) -> None:
    plan = plan_recovery(stage, set(range(num + 1)) - {stage}, num, swaps=True)
    assert plan == RecoveryPlan(stage, stage - 1, stage + 1)


def test_checkfree_plus_partner_lost_too_falls_back_to_nearest_survivor() -> None:
    plan = plan_recovery(1, {0, 3, 4}, 4, swaps=True)  # 1 and 2 both lost
    assert (plan.kind, plan.prev_source, plan.next_source, plan.degraded) == ("neighbours", None, 3, True)


def test_stage_zero_rebuilds_from_live_replica_holders_only() -> None:
    plan = plan_recovery(0, {1, 2, 3, 4}, 4, swaps=True, replicas={1, 4})
    assert (plan.kind, plan.replica_sources, plan.degraded) == ("replica", (1, 4), False)
    assert plan_recovery(0, {2, 3, 4}, 4, swaps=True, replicas={1, 4}).replica_sources == (4,)
    with pytest.raises(UnrecoverableError, match="replica"):
        plan_recovery(0, {2, 3}, 4, swaps=True, replicas={1, 4})
    with pytest.raises(UnrecoverableError, match="replica"):
        plan_recovery(0, {1, 2, 3, 4}, 4, swaps=True, replicas=set())


def test_a_freshly_rebuilt_stage_is_not_a_donor_while_a_survivor_exists() -> None:
    # 2 and 3 lost together; 2 was rebuilt first from (1, 4): 3 must also use (1, 4), not the rebuilt 2
    plan = plan_recovery(3, {1, 2, 4}, 4, fresh={2})
    assert (plan.prev_source, plan.next_source, plan.degraded) == (1, 4, True)
    # with no survivor left on either side, the rebuilt stage is better than nothing
    assert plan_recovery(1, {2}, 4, fresh={2}) == RecoveryPlan(1, None, 2)


def replica_meta(holder: int, step: int, norm: float = 0.5, **over: Any) -> dict[str, Any]:
    return {**meta(0, grad_norm=norm, step=step), "holder": holder, **over}


def test_rebuilder_stage_zero_takes_the_freshest_replica_exactly() -> None:
    replicas = FakeFetch({1: (replica_meta(1, 40), state(11)), 4: (replica_meta(4, 41), state(44))})
    rb = rebuilder(FakeFetch({}), fetch_replica=replicas)
    result = asyncio.run(rb.run(plan_recovery(0, {1, 2, 3, 4}, 4, swaps=True, replicas={1, 4}), FRESH,
                                known_step=41))
    assert sorted(replicas.calls) == [1, 4]
    assert (result.how, result.sources, result.step) == ("replica", {"replica": 4}, 41)
    assert_state_equal(result.state, state(44))


def test_rebuilder_stage_zero_survives_one_failed_replica_and_resumes_at_the_swarm_step() -> None:
    replicas = FakeFetch({1: (replica_meta(1, 40), state(11))}, fail={4: PeerUnavailableError("gone")})
    rb = rebuilder(FakeFetch({}), fetch_replica=replicas)
    result = asyncio.run(rb.run(RecoveryPlan(0, None, None, kind="replica", replica_sources=(1, 4)), FRESH,
                                known_step=41))
    assert result.sources == {"replica": 1} and result.step == 41  # one update behind: logged, data continues
    assert_state_equal(result.state, state(11))


def test_rebuilder_stage_zero_rejects_bad_replicas() -> None:
    bad = {1: (replica_meta(1, 40, config_hash="ffff"), state(11)),
           4: (replica_meta(4, 40), {**state(44), "layers.0.q.weight": torch.full((4, 4), math.nan)})}
    rb = rebuilder(FakeFetch({}), fetch_replica=FakeFetch(bad))
    with pytest.raises(RecoveryError, match="no usable replica"):
        asyncio.run(rb.run(RecoveryPlan(0, None, None, kind="replica", replica_sources=(1, 4)), FRESH))


def test_rebuilder_partner_copy_is_exact_and_named() -> None:
    fetch = FakeFetch(donors({2: 0.4}, {2: 30}))
    result = run(rebuilder(fetch), plan_recovery(1, {2, 3, 4}, 4, swaps=True))
    assert fetch.calls == [2] and result.how == "partner-copy" and result.sources == {"next": 2}
    assert_state_equal(result.state, state(2))


def test_redundant_any_stage_restores_from_its_predecessors_copy() -> None:
    plan = plan_recovery(3, {0, 1, 2, 4}, 4, replicas={2})
    assert (plan.kind, plan.replica_sources, plan.degraded) == ("replica", (2,), False)
    assert plan_recovery(0, {1, 2, 3, 4}, 4, replicas={4}).replica_sources == (4,)
    # the keeper is gone too: a transformer stage falls back to CheckFree, stage 0 is lost
    assert plan_recovery(3, {0, 1, 4}, 4, replicas={2}) == RecoveryPlan(3, 1, 4)
    with pytest.raises(UnrecoverableError):
        plan_recovery(0, {1, 2, 3}, 4, replicas={4})


def test_rebuilder_restores_a_transformer_stage_from_its_shadow_exactly() -> None:
    shadows = FakeFetch({2: ({**meta(3, step=40), "holder": 2}, state(33))})
    rb = rebuilder(FakeFetch({}), fetch_replica=shadows)
    result = asyncio.run(rb.run(plan_recovery(3, {0, 1, 2, 4}, 4, replicas={2}), FRESH, known_step=40))
    assert (result.how, result.sources, result.step) == ("replica", {"replica": 2}, 40)
    assert_state_equal(result.state, state(33))


def test_a_fresh_swap_partner_is_still_copied() -> None:
    # stage 1 was just rebuilt as a copy of stage 2; stage 2 dies before the next commit: copy stage 1 back
    plan = plan_recovery(2, {0, 1, 3, 4}, 4, swaps=True, fresh={1})
    assert (plan.kind, plan.prev_source) == ("partner", 1)
