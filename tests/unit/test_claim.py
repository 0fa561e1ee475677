"""Which stages a node may claim (cfnode.node.claim.claimable_stages) and when the swarm counts as trained
(cfnode.net.records.swarm_has_trained), on hand-built SwarmView objects."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cfnode.config import NodeConfig, RecoveryConfig, preset
from cfnode.errors import ConfigMismatchError
from cfnode.net.records import MetaRecord, PeerRecord, StageRecord, StageState, SwarmView, swarm_has_trained
from cfnode.node.claim import check_meta, claimable_stages

NOW = 1000.0
TTL = 8.0
L = 4  # transformer stages; the swarm has stages 0..L

ONLINE, JOINING, RECOVERING, OFFLINE, STANDBY = (
    StageState.ONLINE, StageState.JOINING, StageState.RECOVERING, StageState.OFFLINE, StageState.STANDBY)


def peer(peer_id: str, state: StageState, *, step: int = 0, generation: int = 0,
         expires: float = NOW + TTL) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, record=StageRecord(state=state, step=step, generation=generation),
                      expiration_time=expires)


def view(stages: dict[int, list[PeerRecord]], standby: tuple[PeerRecord, ...] = ()) -> SwarmView:
    return SwarmView(stages={i: tuple(ps) for i, ps in stages.items()}, standby=standby, now=NOW)


def full(step: int = 0) -> dict[int, list[PeerRecord]]:
    return {i: [peer(f"p{i}", ONLINE, step=step)] for i in range(L + 1)}


def test_empty_swarm_lowest_first() -> None:
    v = view({})
    assert claimable_stages(v, L, None) == [0, 1, 2, 3, 4]
    assert not swarm_has_trained(v, L)


def test_lowest_empty_first_with_gaps() -> None:
    v = view({0: [peer("a", ONLINE)], 2: [peer("b", ONLINE)]})
    assert claimable_stages(v, L, None) == [1, 3, 4]


@pytest.mark.parametrize("state", [JOINING, RECOVERING, ONLINE])
def test_occupied_stages_are_skipped(state: StageState) -> None:
    v = view({0: [peer("a", ONLINE)], 1: [peer("b", state)]})
    assert claimable_stages(v, L, None) == [2, 3, 4]


@pytest.mark.parametrize("state", [OFFLINE, STANDBY])
def test_offline_or_standby_records_do_not_occupy(state: StageState) -> None:
    v = view({0: [peer("a", ONLINE)], 1: [peer("b", state)]})
    assert claimable_stages(v, L, None) == [1, 2, 3, 4]


def test_expired_records_do_not_occupy() -> None:
    v = view({0: [peer("a", ONLINE)], 1: [peer("b", JOINING, expires=NOW - 0.1)],
              2: [peer("c", RECOVERING, expires=NOW)]})
    assert claimable_stages(v, L, None) == [1, 2, 3, 4]


def test_one_active_member_among_others_occupies() -> None:
    v = view({1: [peer("a", OFFLINE), peer("b", JOINING)]})
    assert claimable_stages(v, L, None) == [0, 2, 3, 4]


def test_stage_zero_claimable_in_a_fresh_swarm() -> None:
    v = view({i: [peer(f"p{i}", ONLINE, step=0)] for i in range(1, L + 1)})  # all ONLINE, none has stepped
    assert not swarm_has_trained(v, L)
    assert claimable_stages(v, L, None) == [0]
    assert claimable_stages(v, L, 0) == [0]


@pytest.mark.parametrize("trained_stage", [1, 2, L])
def test_stage_zero_not_claimable_once_trained(trained_stage: int) -> None:
    v = view({trained_stage: [peer("t", ONLINE, step=3)]})
    assert swarm_has_trained(v, L)
    assert claimable_stages(v, L, None) == [i for i in range(1, L + 1) if i != trained_stage]
    assert claimable_stages(v, L, 0) == []


def test_a_spare_takes_no_stage_before_the_swarm_has_trained() -> None:
    """`--spare` only replaces a lost stage: in a forming ring (even with every stage empty) it waits as STANDBY,
    so it can start together with the nodes meant to hold the stages; once trained, it takes a lost one."""
    assert claimable_stages(view({}), L, None, spare=True) == []
    assert claimable_stages(view({1: [peer("p1", ONLINE)]}), L, 3, spare=True) == []
    trained = full(step=5)
    del trained[3]
    assert claimable_stages(view(trained), L, None, spare=True) == [3]
    assert claimable_stages(view(trained), L, None) == [3]


def test_a_run_resumed_at_a_step_has_trained_only_past_it() -> None:
    """A swarm resumed from an export at step 10: stages reporting step 10 are still the export's initial
    weights (stage 0 may be built from it); one commit later the swarm has trained."""
    at_start = view({i: [peer(f"p{i}", ONLINE, step=10)] for i in range(1, L + 1)})
    assert swarm_has_trained(at_start, L) and not swarm_has_trained(at_start, L, start_step=10)
    assert claimable_stages(at_start, L, 0, start_step=10) == [0]
    assert claimable_stages(at_start, L, 0) == []
    past = view({1: [peer("p1", ONLINE, step=11)]})
    assert swarm_has_trained(past, L, start_step=10)


def test_only_online_records_count_as_trained() -> None:
    v = view({1: [peer("a", RECOVERING, step=50)], 2: [peer("b", JOINING, step=50)],
              3: [peer("c", OFFLINE, step=50)]}, standby=(peer("s", STANDBY, step=50),))
    assert not swarm_has_trained(v, L)
    assert 0 in claimable_stages(v, L, None)


def test_trained_uses_the_online_owner() -> None:
    # the owner (highest generation) is at step 0: the stale lower generation's step does not count
    v = view({2: [peer("old", ONLINE, step=9, generation=1), peer("new", ONLINE, step=0, generation=2)]})
    assert not swarm_has_trained(v, L)
    v = view({2: [peer("old", ONLINE, step=0, generation=1), peer("new", ONLINE, step=9, generation=2)]})
    assert swarm_has_trained(v, L)


def test_stage_zero_itself_trained_counts() -> None:
    v = view({0: [peer("a", ONLINE, step=1)]})
    assert swarm_has_trained(v, L)
    assert claimable_stages(v, L, None) == [1, 2, 3, 4]


def test_stages_beyond_num_stages_are_ignored() -> None:
    v = view({L + 1: [peer("x", ONLINE, step=100)]})
    assert not swarm_has_trained(v, L)
    assert claimable_stages(v, L, None) == [0, 1, 2, 3, 4]


def test_wanted_restricts_to_that_stage() -> None:
    v = view({0: [peer("a", ONLINE)], 2: [peer("b", ONLINE)]})
    assert claimable_stages(v, L, 3) == [3]
    assert claimable_stages(v, L, 1) == [1]
    assert claimable_stages(v, L, 2) == []  # taken: wait, do not fall back to another stage
    assert claimable_stages(v, L, 0) == []


def test_all_taken_means_standby() -> None:
    assert claimable_stages(view(full(step=0)), L, None) == []
    assert claimable_stages(view(full(step=7)), L, None) == []
    mixed = {0: [peer("a", ONLINE, step=7)], 1: [peer("b", JOINING)], 2: [peer("c", RECOVERING)],
             3: [peer("d", ONLINE, step=7)], 4: [peer("e", JOINING)]}
    assert claimable_stages(view(mixed), L, None) == []
    for wanted in range(L + 1):
        assert claimable_stages(view(mixed), L, wanted) == []


def test_stage_zero_lost_after_training_leaves_only_transformer_stages() -> None:
    stages = full(step=12)
    del stages[0]
    del stages[3]
    v = view(stages)
    assert claimable_stages(v, L, None) == [3]


def holder(peer_id: str, replica_step: int, step: int = 12) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, expiration_time=NOW + TTL,
                      record=StageRecord(state=ONLINE, step=step, replica_step=replica_step))


@pytest.mark.parametrize(("holders", "claimable"), [
    ({1: 12, L: 12}, [0]),
    ({1: -1, L: 12}, [0]),   # stage 1 was itself rebuilt and holds no replica yet; stage L does
    ({1: 12}, [0]),          # stage L's record is gone, stage 1 still holds one
    ({1: -1, L: -1}, []),    # nobody holds a replica: stage 0 is lost for good
])
def test_checkfree_plus_stage_zero_is_claimable_while_a_replica_lives(holders: dict[int, int],
                                                                      claimable: list[int]) -> None:
    stages = full(step=12)
    del stages[0]
    for idx in (1, L):
        if idx in holders:
            stages[idx] = [holder(f"h{idx}", holders[idx])]
        else:
            del stages[idx]
    v = view(stages)
    got = claimable_stages(v, L, None, mode="checkfree+")
    assert [s for s in got if s == 0] == claimable
    assert 0 not in claimable_stages(v, L, None, mode="checkfree")  # plain checkfree never claims a trained stage 0


class _Swarm:
    def __init__(self, theirs: MetaRecord | None) -> None:
        self.theirs, self.stored = theirs, []

    async def read_meta(self) -> MetaRecord | None:
        return self.theirs

    async def store_meta(self, meta: MetaRecord) -> None:
        self.stored.append(meta)


def _node(mode: str, theirs: MetaRecord | None) -> SimpleNamespace:
    config = NodeConfig(model=preset("tiny", num_stages=4), recovery=RecoveryConfig(mode=mode))
    return SimpleNamespace(config=config, run_id="r", swarm=_Swarm(theirs))


def test_a_joiner_with_another_recovery_mode_is_refused_naming_both() -> None:
    theirs = MetaRecord(num_stages=4, model_config_hash=preset("tiny", num_stages=4).config_hash(),
                        recovery_mode="checkfree+")
    node = _node("checkfree", theirs)
    with pytest.raises(ConfigMismatchError, match=r"--recovery checkfree\+.*--recovery checkfree\b") as info:
        asyncio.run(check_meta(node))
    assert info.value.exit_code == 2 and node.swarm.stored == []
    ok = _node("checkfree+", theirs)
    asyncio.run(check_meta(ok))
    assert ok.swarm.stored == [theirs]
