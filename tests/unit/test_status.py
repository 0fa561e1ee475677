"""`cfnode status` without a network: the pure snapshot and renderers fed a SwarmView, and the CLI's --watch and
--json loop fed canned snapshots."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from cfnode import cli
from cfnode.net.records import MetaRecord, PeerRecord, StageRecord, StageState, SwarmView
from cfnode.status import CLEAR_SCREEN, render_frame, render_table, snapshot

NOW, TTL = 1000.0, 8.0
PEERS = {name: f"12D3KooW{name}{'x' * 30}" for name in ("s0", "s1", "s2", "s3", "new2", "spare")}


def rec(name: str, state: StageState, *, step: int = 0, generation: int = 0, age: float = 1.0) -> PeerRecord:
    return PeerRecord(peer_id=PEERS[name], record=StageRecord(state=state, step=step, generation=generation,
                                                              grad_norm=0.5), expiration_time=NOW - age + TTL)


def view_with_rebuild() -> SwarmView:
    """Stage 2 lost (no record) and being rebuilt by `new2` (RECOVERING, generation 1); one spare waits."""
    on = StageState.ONLINE
    return SwarmView(stages={0: (rec("s0", on, step=40),), 1: (rec("s1", on, step=40),),
                             2: (rec("new2", StageState.RECOVERING, generation=1, age=0.5),),
                             3: (rec("s3", on, step=40),)},
                     standby=(rec("spare", StageState.STANDBY, age=2.0),), now=NOW)


META = MetaRecord(num_stages=3, model_config_hash="abcd1234abcd1234")


def test_snapshot_shows_recovering_stage_and_spare() -> None:
    snap = snapshot("run", META, view_with_rebuild(), ttl_s=TTL)
    assert snap["num_stages"] == 3 and snap["model_config_hash"] == META.model_config_hash
    assert snap["online_stages"] == [0, 1, 3]
    assert snap["recovering"] == [{"stage": 2, "peer": PEERS["new2"], "generation": 1, "age_s": 0.5}]
    assert snap["spares"] == [PEERS["spare"]]
    assert snap["empty_stages"] == [] and snap["unrecoverable"] is False
    rows = {(r["stage"], r["state"]): r for r in snap["stages"]}
    assert rows[(None, "STANDBY")]["peer"] == PEERS["spare"] and rows[(None, "STANDBY")]["age_s"] == 2.0
    assert rows[(0, "ONLINE")]["step"] == 40 and rows[(0, "ONLINE")]["grad_norm"] == 0.5
    json.dumps(snap)  # --json prints it as is


def test_snapshot_empty_stage_and_lost_stage0() -> None:
    on = StageState.ONLINE
    view = SwarmView(stages={1: (rec("s1", on, step=5),), 2: (), 3: (rec("s3", on, step=5),)}, now=NOW)
    snap = snapshot("run", META, view, ttl_s=TTL)
    assert snap["empty_stages"] == [0, 2]
    assert snap["unrecoverable"] is True
    assert snap["recovering"] == [] and snap["spares"] == []


def test_snapshot_without_meta_lists_only_live_records() -> None:
    view = SwarmView(stages={0: (rec("s0", StageState.JOINING),)}, now=NOW)
    snap = snapshot("run", None, view, ttl_s=TTL)
    assert snap["num_stages"] is None and [r["state"] for r in snap["stages"]] == ["JOINING"]
    assert snap["empty_stages"] == []


def test_render_table_shows_spares_and_rebuilds() -> None:
    text = render_table(snapshot("run", META, view_with_rebuild(), ttl_s=TTL))
    lines = text.splitlines()
    assert lines[0] == "run run: 3 transformer stages, model abcd1234abcd1234"
    assert any("RECOVERING" in line and PEERS["new2"][:16] in line for line in lines)
    assert f"spares (STANDBY): 1 ({PEERS['spare'][:16]})" in lines
    assert f"recovering: stage 2 being rebuilt by {PEERS['new2'][:16]} (generation 1, 0.5s since its last heartbeat)" \
        in lines
    assert "UNRECOVERABLE" not in text


def test_render_table_error_and_unrecoverable() -> None:
    assert render_table({"run_id": "r", "error": "reading the DHT timed out"}) == "run r: reading the DHT timed out"
    on = StageState.ONLINE
    snap = snapshot("run", META, SwarmView(stages={1: (rec("s1", on, step=5),)}, now=NOW), ttl_s=TTL)
    text = render_table(snap)
    assert "empty stages: [0, 2, 3]" in text and "spares (STANDBY): 0" in text and "UNRECOVERABLE" in text


def test_render_frame_clears_only_on_request() -> None:
    snap = snapshot("run", META, view_with_rebuild(), ttl_s=TTL)
    framed = render_frame(snap, interval_s=2, clear=True, now=0)
    assert framed.startswith(CLEAR_SCREEN) and "every 2s (Ctrl-C to stop)" in framed
    assert framed.endswith(render_table(snap))
    assert not render_frame(snap, interval_s=0.5, clear=False, now=0).startswith(CLEAR_SCREEN)


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the DHT reads with canned snapshots; record the arguments of each watch."""
    import cfnode.status

    calls: list[dict[str, Any]] = []
    frames = [snapshot("run", META, view_with_rebuild(), ttl_s=TTL),
              snapshot("run", META, SwarmView(stages={i: (rec(f"s{i}", StageState.ONLINE, step=41),)
                                                      for i in range(4)}, now=NOW), ttl_s=TTL)]

    def fake_watch(peers, run_id, *, ttl_s, interval_s, count=None):
        calls.append({"peers": peers, "run_id": run_id, "interval_s": interval_s, "count": count})
        yield from frames[:count]

    monkeypatch.setattr(cfnode.status, "watch_status", fake_watch)
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)
    return calls


def test_watch_json_prints_one_object_per_frame(canned: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(cli.main, ["status", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco", "--run-id", "run",
                                           "--watch", "0.5", "--count", "2", "--json"])
    assert result.exit_code == 0, result.output
    frames = [json.loads(line) for line in result.output.splitlines()]
    assert [f["recovering"] != [] for f in frames] == [True, False]
    assert frames[1]["online_stages"] == [0, 1, 2, 3]
    assert canned == [{"peers": ("/ip4/127.0.0.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco",), "run_id": "run", "interval_s": 0.5, "count": 2}]


def test_watch_without_seconds_defaults_to_two(canned: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(cli.main, ["status", "--peers", "/ip4/127.0.0.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco", "--run-id", "run",
                                           "--watch", "--count", "1"])
    assert result.exit_code == 0, result.output
    assert canned[0]["interval_s"] == 2.0
    assert "every 2s" in result.output and "recovering: stage 2" in result.output
    assert CLEAR_SCREEN not in result.output  # not a terminal


def test_watch_rejects_a_zero_period(canned: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(cli.main, ["status", "--peers", "x", "--watch", "0"])
    assert result.exit_code == 2 and not canned


def test_read_takes_the_runs_meta_from_its_lowest_live_member(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` reads every copy of the meta, reads the view as wide as the largest copy claims (capped), and
    shows the copy of the run's lowest live member: an outsider's copy is ignored and does not size the map
    beyond DEFAULT_MAX_STAGES."""
    import asyncio

    import cfnode.status

    reads: list[int] = []
    full = SwarmView(stages={i: (rec(f"s{i}", StageState.ONLINE, step=4),) for i in range(4)}, now=NOW)
    metas = {PEERS["s1"]: META, PEERS["s0"]: META, "12D3KooWoutsider": MetaRecord(num_stages=10**6,
                                                                                 model_config_hash="evil")}

    class FakeSwarm:
        def __init__(self, dht: object, *, run_id: str, num_stages: int, ttl_s: float, timeout_s: float) -> None:
            self.num_stages = num_stages

        async def read_meta(self) -> dict[str, MetaRecord]:
            return metas

        async def read_view(self) -> SwarmView:
            reads.append(self.num_stages)
            return SwarmView(stages={i: full.members(i) for i in range(self.num_stages + 1)}, now=NOW)

    monkeypatch.setattr(cfnode.status, "SwarmDHT", FakeSwarm)
    snap = asyncio.run(cfnode.status._read(object(), "run", TTL))
    assert snap["model_config_hash"] == META.model_config_hash and snap["num_stages"] == 3
    assert reads == [cfnode.status.DEFAULT_MAX_STAGES, 3]
    assert snap["online_stages"] == [0, 1, 2, 3] and snap["empty_stages"] == []
    metas.clear()  # nobody wrote a copy: the widest map, no meta
    reads.clear()
    snap = asyncio.run(cfnode.status._read(object(), "run", TTL))
    assert snap["num_stages"] is None and reads == [cfnode.status.DEFAULT_MAX_STAGES]


def test_snapshot_shows_each_group_with_members_generation_step_and_load() -> None:
    from cfnode.net.records import MetaRecord, PeerRecord, StageRecord, StageState, SwarmView
    from cfnode.status import render_table, snapshot

    def rec(peer: str, tput: float, joined: str = "") -> PeerRecord:
        return PeerRecord(peer_id=peer, record=StageRecord(state=StageState.ONLINE, step=7, generation=2,
                                                           throughput=tput, joined_from=joined),
                          expiration_time=110.0)

    view = SwarmView(stages={0: (rec("A0", 5.0),), 1: (rec("B1", 3.0), rec("C1", 1.0, joined="B1"))}, now=100.0)
    snap = snapshot("r", MetaRecord(num_stages=1, model_config_hash="h", replicas=2), view, ttl_s=8)
    group1 = next(g for g in snap["groups"] if g["stage"] == 1)
    assert group1 == {"stage": 1, "members": ["B1", "C1"], "generation": 2, "step": 7, "throughput": 4.0,
                      "load": [0.75, 0.25]}
    assert "group of stage 1: 2 of 2 members, generation 2, step 7, 4.0 microbatches/s (shares 75%, 25%)" in \
        render_table(snap)
