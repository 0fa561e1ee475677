"""The single-outcome rules of the step and membership protocols, each pinned by a test that fails on the
protocol before issue 10 (main ca6d74a): two-phase idempotent commits, step bounds, unique claimants,
generations that never repeat, incomplete reads, loops that survive DHT errors, attempt ids without clocks."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cfnode.clock import SystemClock
from cfnode.config import HeartbeatConfig, NodeConfig, TrainConfig, preset
from cfnode.errors import InvalidPayload
from cfnode.metrics import NodeMetrics
from cfnode.model.stages import build_stage
from cfnode.net.records import (
    PeerRecord,
    StageRecord,
    StageState,
    SwarmView,
    bound_generations,
    claim_rivals,
    learn_generations,
    merge_views,
)
from cfnode.node.commits import CommitHandler
from cfnode.node.routes import RouteTable
from cfnode.train.driver import Driver
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import NonFiniteGradient, StageWorker

CFG = preset("tiny", num_stages=2)
B, T, M = 2, CFG.seq_len, 2
NOW = 1000.0
ONLINE, RECOVERING, JOINING, OFFLINE = StageState.ONLINE, StageState.RECOVERING, StageState.JOINING, StageState.OFFLINE


def rec(peer_id: str, state: StageState = ONLINE, *, generation: int = 0, expires: float = NOW + 3,
        generations: tuple[int, ...] = ()) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, record=StageRecord(state=state, generation=generation, step=3,
                                                          generations=generations), expiration_time=expires)


def view(stages: dict[int, list[PeerRecord]], now: float = NOW) -> SwarmView:
    return SwarmView(stages={i: tuple(ps) for i, ps in stages.items()}, now=now)


# -- commits: prepare + apply, idempotent ------------------------------------------------------------------


def trained_worker(key: AttemptKey, *, scale: float = 1.0) -> StageWorker:
    torch.manual_seed(0)
    w = StageWorker(build_stage(CFG, 1), stage_idx=1, lr=1e-2, clip_norm=1.0)
    w.begin(key)
    for mb in range(M):
        w.forward(key, mb, torch.randn(B, T, CFG.hidden_size, generator=torch.Generator().manual_seed(mb)))
    for mb in range(M):
        w.backward(key, mb, scale * torch.randn(B, T, CFG.hidden_size, generator=torch.Generator().manual_seed(9)))
    return w


def test_apply_is_idempotent_and_counts_one_update() -> None:
    key = AttemptKey(0, 5)
    w = trained_worker(key)
    norms = w.prepare(key, M)
    assert w.prepare(key, M) == norms  # asked again: the same answer, nothing recomputed
    assert w.apply(key) == norms
    after = {n: p.detach().clone() for n, p in w.module.named_parameters()}
    assert w.apply(key) == norms  # a retried commit (its reply was lost) is answered again...
    assert all(torch.equal(after[n], p) for n, p in w.module.named_parameters())  # ...and applied once
    assert (w.step, w.updates, w.skipped) == (1, 1, 0)


def test_apply_of_an_attempt_never_prepared_is_refused() -> None:
    key = AttemptKey(0, 5)
    w = trained_worker(key)
    with pytest.raises(ValueError, match="prepared"):
        w.apply(key)
    assert w.step == 0 and w.updates == 0


def test_an_aborted_prepared_attempt_is_never_applied() -> None:
    old, new = AttemptKey(0, 5), AttemptKey(0, 6)
    w = trained_worker(old)
    w.prepare(old, M)
    w.begin(new)  # stage 0 aborted the attempt after the prepare and retries
    with pytest.raises(ValueError):
        w.apply(old)
    assert w.updates == 0


def test_nonfinite_gradient_is_its_own_error_and_the_step_can_be_skipped_everywhere() -> None:
    key = AttemptKey(0, 5)
    w = trained_worker(key, scale=math.inf)
    with pytest.raises(NonFiniteGradient):
        w.prepare(key, M)
    before = {n: p.detach().clone() for n, p in w.module.named_parameters()}
    w.apply(key, skip=True)
    assert all(torch.equal(before[n], p) for n, p in w.module.named_parameters())
    assert (w.step, w.updates, w.skipped) == (1, 0, 1)


class Host:
    """Just enough of a node for the commit handler (node/commits.py `CommitHost`)."""

    run_id = "r"
    generation = 1
    client = None
    driving = False

    def __init__(self, worker: StageWorker) -> None:
        self.worker, self.stage = worker, 1
        self.config = NodeConfig(model=CFG, train=TrainConfig(num_microbatches=M))
        self.after = 0
        self.metrics = NodeMetrics()

    async def compute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def after_commit(self, norm: float, raw: float) -> None:
        self.after += 1


def commit_handler(worker: StageWorker) -> CommitHandler:
    handler = CommitHandler(Host(worker))  # type: ignore[arg-type]
    handler._behind_check_running = True  # no stage 0 to ask in these tests
    return handler


def commit_meta(key: AttemptKey, phase: str) -> dict[str, Any]:
    return {"run": "r", "step": key.step, "attempt": key.attempt, "num_mb": M, "generation": 1, "phase": phase}


def test_accept_commit_answers_a_retried_apply_with_the_stored_reply() -> None:
    key = AttemptKey(0, 5)
    handler = commit_handler(trained_worker(key))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        prepared = await handler.accept(commit_meta(key, "prepare"), "p0")
        first, again = await asyncio.gather(handler.accept(commit_meta(key, "apply"), "p0"),
                                            handler.accept(commit_meta(key, "apply"), "p0"))
        return prepared, first, again

    prepared, first, again = asyncio.run(scenario())
    assert first == again and first["step"] == 1 and prepared["grad_norm"] == first["grad_norm"]
    assert handler.host.worker.updates == 1 and handler.host.after == 1


def test_accept_commit_names_a_nonfinite_gradient() -> None:
    key = AttemptKey(0, 5)
    handler = commit_handler(trained_worker(key, scale=math.inf))
    with pytest.raises(InvalidPayload) as err:
        asyncio.run(handler.accept(commit_meta(key, "prepare"), "p0"))
    assert err.value.reason == "nonfinite_grad"


@pytest.mark.parametrize(("step", "reason"), [(10**9, "behind"), (1, "behind")])
def test_a_step_beyond_the_committed_one_never_becomes_active(step: int, reason: str) -> None:
    """A hop with step=10**9 from an authorised neighbour made itself `active` and locked out every real
    attempt; now only the step this stage is at is accepted."""
    handler = commit_handler(trained_worker(AttemptKey(0, 5)))
    with pytest.raises(InvalidPayload) as err:
        handler.check_step(handler.host.worker, AttemptKey(step, 1))
    assert err.value.reason == reason
    assert handler.host.worker.active == AttemptKey(0, 5)


def test_a_stale_attempt_rejection_says_what_the_stage_holds() -> None:
    key = AttemptKey(0, 5)
    handler = commit_handler(trained_worker(key))
    handler.host.worker.prepare(key, M)
    handler.host.worker.apply(key)
    with pytest.raises(InvalidPayload) as err:
        handler.check_step(handler.host.worker, AttemptKey(0, 7))
    assert err.value.reason == "stale_step" and err.value.holds == (1, -1)


# -- attempt ids: (generation, counter), not the wall clock ------------------------------------------------


def test_attempt_ids_outrank_the_old_stage0_whatever_the_clock_and_adopt_what_a_stage_holds() -> None:
    def driver(generation: int) -> Driver:
        d = Driver.__new__(Driver)
        d.host, d._last_attempt_id = SimpleNamespace(generation=generation), 0
        return d

    old, new = driver(3), driver(4)
    old_ids = [old._new_attempt_id() for _ in range(1000)]
    assert new._new_attempt_id() > max(old_ids)  # a replacement stage 0 (higher generation) always outranks
    poisoned = (0, (4 << 32) + 10**6)
    new.adopt(poisoned)
    assert new._new_attempt_id() > poisoned[1]


# -- membership: unique claimants, generations, incomplete reads -------------------------------------------


def test_two_claimants_that_see_each_other_both_yield() -> None:
    """The earlier of two claimants may not see the later one: only "yield to any rival" keeps the later one
    from going ONLINE beside it (a tie-break by peer id would let both through)."""
    v = view({2: [rec("a", RECOVERING, generation=2), rec("b", RECOVERING, generation=2)]})
    assert [p.peer_id for p in claim_rivals(v, 2, "a", 2)] == ["b"]
    assert [p.peer_id for p in claim_rivals(v, 2, "b", 2)] == ["a"]
    only_a = view({2: [rec("a", RECOVERING, generation=2)]})
    assert claim_rivals(only_a, 2, "a", 2) == ()
    stale = view({2: [rec("a", RECOVERING, generation=2), rec("old", RECOVERING, generation=1)]})
    assert claim_rivals(stale, 2, "a", 2) == ()
    online_later = view({2: [rec("a", ONLINE, generation=3), rec("b", RECOVERING, generation=2)]})
    assert [p.peer_id for p in claim_rivals(online_later, 2, "b", 2)] == ["a"]


def test_a_generation_survives_the_records_that_used_it() -> None:
    """The dead holder's record (generation 1) expired; the neighbours remember it, so the next rebuild takes
    2, not 1 again."""
    after_expiry = view({1: [rec("n1", generation=1, generations=(1, 1, 1))], 2: [],
                         0: [rec("n0", generation=1, generations=(1, 1, 1))]})
    known = learn_generations(after_expiry, {})
    assert known[2] == 1
    table = routes_over(FakeSwarm([after_expiry]))
    asyncio.run(table.refresh())
    assert table.next_generation(2) == 2


def test_a_forged_generation_is_dropped_by_a_reader_that_knows_the_stage() -> None:
    forged = view({2: [rec("owner", generation=1), rec("forger", generation=2**40)]})
    bounded, dropped = bound_generations(forged, {2: 1})
    assert [p.peer_id for p in dropped] == ["forger"]
    assert bounded.online_owner(2).peer_id == "owner"  # type: ignore[union-attr]
    honest_next = view({2: [rec("owner", generation=1), rec("spare", RECOVERING, generation=2)]})
    assert bound_generations(honest_next, {2: 1})[1] == ()


def test_an_incomplete_read_is_not_a_loss() -> None:
    full = view({0: [rec("s0", expires=NOW + 3)], 1: [rec("s1", expires=NOW + 3)]})
    missing = view({1: [rec("s1", expires=NOW + 3.5)]}, now=NOW + 1)
    merged = merge_views(full, missing)
    assert merged.online_owner(0).peer_id == "s0"  # type: ignore[union-attr]
    assert merged.online_owner(1).expiration_time == NOW + 3.5  # type: ignore[union-attr]
    expired = merge_views(merged, view({1: [rec("s1", expires=NOW + 9)]}, now=NOW + 4))
    assert expired.online_owner(0) is None  # gone once its expiration passed, not before


class FakeSwarm:
    peer_id = "me"

    def __init__(self, views: list[SwarmView | Exception]) -> None:
        self.views = views

    async def read_view(self) -> SwarmView:
        item = self.views.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def routes_over(swarm: FakeSwarm) -> RouteTable:
    return RouteTable(swarm, SystemClock(), HeartbeatConfig(period_s=0.5, ttl_s=3), NodeMetrics(), 2,  # type: ignore[arg-type]
                      own=lambda: (None, None))


def test_a_failed_dht_read_keeps_the_view_and_is_counted() -> None:
    good = view({0: [rec("s0")]})
    table = routes_over(FakeSwarm([good, TimeoutError("stuck"), RuntimeError("pipe")]))
    assert asyncio.run(table.refresh_or_keep()) is table.view
    for _ in range(2):
        assert asyncio.run(table.refresh_or_keep()).online_owner(0).peer_id == "s0"  # type: ignore[union-attr]
    assert table.failed_reads == 2
    assert table.metrics.loop_errors.labels(loop="dht_read")._value.get() == 2


def test_a_generation_a_reader_missed_is_accepted_when_another_owner_remembers_it() -> None:
    """A stalled holder missed two failed claims (generations 2, 3): the new owner at 4 is beyond its slack,
    but the owner of another stage remembers 4 for the stage, so the reader accepts it (and then steps down)."""
    v = view({3: [rec("stale", generation=1), rec("new", generation=4)],
              2: [rec("n2", generation=1, generations=(1, 1, 1, 4))]})
    bounded, dropped = bound_generations(v, {2: 1, 3: 1})
    assert dropped == () and bounded.online_owner(3).peer_id == "new"  # type: ignore[union-attr]
    self_vouched = view({3: [rec("stale", generation=1), rec("forger", generation=9, generations=(9, 9, 9, 9))],
                         2: [rec("n2", generation=1, generations=(1, 1, 1, 1))]})
    assert [p.peer_id for p in bound_generations(self_vouched, {2: 1, 3: 1})[1]] == ["forger"]


def test_a_ban_lasts_until_the_record_expires_and_at_least_one_ttl() -> None:
    """A peer banned just before its record expires stays banned a ttl (a stale cached read may still list its
    last record), and one whose record lives on stays banned until it expires; plus one period each."""
    table = routes_over(FakeSwarm([]))
    table.clock = clock = SimpleNamespace(now=NOW, time=lambda: clock.now)  # type: ignore[assignment]
    now = NOW
    table.view = view({1: [rec("soon", expires=now + 0.1), rec("later", expires=now + 10)]})
    table.ban("soon", "confirmed_dead")
    table.ban("later", "confirmed_dead")
    table.ban("unknown", "rpc_failure")
    assert table.banned == {"soon": now + 3.5, "later": now + 10.5, "unknown": now + 3.5}
    clock.now += 3.4
    assert table.is_banned("soon") and table.is_banned("later")
    clock.now += 0.2
    assert not table.is_banned("soon") and table.is_banned("later")
