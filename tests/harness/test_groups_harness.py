"""Stage groups in the protocol harness (cfnode/testing): the in-memory all-reduce (memaverage.py), the group
fault hooks, and seeded group scenarios (groupscenarios.py) with their invariants and per-family checks
(groupchecks.py): concurrent joins, a member lost in the all-reduce, an exact copy cut mid-stream, rebalancing,
a member killed as a hop reaches it (routed around within the attempt).

CFNODE_GROUP_SEEDS=N runs seeds 0..N-1 of every family (default 20) in CFNODE_HARNESS_JOBS forked workers; the
slow sweep (`-m slow`) runs seeds N..CFNODE_GROUP_SWEEP-1 (default 200). CFNODE_GROUP_SEED=K runs only seed K of
each family, in-process, logging every node's lines with virtual time (use with -s and -k <family>).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from cfnode.testing.batch import Batch, default_jobs
from cfnode.testing.faults import FaultDice, Peers
from cfnode.testing.groupchecks import CHECKS, Trace, run_group
from cfnode.testing.groupscenarios import FAMILIES, generate_group
from cfnode.testing.memaverage import AverageHub, weighted_average
from cfnode.testing.memnet import MemoryNetwork
from cfnode.testing.plan import ArmedPlan, Fault, FaultPlan, OnAverage, Victim
from cfnode.testing.runner import run_scenario
from cfnode.testing.vloop import VirtualTimeLoop
from cfnode.train.averaging import AveragingError

torch.set_num_threads(1)

ONE_SEED = os.environ.get("CFNODE_GROUP_SEED")
N = int(os.environ.get("CFNODE_GROUP_SEEDS", "20"))
SWEEP = int(os.environ.get("CFNODE_GROUP_SWEEP", "200"))
SEEDS = [int(ONE_SEED)] if ONE_SEED else list(range(N))
SWEEP_SEEDS = [] if ONE_SEED else list(range(N, SWEEP))
JOBS = int(os.environ.get("CFNODE_HARNESS_JOBS", str(default_jobs())))
TIMEOUT = 2.0
PREFIX = "cfnode_unit_stage1"


def run(coro):
    loop = VirtualTimeLoop(label="groups unit", hard_limit_s=3600)
    try:
        return loop.run_until_complete(coro), loop.time()
    finally:
        loop.close()


def hub_with(*peers: str) -> tuple[Peers, AverageHub]:
    p = Peers()
    for peer in peers:
        p.add(peer)
    return p, AverageHub(p, seed=0)


def averager(hub: AverageHub, peer: str):
    return hub.factory(peer)(prefix=PREFIX, size=3, timeout_s=TIMEOUT, matchmaking_s=0.5, own_peer=peer)


async def gather_results(*calls):
    return await asyncio.gather(*calls, return_exceptions=True)


# -- the in-memory all-reduce ------------------------------------------------------------------------------


def test_average_is_the_weighted_mean_with_the_same_bits_for_everyone():
    _, hub = hub_with("a", "b", "c")
    vectors = {p: torch.randn(7, dtype=torch.float64) for p in "abc"}
    weights = {"a": 2.0, "b": 0.0, "c": 1.0}  # a member no microbatch went through takes part with weight 0

    async def main():
        calls = [averager(hub, p).average(vectors[p], weight=weights[p], group=["c", "a", "b"], tag=(3, 9))
                 for p in ("b", "a", "c")]
        return await asyncio.gather(*calls)

    results, took = run(main())
    expected = (2.0 * vectors["a"] + 1.0 * vectors["c"]) / 3.0
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.allclose(results[0], expected, rtol=0, atol=1e-15)
    assert 0 < took < TIMEOUT  # the reduce takes some virtual time, nothing waited for a timeout
    assert [r.outcome for r in hub.log] == ["averaged"]
    assert weighted_average({"a": (torch.ones(2), 0.0)}).isnan().all()  # hivemind's 0 / 0


def test_a_round_short_of_a_member_times_out_for_the_others():
    peers, hub = hub_with("a", "b", "c")
    peers.kill("c")  # a killed node never submits

    async def main():
        calls = [averager(hub, p).average(torch.ones(3, dtype=torch.float64), weight=1.0, group=["a", "b", "c"],
                                          tag=(0, 1)) for p in ("a", "b", "c")]
        return await gather_results(*calls)

    (a, b, c), took = run(main())
    assert isinstance(a, AveragingError) and isinstance(b, AveragingError) and isinstance(c, ConnectionError)
    assert took == pytest.approx(TIMEOUT)
    assert [r.outcome.split(":")[0] for r in hub.log] == ["withdrawn", "withdrawn"]


def test_a_member_killed_after_the_round_filled_fails_it_for_everyone():
    peers, hub = hub_with("a", "b", "c")
    hub.hooks.append(lambda phase, call: peers.kill("b") if phase == "reducing" else None)

    async def main():
        calls = [averager(hub, p).average(torch.ones(3, dtype=torch.float64), weight=1.0, group=["a", "b", "c"],
                                          tag=(0, 1)) for p in ("a", "b", "c")]
        return await gather_results(*calls)

    results, took = run(main())
    assert all(isinstance(r, AveragingError) for r in results) and took < TIMEOUT
    assert len(hub.log) == 1 and "died during the all-reduce" in hub.log[0].outcome


def test_a_stalled_member_holds_up_the_reduce_until_it_thaws():
    peers, hub = hub_with("a", "b", "c")

    def stall_b(phase, call):
        if phase == "reducing":
            peers.stall("b")
            asyncio.get_running_loop().call_later(1.0, peers.thaw, "b")

    hub.hooks.append(stall_b)

    async def main():
        calls = [averager(hub, p).average(torch.full((3,), float(i), dtype=torch.float64), weight=1.0,
                                          group=["a", "b", "c"], tag=(0, 1)) for i, p in enumerate("abc")]
        return await asyncio.gather(*calls)

    results, took = run(main())
    assert all(torch.equal(r, torch.ones(3, dtype=torch.float64)) for r in results)
    assert 1.0 <= took < TIMEOUT


def test_a_cancelled_member_fails_a_filled_round_and_leaves_an_open_one():
    _, hub = hub_with("a", "b", "c")

    async def main():
        avg = {p: averager(hub, p) for p in "abc"}
        one = torch.ones(3, dtype=torch.float64)
        lone = asyncio.ensure_future(avg["a"].average(one, weight=1.0, group=["a", "b", "c"], tag=(0, 1)))
        await asyncio.sleep(0.1)
        lone.cancel()  # its handler went away (the node was stopped): it just leaves the open round
        await asyncio.gather(lone, return_exceptions=True)
        calls = [asyncio.ensure_future(avg[p].average(one, weight=1.0, group=["a", "b", "c"], tag=(0, 2)))
                 for p in "abc"]
        await asyncio.sleep(0.001)  # all three are in; the reduce takes longer
        calls[1].cancel()  # once the round filled, leaving fails it for everyone
        return await gather_results(*calls)

    (a, b, c), _ = run(main())
    assert isinstance(b, asyncio.CancelledError)
    assert isinstance(a, AveragingError) and isinstance(c, AveragingError)
    assert [r.outcome.split(":")[0] for r in hub.log] == ["withdrawn", "failed"]


def test_a_round_with_other_members_than_the_group_is_refused():
    _, hub = hub_with("a", "b", "x")

    async def main():
        one = torch.ones(3, dtype=torch.float64)
        return await gather_results(averager(hub, "a").average(one, weight=1.0, group=["a", "b"], tag=(0, 1)),
                                    averager(hub, "x").average(one, weight=1.0, group=["a", "x"], tag=(0, 1)))

    (a, x), _ = run(main())
    assert isinstance(a, AveragingError)  # check_gathered, as on the real averager: not the group it was told
    assert isinstance(x, torch.Tensor)  # x was told {a, x}, and that is who came


def test_a_closed_averager_leaves_its_round():
    _, hub = hub_with("a", "b")

    async def main():
        avg = averager(hub, "a")
        pending = asyncio.ensure_future(avg.average(torch.ones(2, dtype=torch.float64), weight=1.0,
                                                    group=["a", "b"], tag=(0, 1)))
        await asyncio.sleep(0.1)
        avg.close()
        return await gather_results(pending)

    (result,), took = run(main())
    assert isinstance(result, AveragingError) and took < TIMEOUT


def test_on_average_plan_kills_the_named_member():
    class FakeCluster:
        def __init__(self):
            self.peers = Peers()
            self.averaging = AverageHub(self.peers)
            self.net = MemoryNetwork(self.peers, FaultDice(0))
            self.event_hooks = []
            self.killed = []
            self.by_peer = {}

        def kill(self, name, why=""):
            self.killed.append((name, why))
            return True

    class H:
        def __init__(self, name):
            self.name, self.alive, self.task = name, True, object()

    cluster = FakeCluster()
    cluster.by_peer = {p: H(f"node-{p}") for p in "ab"}
    plan = FaultPlan(on_average=(OnAverage("reducing", Fault("kill", Victim("member", 1)), stage=1),))
    armed = ArmedPlan(plan, cluster)  # type: ignore[arg-type]

    async def main():
        armed.arm()
        calls = [cluster.averaging.factory(p)(prefix=PREFIX, size=2, timeout_s=TIMEOUT, matchmaking_s=0.5,
                                              own_peer=p).average(torch.ones(1, dtype=torch.float64), weight=1.0,
                                                                  group=["a", "b"], tag=(0, 1)) for p in "ab"]
        return await asyncio.gather(*calls)

    run(main())
    assert [n for n, _ in cluster.killed] == ["node-b"] and armed.fired == [f"{plan.on_average[0]} -> node-b"]


# -- the group invariants catch what they claim to ---------------------------------------------------------


class FakeMember:
    """A harness node as StateRecorder reads it: name, stage, generation and a real StageWorker."""

    def __init__(self, name, worker, stage=1, generation=1):
        self.name = name
        self.node = type("N", (), {"worker": worker, "stage": stage, "generation": generation})()


def test_identical_flags_a_member_whose_weights_differ():
    from cfnode.config import preset
    from cfnode.model.stages import build_stage
    from cfnode.testing.memberstate import StateRecorder
    from cfnode.train.worker import StageWorker

    cfg = preset("tiny", num_stages=2)
    a, b = (StageWorker(build_stage(cfg, 1), stage_idx=1, lr=1e-3, clip_norm=1.0) for _ in range(2))
    states = StateRecorder()
    states.note(FakeMember("a", a), "applied")
    states.note(FakeMember("b", b), "applied")  # seeded init: the same bits
    assert states.compared == 1 and states.mismatches == [] and states.groups_seen() == 1
    with torch.no_grad():
        next(b.module.parameters()).view(-1)[0] += 1e-7
    states.note(FakeMember("b", b), "applied")
    assert len(states.mismatches) == 1 and "differs from a" in states.mismatches[0]
    c = StageWorker(build_stage(cfg, 1), stage_idx=1, lr=1e-3, clip_norm=1.0)
    states.note(FakeMember("c", c, generation=2), "applied")  # another generation: nothing to compare with
    assert states.compared == 2


def test_group_size_flags_a_group_over_replicas():
    from cfnode.net.records import PeerRecord, StageRecord, StageState, SwarmView
    from cfnode.testing.clock import EPOCH
    from cfnode.testing.invariants import group_size
    from cfnode.testing.memberstate import GroupSizes

    def online(peer, joined_from=""):
        record = StageRecord(state=StageState.ONLINE, step=3, generation=1, joined_from=joined_from)
        return PeerRecord(peer_id=peer, record=record, expiration_time=EPOCH + 10)

    view = SwarmView(stages={1: (online("a"), online("b", "a"), online("c", "a"))}, standby=(), now=EPOCH)
    sizes = GroupSizes(replicas=2)
    sizes.sample_view(view, 1, str)
    sizes.sample_participants({1: ("a", "b")}, 4, str)
    assert sizes.largest == {0: 0, 1: 3}
    assert len(group_size(sizes)) == 1 and "3 members > 2" in group_size(sizes)[0]


# -- scenarios ---------------------------------------------------------------------------------------------


def test_every_family_generates_and_describes():
    for family in FAMILIES:
        sc = generate_group(family, 1)
        assert sc.replicas == 2 and sc.kinds[0] == family and len(sc.names) == sc.num_nodes
        assert sc.describe()[0].startswith("seed 1:") and "replicas 2" in sc.describe()[0]
    assert set(CHECKS) == set(FAMILIES)


def test_group_replay_is_identical_in_process():
    a = run_scenario(2, generate_group("average_kill", 2))
    b = run_scenario(2, generate_group("average_kill", 2))
    assert a.trace == b.trace and any(row[1] == "average" for row in a.trace)


@pytest.fixture(scope="module")
def groups_batch(request):
    wanted = {"test_group_seed", "test_group_sweep"}
    keys = list(dict.fromkeys(item.callspec.params["key"] for item in request.session.items  # in test order
                              if item.originalname in wanted and hasattr(item, "callspec")))
    b = Batch(keys, 1 if ONE_SEED else JOBS, fn=run_group)
    yield b
    b.close()


def _check(key, batch):
    family, seed = key
    if ONE_SEED:
        o = run_scenario(seed, generate_group(family, seed), trace_logs=True)
        proof, missing = CHECKS[family](Trace(o))
        ok, report = o.ok, o.report()
    else:
        summary = batch.get(key)
        ok, report, proof, missing = summary.ok, summary.report, summary.proof, summary.missing
    text = "\n".join([report, "shown:", *("  " + p for p in proof), "not shown:", *("  " + m for m in missing),
                      f"replay: CFNODE_GROUP_SEED={seed} .venv/bin/python -m pytest "
                      f"tests/harness/test_groups_harness.py -k '{family}' -s"])
    if not ok or missing:
        pytest.fail(text, pytrace=False)
    assert proof


KEYS = [(f, s) for f in FAMILIES for s in SEEDS]


@pytest.mark.parametrize("key", KEYS, ids=[f"{f}-{s}" for f, s in KEYS])
def test_group_seed(key, groups_batch):
    _check(key, groups_batch)


SWEEP_KEYS = [(f, s) for f in FAMILIES for s in SWEEP_SEEDS]


@pytest.mark.slow
@pytest.mark.parametrize("key", SWEEP_KEYS, ids=[f"{f}-{s}" for f, s in SWEEP_KEYS])
def test_group_sweep(key, groups_batch):
    _check(key, groups_batch)
