"""The protocol harness (cfnode/testing): semantics of its in-memory DHT, transport and virtual-time loop, replay
of a seed, and a run of seeded scenarios with every invariant checked.

CFNODE_HARNESS_SEEDS=N runs seeds 0..N-1 (default 200) in CFNODE_HARNESS_JOBS forked workers (default: 2, or
the CPU count if smaller); CFNODE_HARNESS_SEED=K runs only seed K, in-process, logging every node's lines
with virtual time and the whole trace (use with -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from cfnode.config import NodeConfig, preset
from cfnode.errors import PeerUnavailableError, RejectedError
from cfnode.metrics import NodeMetrics
from cfnode.net.client import StageClient
from cfnode.net.dht import call_timeout_s
from cfnode.net.records import StageRecord, StageState, stage_key
from cfnode.testing.batch import Batch, default_jobs
from cfnode.testing.clock import EPOCH, VirtualClock
from cfnode.testing.executor import InlineExecutor
from cfnode.testing.faults import DHTFaults, FaultDice, MessageFate, MessageFaults, Peers
from cfnode.testing.invariants import single_online_owner, updates_match_steps
from cfnode.testing.memdht import MemoryDHT, MemorySwarm, Write
from cfnode.testing.memnet import MemoryNetwork
from cfnode.testing.patches import Ledger
from cfnode.testing.runner import replay_command, run_scenario
from cfnode.testing.scenario import KINDS, generate
from cfnode.testing.vloop import DeadlockError, VirtualTimeLoop

torch.set_num_threads(1)  # before any torch op: forked workers must not inherit an OpenMP pool

ONE_SEED = os.environ.get("CFNODE_HARNESS_SEED")
SEEDS = [int(ONE_SEED)] if ONE_SEED else list(range(int(os.environ.get("CFNODE_HARNESS_SEEDS", "200"))))
JOBS = int(os.environ.get("CFNODE_HARNESS_JOBS", str(default_jobs())))
TTL = 2.5


def run(coro, label: str = "unit"):
    """Run a coroutine on a fresh virtual-time loop; returns (result, virtual seconds it took)."""
    loop = VirtualTimeLoop(label=label, hard_limit_s=3600)
    try:
        result = loop.run_until_complete(coro)
        return result, loop.time()
    finally:
        loop.close()


# -- the virtual-time loop ---------------------------------------------------------------------------------


def test_virtual_time_advances_without_waiting():
    async def main():
        await asyncio.sleep(1000)
        return await asyncio.get_running_loop().run_in_executor(InlineExecutor(), sum, [1, 2, 3])

    threads = threading.active_count()
    result, took = run(main())
    assert result == 6 and took == pytest.approx(1000)
    assert threading.active_count() == threads  # the inline executor started no thread


def test_deadlock_names_the_run():
    async def main():
        await asyncio.get_running_loop().create_future()

    with pytest.raises(DeadlockError, match="seed 7"):
        run(main(), "seed 7")


def test_clock_skew():
    async def main():
        await asyncio.sleep(5)
        return VirtualClock(0.3).time(), VirtualClock(0.3).monotonic()

    (wall, mono), _ = run(main())
    assert wall == pytest.approx(EPOCH + 5.3) and mono == pytest.approx(5)


# -- the in-memory DHT -------------------------------------------------------------------------------------


def dht_world(**faults):
    peers = Peers()
    dht = MemoryDHT(peers, FaultDice(0, dht=DHTFaults(**faults)))
    return peers, dht


def swarm(dht, peers, peer_id, skew=0.0):
    peers.add(peer_id)
    return MemorySwarm(dht, peer_id, run_id="unit", num_stages=2, ttl_s=TTL, clock=VirtualClock(skew))


ONLINE = StageRecord(state=StageState.ONLINE, step=3, generation=1)


def test_dht_later_expiration_replaces_earlier_is_refused():
    async def main():
        peers, dht = dht_world()
        peers.add("a")
        key = stage_key("unit", 1)
        base = dht.now()
        assert await dht.store("a", key, "a", {"v": 1}, base + 5)
        assert not await dht.store("a", key, "a", {"v": 2}, base + 4)  # earlier: refused
        assert not await dht.store("a", key, "a", {"v": 3}, base + 5)  # equal: refused (hivemind: strictly later)
        assert await dht.store("a", key, "a", {"v": 4}, base + 6)
        assert not await dht.store("a", key, "b", {"v": 5}, base - 1)  # already expired
        return dht.visible("a", key), [w.outcome for w in dht.writes]

    (seen, outcomes), _ = run(main())
    assert seen == {"a": ({"v": 4}, pytest.approx(EPOCH + 6))}
    assert outcomes == ["stored", "refused", "refused", "stored", "past"]


def test_dht_read_view_parses_like_swarm_dht_and_expires():
    async def main():
        peers, dht = dht_world()
        a, b = swarm(dht, peers, "a"), swarm(dht, peers, "b")
        assert await a.store_stage(1, ONLINE)
        fresh = await b.read_view()
        await asyncio.sleep(TTL + 0.1)
        return fresh, await b.read_view()

    (fresh, later), _ = run(main())
    owner = fresh.online_owner(1)
    assert owner is not None and owner.peer_id == "a" and owner.record == ONLINE
    assert later.online_owner(1) is None and later.members(1) == ()


def test_dht_visibility_delay_hides_writes_from_others_only():
    async def main():
        peers, dht = dht_world(visibility_s=1.0)
        a, b = swarm(dht, peers, "a"), swarm(dht, peers, "b")
        await a.store_stage(1, ONLINE)
        own, other = await a.read_view(), await b.read_view()
        await asyncio.sleep(1.0)
        return own, other, await b.read_view()

    (own, other, later), _ = run(main())
    assert own.online_owner(1) is not None and other.online_owner(1) is None and later.online_owner(1) is not None


def test_dht_partial_read_and_timeout():
    async def main():
        peers, dht = dht_world(partial=1.0)
        a = swarm(dht, peers, "a")
        await a.store_stage(1, ONLINE)
        partial = await a.read_view()
        dht.dice.dht = DHTFaults(timeout=1.0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await a.read_view()
        return partial, asyncio.get_running_loop().time() - started

    (partial, waited), _ = run(main())
    assert partial.online_owner(1) is None
    assert waited == pytest.approx(call_timeout_s(TTL), abs=0.01)


def test_dht_dead_writer_dropped_and_stalled_caller_blocks():
    async def main():
        peers, dht = dht_world()
        a, b = swarm(dht, peers, "a"), swarm(dht, peers, "b")
        peers.stall("b")
        with pytest.raises(TimeoutError):
            await b.read_view()  # a stalled node's DHT call blocks until its own deadline
        peers.thaw("b")
        peers.kill("a")
        with pytest.raises(ConnectionError):
            await a.store_stage(1, ONLINE)
        return await b.read_view(), dht.writes[-1].outcome

    (view, outcome), _ = run(main())
    assert view.members(1) == () and outcome == "dead"


def test_dht_expire_early():
    async def main():
        peers, dht = dht_world()
        a = swarm(dht, peers, "a")
        await a.store_stage(1, ONLINE)
        assert dht.expire(stage_key("unit", 1), "a")
        return await a.read_view()

    view, _ = run(main())
    assert view.members(1) == ()


# -- the in-memory transport -------------------------------------------------------------------------------


class ScriptedDice(FaultDice):
    """Fates from a list, in call order (then no faults)."""

    def __init__(self, fates=(), **kwargs):
        super().__init__(0, **kwargs)
        self.fates = list(fates)

    def message(self):
        return self.fates.pop(0) if self.fates else MessageFate()


class FakeHost:
    """The StageHost surface rpc_info / rpc_commit / rpc_get_weights touch."""

    run_id = "unit"
    max_message_bytes = 2**20
    max_replica_bytes = 2**22
    chunk_bytes = 1024

    def __init__(self, peer_id):
        self.peer_id = peer_id
        self.config = NodeConfig(run_id="unit", model=preset("tiny", num_stages=2))
        self.clock = VirtualClock()
        self.metrics = NodeMetrics()
        self.commits = []

    def serving_stage(self):
        return 1

    def info(self):
        return {"peer_id": self.peer_id, "stage": 1}

    async def check_sender(self, peer_id, stage_idx, generation):
        return None

    async def accept_commit(self, meta, peer_id):
        self.commits.append(meta["step"])
        return {"step": meta["step"] + 1}

    async def may_fetch_weights(self, peer_id, uid):
        return True

    async def weights_snapshot(self, replica=False):
        return {"stage": 1, "step": 0}, {"w": torch.arange(3000, dtype=torch.float32)}


class NetWorld:
    """Two fake hosts, "a" and "b", on one MemoryNetwork; `await w.open()` inside the loop."""

    def __init__(self, fates=(), **faults):
        self.peers = Peers()
        self.net = MemoryNetwork(self.peers, ScriptedDice(fates, messages=MessageFaults(**faults)))
        self.hosts, self.clients = {}, {}

    async def open(self):
        for pid in ("a", "b"):
            self.peers.add(pid)
            host = self.hosts[pid] = FakeHost(pid)
            endpoint = await self.net.for_node(pid, host.config.network).open(host, host.metrics)
            self.clients[pid] = endpoint.client


COMMIT = {"run": "unit", "step": 0, "attempt": 1, "num_mb": 2, "generation": 0}


def elapsed():
    return asyncio.get_running_loop().time()


def test_net_round_trip_through_real_client_and_servicer():
    w = NetWorld()

    async def main():
        await w.open()
        return await w.clients["a"].info("b"), await w.clients["a"].commit("b", COMMIT)

    (info, reply), _ = run(main())
    assert info == {"peer_id": "b", "stage": 1} and reply["step"] == 1 and w.hosts["b"].commits == [0]
    assert isinstance(w.clients["a"], StageClient)


def test_net_drop_refuse_blackhole_and_lost_reply():
    fates = [MessageFate(drop="refuse"), MessageFate(drop="blackhole"), MessageFate(lost_reply=True)]
    w = NetWorld(fates)

    async def main():
        await w.open()
        c, out = w.clients["a"], []
        for _ in range(3):
            t = elapsed()
            with pytest.raises(PeerUnavailableError):
                await c.commit("b", COMMIT)
            out.append(elapsed() - t)
        return out

    (waits, _) = run(main())
    timeout = w.hosts["a"].config.network.request_timeout_s
    assert waits[0] < 0.01 and waits[1] == pytest.approx(timeout) and waits[2] == pytest.approx(timeout)
    assert w.hosts["b"].commits == [0]  # only the lost-reply call reached the handler: it ran


def test_net_duplicate_and_reorder():
    fates = [MessageFate(duplicate=True), MessageFate(reorder=True), MessageFate()]
    w = NetWorld(fates)

    async def main():
        await w.open()
        c, commits = w.clients["a"], w.hosts["b"].commits
        await c.commit("b", COMMIT)
        await asyncio.sleep(0.1)
        first = list(commits)
        commits.clear()
        await asyncio.gather(c.commit("b", {**COMMIT, "step": 1}), c.commit("b", {**COMMIT, "step": 2}))
        return first, commits

    (first, reordered), _ = run(main())
    assert first == [0, 0]  # delivered twice
    assert reordered == [2, 1]  # the held one arrives after the next on its link


def test_net_killed_and_stalled_peers():
    w = NetWorld()
    peers = w.peers

    async def main():
        await w.open()
        c = w.clients["a"]
        peers.stall("b")
        asyncio.get_running_loop().call_later(0.5, peers.thaw, "b")
        t = elapsed()
        await c.commit("b", COMMIT)  # blocks while b is stalled, answers once thawed
        thawed_after = elapsed() - t
        peers.stall("b")
        t = elapsed()
        with pytest.raises(PeerUnavailableError):
            await c.commit("b", COMMIT)  # stalled past the caller's timeout
        stalled_for = elapsed() - t
        peers.thaw("b")
        peers.kill("b")
        t = elapsed()
        with pytest.raises(PeerUnavailableError):
            await c.info("b")
        return thawed_after, stalled_for, elapsed() - t

    (thawed_after, stalled_for, dead_after), _ = run(main())
    assert thawed_after == pytest.approx(0.5, abs=0.01)
    assert stalled_for == pytest.approx(w.hosts["a"].config.network.request_timeout_s)
    assert dead_after == 0


def test_net_hook_kills_receiver_after_its_handler_ran():
    w = NetWorld()

    def kill_after_commit(phase, call):
        if phase == "after" and call.method == "commit":
            w.peers.kill(call.dst)

    async def main():
        await w.open()
        w.net.hooks.append(kill_after_commit)
        t = elapsed()
        with pytest.raises(PeerUnavailableError):
            await w.clients["a"].commit("b", COMMIT)
        return elapsed() - t

    took, _ = run(main())
    assert w.hosts["b"].commits == [0] and took < 0.01  # applied, and its reply never came back


def test_net_weights_stream_and_cut():
    w = NetWorld()

    async def main():
        await w.open()
        _, state = await w.clients["a"].get_weights("b", max_bytes=2**20, timeout_s=5)
        w.net.dice.messages = MessageFaults(stream_cut=1.0)
        with pytest.raises(RejectedError):
            await w.clients["a"].get_weights("b", max_bytes=2**20, timeout_s=5)
        return state

    state, _ = run(main())
    assert torch.equal(state["w"], torch.arange(3000, dtype=torch.float32))


# -- the invariants catch what they claim to ---------------------------------------------------------------


def test_single_owner_flags_two_online_writers_of_one_generation():
    def w(writer, state, gen, outcome="stored"):
        return Write(1.0, writer, stage_key("r", 1), writer, {"state": state, "generation": gen}, 9.0, outcome)

    fine = [w("a", "ONLINE", 1), w("b", "JOINING", 1), w("b", "ONLINE", 2), w("c", "ONLINE", 1, "refused")]
    assert single_online_owner(fine, "r") == []
    assert "stage 1 generation 1 had 2" in single_online_owner([*fine, w("d", "ONLINE", 1)], "r")[0]


def test_updates_flag_a_step_without_an_optimizer_step():
    class Worker:
        stage_idx, step = 1, 0

        def __init__(self):
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    ledger = Ledger()
    worker = Worker()
    ledger.track(worker)
    worker.optimizer.step()
    ledger.stepped(worker.optimizer)
    worker.step = 1
    assert updates_match_steps(ledger) == []
    worker.step = 2  # a commit that skipped the update (or applied one twice)
    assert "worker.step is 2" in updates_match_steps(ledger)[0]


# -- scenarios ---------------------------------------------------------------------------------------------


def test_every_fault_kind_is_generated():
    seen = {k for s in range(len(KINDS)) for k in generate(s).kinds}
    assert seen == set(KINDS)
    assert generate(5).describe()[0].startswith("seed 5:")


def test_replay_is_identical_in_process():
    a, b = run_scenario(3), run_scenario(3)
    assert a.trace == b.trace and a.digest == b.digest
    assert any(row[1] == "event" and row[3] == "step" for row in a.trace)


def test_replay_is_identical_across_processes_and_hash_seeds():
    """Same seed in a fresh interpreter with another PYTHONHASHSEED: nothing depends on set order."""
    seed = 9
    code = ("import json, logging; logging.disable(logging.CRITICAL); from cfnode.testing.runner import run_scenario;"
            f" o = run_scenario({seed}); print(json.dumps([o.digest, len(o.trace)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HIVEMIND_LOGLEVEL": "ERROR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    digest, rows = json.loads(out.stdout.strip().splitlines()[-1])
    here = run_scenario(seed)
    assert (digest, rows) == (here.digest, len(here.trace)), "the same seed gave another trace in another process"


@pytest.fixture(scope="module")
def batch(request):
    selected = sorted({item.callspec.params["seed"] for item in request.session.items
                       if item.originalname == "test_scenario_seed" and hasattr(item, "callspec")})
    b = Batch(selected, 1 if ONE_SEED else JOBS)
    yield b
    b.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_scenario_seed(seed, batch):
    if ONE_SEED:
        outcome = run_scenario(seed, trace_logs=True)
        ok, report = outcome.ok, outcome.report()
    else:
        summary = batch.get(seed)
        ok, report = summary.ok, summary.report
    assert replay_command(seed) in report
    if not ok:
        pytest.fail(report, pytrace=False)
