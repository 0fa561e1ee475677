"""DHT keys, record values and the pure claiming/recovery rules of cfnode.net.records."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pytest

from cfnode.config import PROTOCOL_VERSION
from cfnode.net.records import (
    MetaRecord,
    PeerRecord,
    StageRecord,
    StageState,
    SwarmView,
    first_empty_stage,
    is_alive,
    keeps_claim,
    meta_key,
    needs_recovery,
    parse_stage_entries,
    run_meta,
    stage_key,
    standby_key,
)

NOW = 1000.0
TTL = 8.0


@dataclass
class FakeEntry:
    """Stands in for hivemind's ValueWithExpiration (only `.value` and `.expiration_time` are read)."""

    value: Any
    expiration_time: Any


def peer(peer_id: str, state: StageState, *, step: int = 0, generation: int = 0,
         expires: float = NOW + TTL) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, record=StageRecord(state=state, step=step, generation=generation),
                      expiration_time=expires)


def view(stages: dict[int, list[PeerRecord]], now: float = NOW) -> SwarmView:
    return SwarmView(stages={i: tuple(ps) for i, ps in stages.items()}, now=now)


ONLINE, JOINING, RECOVERING, OFFLINE, STANDBY = (
    StageState.ONLINE, StageState.JOINING, StageState.RECOVERING, StageState.OFFLINE, StageState.STANDBY)


# -- keys ---------------------------------------------------------------------------------------------------


def test_key_builders() -> None:
    assert stage_key("run", 0) == "run:stage:0"
    assert stage_key("run", 12) == "run:stage:12"
    assert standby_key("run") == "run:standby"
    assert meta_key("run") == "run:meta"
    # different runs and stages never share a key
    keys = {stage_key(r, i) for r in ("a", "b") for i in range(3)} | {standby_key("a"), meta_key("a")}
    assert len(keys) == 8


# -- StageRecord / MetaRecord wire format -------------------------------------------------------------------


def test_stage_record_round_trip() -> None:
    rec = StageRecord(state=RECOVERING, step=17, generation=3, grad_norm=0.25, grad_norm_raw=4.5,
                      throughput=123.5, donor=False, replica_step=16, generations=(2, 5, 3), joined_from="QmPeer",
                      lost=((2, 4),))
    wire = rec.to_wire()
    assert wire == {"state": "RECOVERING", "step": 17, "generation": 3, "grad_norm": 0.25,
                    "grad_norm_raw": 4.5, "throughput": 123.5, "donor": False, "replica_step": 16,
                    "generations": [2, 5, 3], "joined_from": "QmPeer", "lost": [[2, 4]],
                    "version": PROTOCOL_VERSION}
    assert StageRecord.from_wire(wire) == rec


def test_stage_record_from_an_older_writer_is_a_donor_without_replica() -> None:
    rec = StageRecord.from_wire({"state": "ONLINE", "step": 3, "version": 1})
    assert rec is not None and rec.donor is True and rec.replica_step == -1


@pytest.mark.parametrize("state", list(StageState))
def test_stage_record_round_trip_every_state(state: StageState) -> None:
    rec = StageRecord(state=state, step=2)
    assert StageRecord.from_wire(rec.to_wire()) == rec


def test_stage_record_defaults_and_unknown_fields() -> None:
    rec = StageRecord.from_wire({"state": "ONLINE", "future_field": [1, 2], "version": 7})
    assert rec == StageRecord(state=ONLINE, step=0, generation=0, grad_norm=1.0, grad_norm_raw=1.0,
                              throughput=0.0, version=7)
    # a record without a version is read as version 0 (a pre-versioning writer), not as ours
    assert StageRecord.from_wire({"state": "ONLINE"}).version == 0


@pytest.mark.parametrize("value", [
    None,
    "ONLINE",
    ["ONLINE", 1],
    42,
    {},
    {"step": 3},                                  # missing state
    {"state": "DEAD"},                            # unknown state
    {"state": "online"},                          # states are case-sensitive
    {"state": None},
    {"state": ["ONLINE"]},
    {"state": "ONLINE", "step": "abc"},
    {"state": "ONLINE", "step": None},
    {"state": "ONLINE", "step": [1]},
    {"state": "ONLINE", "generation": {"a": 1}},
    {"state": "ONLINE", "grad_norm": "big"},
    {"state": "ONLINE", "grad_norm_raw": None},
    {"state": "ONLINE", "throughput": b"\x00"},
    {"state": "ONLINE", "version": "v1"},
    {"state": "ONLINE", "step": math.nan},
])
def test_stage_record_malformed_is_none(value: object) -> None:
    assert StageRecord.from_wire(value) is None


@pytest.mark.parametrize("field_name", ["step", "generation", "version"])
def test_stage_record_infinite_int_field_is_none(field_name: str) -> None:
    assert StageRecord.from_wire({"state": "ONLINE", field_name: math.inf}) is None


def test_meta_record_round_trip_and_malformed() -> None:
    meta = MetaRecord(num_stages=4, model_config_hash="abcd1234", recovery_mode="checkfree+", start_step=10,
                      replicas=2)
    wire = meta.to_wire()
    assert wire == {"num_stages": 4, "model_config_hash": "abcd1234", "recovery_mode": "checkfree+",
                    "recovery_rule": "grad-avg", "microbatch_size": 8, "num_microbatches": 4, "clip_norm": 1.0,
                    "start_step": 10, "replicas": 2, "version": PROTOCOL_VERSION}
    assert MetaRecord.from_wire(wire) == meta
    assert MetaRecord.from_wire({"num_stages": 2, "model_config_hash": "h"}).recovery_mode == "checkfree"
    assert MetaRecord.from_wire({"num_stages": 2, "model_config_hash": "h"}).version == 0
    for bad in (None, "meta", [4, "h"], {}, {"num_stages": 4}, {"model_config_hash": "h"},
                {"num_stages": "four", "model_config_hash": "h"},
                {"num_stages": None, "model_config_hash": "h"},
                {"num_stages": 4, "model_config_hash": "h", "version": "x"}):
        assert MetaRecord.from_wire(bad) is None, bad


def test_meta_record_infinite_num_stages_is_none() -> None:
    assert MetaRecord.from_wire({"num_stages": math.inf, "model_config_hash": "h"}) is None


def test_records_are_frozen() -> None:
    rec = StageRecord(state=ONLINE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.step = 5  # type: ignore[misc]


# -- liveness and ages --------------------------------------------------------------------------------------


def test_is_alive() -> None:
    assert is_alive(NOW + 0.001, NOW)
    assert not is_alive(NOW, NOW)  # expiring exactly now is gone
    assert not is_alive(NOW - 1, NOW)


def test_peer_record_age() -> None:
    p = peer("a", ONLINE, expires=NOW + 6.0)  # written at NOW - 2 with ttl 8
    assert p.age_s(NOW, TTL) == pytest.approx(2.0)
    assert p.age_s(NOW + 3, TTL) == pytest.approx(5.0)
    # a record that claims to be written in the future (clock skew) has age 0, never negative
    assert peer("a", ONLINE, expires=NOW + 20).age_s(NOW, TTL) == 0.0


# -- parse_stage_entries ------------------------------------------------------------------------------------


def test_parse_stage_entries_keeps_live_well_formed_records_sorted() -> None:
    raw = {
        "peerB": FakeEntry(StageRecord(state=ONLINE, step=4).to_wire(), NOW + 5),
        "peerA": FakeEntry(StageRecord(state=JOINING).to_wire(), NOW + 1),
        "expired": FakeEntry(StageRecord(state=ONLINE).to_wire(), NOW - 0.5),
        "exactly_now": FakeEntry(StageRecord(state=ONLINE).to_wire(), NOW),
        "malformed": FakeEntry({"state": "NOPE"}, NOW + 5),
        "not_a_dict": FakeEntry("ONLINE", NOW + 5),
        "no_expiry": FakeEntry(StageRecord(state=ONLINE).to_wire(), None),
        b"bytes_subkey": FakeEntry(StageRecord(state=ONLINE).to_wire(), NOW + 5),
        7: FakeEntry(StageRecord(state=ONLINE).to_wire(), NOW + 5),
        "no_attrs": object(),
    }
    out = parse_stage_entries(raw, NOW)
    assert [p.peer_id for p in out] == ["peerA", "peerB"]
    assert out[0] == PeerRecord(peer_id="peerA", record=StageRecord(state=JOINING), expiration_time=NOW + 1)
    assert out[1].record.step == 4
    assert out[1].expiration_time == NOW + 5


def test_parse_stage_entries_survives_infinite_step() -> None:
    raw = {"bad": FakeEntry({"state": "ONLINE", "step": math.inf}, NOW + 5),
           "good": FakeEntry(StageRecord(state=ONLINE).to_wire(), NOW + 5)}
    assert [p.peer_id for p in parse_stage_entries(raw, NOW)] == ["good"]


@pytest.mark.parametrize("raw", [None, [], "x", 3, {}])
def test_parse_stage_entries_non_mapping_or_empty(raw: object) -> None:
    assert parse_stage_entries(raw, NOW) == ()


# -- SwarmView.online_owner ---------------------------------------------------------------------------------


def test_online_owner_highest_generation_then_smallest_peer_id() -> None:
    v = view({1: [peer("c", ONLINE, generation=2), peer("a", ONLINE, generation=1),
                  peer("b", ONLINE, generation=2), peer("0", JOINING, generation=9),
                  peer("1", OFFLINE, generation=9), peer("2", RECOVERING, generation=9)]})
    owner = v.online_owner(1)
    assert owner is not None and owner.peer_id == "b"


def test_online_owner_ignores_non_online() -> None:
    v = view({0: [peer("a", JOINING), peer("b", OFFLINE), peer("c", RECOVERING), peer("d", STANDBY)]})
    assert v.online_owner(0) is None
    assert v.online_owner(5) is None  # unknown stage
    assert v.max_generation(0) == 0
    assert view({0: [peer("a", OFFLINE, generation=3), peer("b", ONLINE, generation=1)]}).max_generation(0) == 3


# -- first_empty_stage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JOINING, RECOVERING, ONLINE])
def test_first_empty_stage_occupying_states(state: StageState) -> None:
    # stages 0..2 of L=2 (three stages); stage 0 and 2 occupied -> 1
    v = view({0: [peer("a", state)], 2: [peer("c", state)]})
    assert first_empty_stage(v, 2) == 1


@pytest.mark.parametrize("state", [OFFLINE, STANDBY])
def test_first_empty_stage_non_occupying_states(state: StageState) -> None:
    v = view({0: [peer("a", state)], 1: [peer("b", ONLINE)]})
    assert first_empty_stage(v, 2) == 0


def test_first_empty_stage_expired_record_does_not_occupy() -> None:
    v = view({0: [peer("a", ONLINE, expires=NOW - 1)], 1: [peer("b", ONLINE)]})
    assert first_empty_stage(v, 1) == 0


def test_first_empty_stage_returns_lowest_and_includes_stage_L() -> None:
    assert first_empty_stage(view({}), 3) == 0
    occupied = {i: [peer(f"p{i}", ONLINE)] for i in range(3)}
    assert first_empty_stage(view(occupied), 3) == 3  # stage L itself is a real stage
    occupied[3] = [peer("p3", ONLINE)]
    assert first_empty_stage(view(occupied), 3) is None


def test_first_empty_stage_newcomer_race_dead_node_still_occupies() -> None:
    """A node just died but its record has not expired yet: the newcomer must not see an empty stage (it
    becomes STANDBY); once the record expires, the stage is free."""
    dead_expires = NOW + 3
    stages = {0: [peer("s0", ONLINE)], 1: [peer("dead", ONLINE, step=10, expires=dead_expires)],
              2: [peer("s2", ONLINE)]}
    assert first_empty_stage(view(stages, now=NOW), 2) is None
    assert first_empty_stage(view(stages, now=dead_expires + 0.01), 2) == 1


# -- keeps_claim --------------------------------------------------------------------------------------------


def test_keeps_claim_alone() -> None:
    assert keeps_claim(view({1: [peer("me", JOINING)]}), 1, "me")


def test_keeps_claim_smallest_joining_wins() -> None:
    v = view({1: [peer("m", JOINING), peer("z", JOINING), peer("q", OFFLINE)]})
    assert keeps_claim(v, 1, "m")
    assert not keeps_claim(v, 1, "z")


def test_keeps_claim_loses_to_smaller_joining() -> None:
    v = view({1: [peer("me", JOINING), peer("a", JOINING)]})
    assert not keeps_claim(v, 1, "me")
    assert keeps_claim(v, 1, "a")


def test_keeps_claim_expired_smaller_joining_does_not_count() -> None:
    v = view({1: [peer("me", JOINING), peer("a", JOINING, expires=NOW - 1)]})
    assert keeps_claim(v, 1, "me")


@pytest.mark.parametrize("state", [ONLINE, RECOVERING])
def test_keeps_claim_loses_to_active_owner(state: StageState) -> None:
    v = view({1: [peer("me", JOINING), peer("zz", state)]})  # even a larger peer id wins when active
    assert not keeps_claim(v, 1, "me")


def test_keeps_claim_ignores_expired_active_owner_and_other_stages() -> None:
    v = view({1: [peer("me", JOINING), peer("a", ONLINE, expires=NOW - 1)], 2: [peer("b", ONLINE)],
              0: [peer("0", JOINING)]})
    assert keeps_claim(v, 1, "me")


def test_keeps_claim_requires_own_joining_record() -> None:
    # our JOINING write is not visible (yet): do not keep
    assert not keeps_claim(view({1: [peer("other", OFFLINE)]}), 1, "me")
    assert not keeps_claim(view({}), 1, "me")
    assert not keeps_claim(view({1: [peer("me", JOINING, expires=NOW - 1)]}), 1, "me")


# -- needs_recovery -----------------------------------------------------------------------------------------


def ring(num_stages: int, steps: dict[int, int], state: StageState = ONLINE,
         expires: float = NOW + TTL) -> SwarmView:
    return view({i: [peer(f"p{i}", state, step=s, expires=expires)] for i, s in steps.items()})


@pytest.mark.parametrize(("stage", "num_stages", "trained", "expected"), [
    (2, 4, 1, True),    # predecessor
    (2, 4, 3, True),    # successor
    (2, 4, 4, False),   # not a neighbour
    (2, 4, 0, False),   # not a neighbour
    (0, 4, 1, True),    # stage 0's neighbours are 1 ...
    (0, 4, 4, True),    # ... and L (wrap-around)
    (0, 4, 2, False),
    (4, 4, 0, True),    # stage L's successor is stage 0
    (4, 4, 3, True),
    (4, 4, 1, False),
    (1, 4, 0, True),
    (1, 1, 0, True),    # L = 1: ring 0 <-> 1
])
def test_needs_recovery_neighbours(stage: int, num_stages: int, trained: int, expected: bool) -> None:
    steps = {i: 0 for i in range(num_stages + 1) if i != stage}
    steps[trained] = 5
    assert needs_recovery(ring(num_stages, steps), stage, num_stages) is expected


def test_needs_recovery_false_for_fresh_swarm() -> None:
    assert not needs_recovery(ring(3, {0: 0, 1: 0, 3: 0}), 2, 3)
    assert not needs_recovery(view({}), 2, 3)


@pytest.mark.parametrize("state", [JOINING, RECOVERING, OFFLINE, STANDBY])
def test_needs_recovery_only_online_neighbours_count(state: StageState) -> None:
    assert not needs_recovery(ring(3, {1: 9, 3: 9}, state=state), 2, 3)


def test_needs_recovery_uses_the_online_owner() -> None:
    # two ONLINE records on stage 1: the owner (higher generation) reports step 0, the loser step 9
    v = view({1: [peer("a", ONLINE, step=9, generation=1), peer("b", ONLINE, step=0, generation=2)]})
    assert not needs_recovery(v, 2, 3)


# -- protocol version 2: run-wide settings in the meta, and which copy is the run's ----------------------------


def test_protocol_version_2_records() -> None:
    assert PROTOCOL_VERSION == 2
    assert StageRecord(state=ONLINE).version == 2 and StageRecord(state=ONLINE).to_wire()["version"] == 2
    assert MetaRecord(num_stages=1, model_config_hash="h").version == 2


@pytest.mark.parametrize("field_name, value", [
    ("recovery_rule", "uniform-avg"), ("microbatch_size", 16), ("num_microbatches", 7), ("clip_norm", 0.5)])
def test_meta_record_carries_each_run_wide_setting(field_name: str, value: object) -> None:
    meta = dataclasses.replace(MetaRecord(num_stages=2, model_config_hash="h"), **{field_name: value})
    assert meta.to_wire()[field_name] == value
    assert MetaRecord.from_wire(meta.to_wire()) == meta
    assert getattr(MetaRecord.from_wire({"num_stages": 2, "model_config_hash": "h"}), field_name) == getattr(
        MetaRecord(num_stages=2, model_config_hash="h"), field_name)  # a record without it: the default


@pytest.mark.parametrize("bad", [{"microbatch_size": "eight"}, {"num_microbatches": None},
                                 {"clip_norm": "x"}, {"clip_norm": math.inf}, {"clip_norm": math.nan}])
def test_meta_record_malformed_run_wide_setting_is_none(bad: dict[str, object]) -> None:
    assert MetaRecord.from_wire({"num_stages": 2, "model_config_hash": "h", **bad}) is None


def _meta(tag: str) -> MetaRecord:
    return MetaRecord(num_stages=3, model_config_hash=tag)


def _spare(peer_id: str, expires: float = NOW + TTL) -> PeerRecord:
    return peer(peer_id, STANDBY, expires=expires)


def test_run_meta_is_the_copy_of_the_lowest_stages_live_member() -> None:
    v = view({0: [peer("s0", ONLINE, generation=1)], 1: [peer("s1", ONLINE)], 2: [peer("s2", ONLINE)]})
    metas = {"s2": _meta("two"), "s1": _meta("one"), "s0": _meta("zero")}
    assert run_meta(metas, v) == _meta("zero")
    del metas["s0"]  # the lowest member wrote none (yet): the next stage's member decides
    assert run_meta(metas, v) == _meta("one")


@pytest.mark.parametrize("state", [JOINING, RECOVERING, ONLINE])
def test_run_meta_counts_every_occupying_state(state: StageState) -> None:
    v = view({0: [peer("s0", state)], 1: [peer("s1", ONLINE)]})
    assert run_meta({"s0": _meta("zero"), "s1": _meta("one")}, v) == _meta("zero")


def test_run_meta_skips_offline_and_expired_records() -> None:
    v = view({0: [peer("gone", OFFLINE), peer("dead", ONLINE, expires=NOW - 1)], 1: [peer("s1", ONLINE)]})
    assert run_meta({"gone": _meta("x"), "dead": _meta("y"), "s1": _meta("one")}, v) == _meta("one")


def test_run_meta_within_a_stage_prefers_the_online_owner() -> None:
    v = view({0: [peer("a", JOINING), peer("b", ONLINE, generation=1), peer("c", ONLINE, generation=2),
                  peer("d", RECOVERING, generation=3)]})
    metas = {p: _meta(p) for p in "abcd"}
    assert run_meta(metas, v) == _meta("c")  # the owner: ONLINE, highest generation
    del metas["c"], metas["b"]
    assert run_meta(metas, v) == _meta("d")  # then RECOVERING, then JOINING
    del metas["d"]
    assert run_meta(metas, v) == _meta("a")


def test_run_meta_falls_back_to_a_live_spare_then_none() -> None:
    v = SwarmView(stages={0: (), 1: ()}, standby=(_spare("z"), _spare("m"), _spare("dead", NOW - 1)), now=NOW)
    assert run_meta({"z": _meta("z"), "m": _meta("m"), "dead": _meta("d")}, v) == _meta("m")
    assert run_meta({"dead": _meta("d")}, v) is None
    assert run_meta({}, v) is None
    assert run_meta({"a": _meta("a")}, view({})) is None  # a fresh run: nobody in the view


def test_run_meta_ignores_a_copy_from_a_peer_not_in_the_view() -> None:
    """An outsider (a peer with no live record in the run) can write its own copy under its own marker; it
    never decides, however many it writes."""
    v = view({1: [peer("s1", ONLINE)]})
    metas = {"outsider": _meta("evil"), "aaa-outsider": _meta("evil"), "s1": _meta("one")}
    assert run_meta(metas, v) == _meta("one")



# -- the joiner's meta check (membership.check_meta over owner-bound copies) -----------------------------------


def _mine(**changes: object) -> MetaRecord:
    return dataclasses.replace(MetaRecord(num_stages=3, model_config_hash="abcd"), **changes)


@pytest.mark.parametrize("field_name, theirs, mine, flag", [
    ("recovery_rule", "copy", "grad-avg", "--recovery-rule"),
    ("microbatch_size", 16, 8, "--microbatch-size"),
    ("num_microbatches", 8, 4, "--microbatches"),
    ("clip_norm", 0.5, 1.0, "train.clip_norm"),
    ("start_step", 10, 0, "a start step (--model-path of an export)"),
    ("replicas", 2, 1, "--replicas"),
])
def test_meta_mismatch_names_the_setting_the_runs_value_and_ours(field_name: str, theirs: object, mine: object,
                                                                 flag: str) -> None:
    from cfnode.node.claim import meta_mismatch

    message = meta_mismatch("r", _mine(**{field_name: theirs}), _mine(**{field_name: mine}), preset="tiny")
    assert message is not None
    assert f"run 'r' uses {flag} {theirs}; this node was started with {flag} {mine}" in message
    assert meta_mismatch("r", _mine(**{field_name: theirs}), _mine(**{field_name: theirs}), preset="tiny") is None


def test_meta_mismatch_of_the_model_and_the_recovery_mode() -> None:
    from cfnode.node.claim import meta_mismatch

    model = meta_mismatch("r", _mine(model_config_hash="ffff", num_stages=5), _mine(), preset="tiny")
    assert model is not None and "config hash ffff (5 stages); this node's is abcd (3 stages, preset 'tiny')" in model
    mode = meta_mismatch("r", _mine(recovery_mode="checkfree+"), _mine(), preset="tiny")
    assert mode is not None and "--recovery checkfree+; this node was started with --recovery checkfree." in mode
    assert meta_mismatch("r", _mine(), _mine(), preset="tiny") is None


class _OwnedMetas:
    """A SwarmStore with owner-bound meta copies (what SwarmDHT.read_meta returns) and a view."""

    def __init__(self, metas: dict[str, MetaRecord], v: SwarmView) -> None:
        self.metas, self.v, self.stored = metas, v, []

    async def read_meta(self) -> dict[str, MetaRecord]:
        return self.metas

    async def read_view(self) -> SwarmView:
        return self.v

    async def store_meta(self, meta: MetaRecord) -> bool:
        self.stored.append(meta)
        return True


def _joiner(swarm: _OwnedMetas, **train: object) -> Any:
    from types import SimpleNamespace

    from cfnode.config import NodeConfig, TrainConfig, preset

    config = NodeConfig(model=preset("tiny", num_stages=3), train=TrainConfig(**train))  # type: ignore[arg-type]
    return SimpleNamespace(config=config, run_id="r", swarm=swarm)


def test_check_meta_refuses_a_joiner_whose_setting_differs_from_the_runs_copy() -> None:
    import asyncio

    from cfnode.config import preset
    from cfnode.errors import ConfigMismatchError
    from cfnode.node.claim import check_meta

    run = MetaRecord(num_stages=3, model_config_hash=preset("tiny", num_stages=3).config_hash(), microbatch_size=4)
    outsider = dataclasses.replace(run, microbatch_size=99, model_config_hash="evil")
    swarm = _OwnedMetas({"s0": run, "outsider": outsider}, view({0: [peer("s0", ONLINE)]}))
    with pytest.raises(ConfigMismatchError, match=r"--microbatch-size 4; this node was started with "
                                                  r"--microbatch-size 8") as info:
        asyncio.run(check_meta(_joiner(swarm)))
    assert info.value.exit_code == 2 and swarm.stored == []
    ok = _joiner(swarm, microbatch_size=4)
    asyncio.run(check_meta(ok))  # the outsider's copy does not decide: the right config joins
    assert swarm.stored == [run]


def test_check_meta_on_a_fresh_run_publishes_its_own_copy() -> None:
    import asyncio

    from cfnode.node.claim import check_meta

    swarm = _OwnedMetas({"outsider": MetaRecord(num_stages=9, model_config_hash="evil")}, view({}))
    asyncio.run(check_meta(_joiner(swarm)))
    assert len(swarm.stored) == 1 and swarm.stored[0].model_config_hash != "evil"
