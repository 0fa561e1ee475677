"""StageServicer in-process (cfnode.net.service) with a fake StageHost: the sender is checked on the first part,
stalls time out, concurrency and fetch rates are limited, repeated malicious rejections ban the sender, byte caps
come from the stage's own sizes; and the pure limits of cfnode.net.guard."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hivemind.proto import runtime_pb2

from cfnode.config import NodeConfig, TrainConfig, preset
from cfnode.errors import InvalidPayload
from cfnode.metrics import NodeMetrics
from cfnode.net.codec import iter_message_parts, pack_metadata, read_message, unpack_metadata
from cfnode.net.guard import (
    STRICT_REASONS,
    BanPolicy,
    CallerBuckets,
    RejectionGuard,
    ServiceLimits,
    SlotLimiter,
)
from cfnode.net.service import StageServicer

Request = runtime_pb2.ExpertRequest
RUN = "svc"
MODEL = preset("tiny", num_stages=2)
CONFIG = NodeConfig(run_id=RUN, model=MODEL, train=TrainConfig(microbatch_size=2, num_microbatches=4))
SHAPE = (2, MODEL.seq_len, MODEL.hidden_size)
EXACT = 4 * math.prod(SHAPE)  # 16 KiB
CHUNK = 4096  # a hop is 4 parts
STAGE0, STAGE2, EVIL, SPARE = "peer-stage0", "peer-stage2", "peer-outsider", "peer-spare"
REPLICA_STATE = {"embed_tokens.weight": torch.ones(8, 4), "norm.weight": torch.ones(4)}
REPLICA_BYTES = sum(4 * t.numel() for t in REPLICA_STATE.values())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class FakeHost:
    """Stage 1 of a 2-stage ring: stage 0 and stage 2 own their stages; a spare may fetch weights."""

    run_id = RUN
    config = CONFIG
    max_message_bytes = 1 << 20
    max_replica_bytes = 1 << 20
    chunk_bytes = CHUNK

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.metrics = NodeMetrics()
        self.owners = {0: STAGE0, 2: STAGE2}
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.replicas: list[dict[str, Any]] = []
        self.sender_checks = 0
        self.snapshots = 0
        self.hop_error: InvalidPayload | None = None
        self.hold: asyncio.Event | None = None  # accept_hop waits on it
        self.entered = 0
        self.all_entered: asyncio.Event | None = None
        self.expect_entered = 0

    def serving_stage(self) -> int | None:
        return 1

    def hidden_shape(self) -> tuple[int, ...]:
        return SHAPE

    def check_route(self, meta: dict[str, Any]) -> None:
        if tuple(meta["route"]) != (1, 2):
            raise InvalidPayload("route", f"must take route [1, 2], got {meta['route']!r}")

    def expected_sender(self, method: str, meta: dict[str, Any]) -> int:
        return 0 if method == "forward" else 2

    def check_path(self, method: str, meta: dict[str, Any], peer_id: str) -> None:
        if meta.get("path") not in (None, ["me", "stage2"]):
            raise InvalidPayload("route", "path")

    async def check_sender(self, peer_id: str, stage_idx: int, generation: int) -> None:
        self.sender_checks += 1
        if self.owners.get(stage_idx) != peer_id:
            raise InvalidPayload("unauthorized", f"sender is not the ONLINE owner of stage {stage_idx}")
        if generation != 0:
            raise InvalidPayload("generation", f"sender claims generation {generation}")

    async def accept_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        if self.hop_error is not None:
            raise self.hop_error
        self.entered += 1
        if self.all_entered is not None and self.entered >= self.expect_entered:
            self.all_entered.set()
        if self.hold is not None:
            await self.hold.wait()
        self.accepted.append((method, meta))

    async def accept_commit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        return {"step": meta["step"] + 1, "grad_norm": 1.0, "grad_norm_raw": 1.0}

    async def accept_abort(self, meta: dict[str, Any], peer_id: str) -> None:
        return None

    async def accept_assign(self, meta: dict[str, Any], peer_id: str) -> None:
        self.accepted.append(("assign", meta))

    async def accept_done(self, meta: dict[str, Any], peer_id: str) -> None:
        self.accepted.append(("done", meta))

    async def accept_replica(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.replicas.append(meta)

    async def accept_restore(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        return {"step": meta["to_step"], "restore_s": 0.0}

    async def weights_snapshot(self, replica: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.snapshots += 1
        return {"stage": 1, "step": 3, "generation": 0, "grad_norm": 1.0, "grad_norm_raw": 1.0,
                "config_hash": MODEL.config_hash()}, {"w": torch.arange(6.0).reshape(2, 3)}

    def info(self) -> dict[str, Any]:
        return {"stage": 1}

    def replica_bytes(self, of_stage: int) -> int:
        return REPLICA_BYTES

    async def may_fetch_weights(self, peer_id: str, uid: str) -> bool:
        return peer_id in (STAGE0, STAGE2, SPARE)


class Parts:
    """An async iterator over stream parts that counts how many the handler consumed; with `stall_after`, it
    never yields past that many parts (a sender that went quiet)."""

    def __init__(self, parts: Iterable[Request], *, stall_after: int | None = None,
                 gap_s: float = 0.0) -> None:
        self.parts = list(parts)
        self.consumed = 0
        self.stall_after = stall_after
        self.gap_s = gap_s
        self.stalled = asyncio.Event()  # set once the handler waits for the part that never comes

    def __aiter__(self) -> Parts:
        return self

    async def __anext__(self) -> Request:
        if self.stall_after is not None and self.consumed >= self.stall_after:
            self.stalled.set()
            await asyncio.Event().wait()
        if self.consumed >= len(self.parts):
            raise StopAsyncIteration
        if self.gap_s and self.consumed:
            await asyncio.sleep(self.gap_s)  # a trickling sender (the behaviour under test, not a sync point)
        self.consumed += 1
        return self.parts[self.consumed - 1]


def ctx(peer_id: str) -> Any:
    return SimpleNamespace(remote_id=SimpleNamespace(to_base58=lambda: peer_id))


def hop_meta(**over: Any) -> dict[str, Any]:
    return {"run": RUN, "step": 5, "attempt": 1, "mb": 0, "num_mb": 4, "generation": 0, "from_stage": 0,
            "to_stage": 1, "kind": "train", "route": [1, 2], **over}


def hop_parts(meta: dict[str, Any] | None = None, tensor: torch.Tensor | None = None,
              chunk: int = CHUNK) -> list[Request]:
    t = torch.randn(SHAPE) if tensor is None else tensor
    return list(iter_message_parts(Request, hop_meta() if meta is None else meta, [t], chunk))


def servicer(host: FakeHost | None = None, **limits: Any) -> tuple[StageServicer, FakeHost]:
    host = host or FakeHost()
    base = ServiceLimits.from_config(CONFIG)
    return StageServicer(host, limits=ServiceLimits(**{**base.__dict__, **limits})), host


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def forward(svc: StageServicer, parts: Parts, peer: str = STAGE0, method: str = "forward") -> dict[str, Any]:
    rpc = svc.rpc_forward if method == "forward" else svc.rpc_backward
    return unpack_metadata((await rpc(parts, ctx(peer))).metadata)


def rejected(svc: StageServicer, reason: str, method: str = "forward") -> float:
    return svc.host.metrics.registry.get_sample_value("cfnode_rpc_rejected_total",
                                                      {"method": method, "reason": reason})


def bans(svc: StageServicer) -> float:
    return svc.host.metrics.registry.get_sample_value("cfnode_peer_bans_total", {"reason": "rejections"})


# -- hops: what the first part decides ---------------------------------------------------------------------


def test_a_valid_multi_part_hop_is_accepted() -> None:
    svc, host = servicer()
    parts = Parts(hop_parts())
    assert len(parts.parts) == EXACT // CHUNK
    assert run(forward(svc, parts)) == {"ok": True}
    assert parts.consumed == len(parts.parts)
    assert [m for m, _ in host.accepted] == ["forward"] and host.sender_checks == 1


def test_an_unauthorised_sender_costs_one_part() -> None:
    svc, host = servicer()
    parts = Parts(hop_parts())
    assert run(forward(svc, parts, peer=EVIL))["reason"] == "unauthorized"
    assert parts.consumed == 1 and not host.accepted
    assert rejected(svc, "unauthorized") == 1


@pytest.mark.parametrize(("reason", "parts"), [
    ("decode", [Request(metadata=b"\xc1\xff garbage"), *hop_parts()[1:]]),
    ("decode", hop_parts({k: v for k, v in hop_meta().items() if k != "route"})),
    ("decode", hop_parts(hop_meta(route="1,2"))),
    ("decode", hop_parts(hop_meta(kind="other"))),
    ("wrong_run", hop_parts(hop_meta(run="other"))),
    ("wrong_stage", hop_parts(hop_meta(to_stage=2))),
    ("route", hop_parts(hop_meta(route=[2, 1]))),
    ("unauthorized", hop_parts(hop_meta(from_stage=2))),
    ("generation", hop_parts(hop_meta(generation=7))),
    ("shape", hop_parts(tensor=torch.zeros(SHAPE[0] * 2, SHAPE[1] // 2, SHAPE[2]))),
    ("dtype", hop_parts(tensor=torch.zeros(SHAPE, dtype=torch.float64))),
])
def test_bad_metadata_or_header_is_rejected_after_one_part(reason: str, parts: list[Request]) -> None:
    svc, host = servicer()
    stream = Parts(parts)
    assert len(stream.parts) > 1
    assert run(forward(svc, stream))["reason"] == reason
    assert stream.consumed == 1 and not host.accepted


def test_a_bad_tensor_after_the_first_part_is_caught_after_reading() -> None:
    svc, host = servicer()
    t = torch.zeros(SHAPE)
    t[-1, -1, -1] = float("nan")  # in the last part
    stream = Parts(hop_parts(tensor=t))
    assert run(forward(svc, stream))["reason"] == "nonfinite"
    assert stream.consumed == len(stream.parts) and host.sender_checks == 1 and not host.accepted


def test_outsider_barrage_keeps_todays_reasons() -> None:
    """The loopback barrage (tests/loopback/test_swarm.py) in-process: an outsider's single-part messages get
    the reason of their defect, not `unauthorized`, because everything the first part carries is checked
    before the sender."""
    host = FakeHost()
    host.max_message_bytes = 1 << 20
    shape = SHAPE
    nan = torch.zeros(shape)
    nan[0, 0, 0] = float("nan")
    one = 2**20

    def parts(meta: dict[str, Any], tensors: list[torch.Tensor]) -> list[Request]:
        return list(iter_message_parts(Request, meta, tensors, one))

    meta = hop_meta(step=10**9)
    cases = [
        ("shape", parts(meta, [torch.zeros(shape[0], shape[1], shape[2] - 1)])),
        ("dtype", parts(meta, [torch.zeros(shape, dtype=torch.float64)])),
        ("nonfinite", parts(meta, [nan])),
        ("nonfinite", parts(meta, [torch.full(shape, float("inf"))])),
        ("decode", [Request(metadata=b"\xc1\xff garbage", tensors=[])]),
        ("decode", [Request(metadata=pack_metadata(meta), tensors=[runtime_pb2.Tensor(
            buffer=b"\x01\x02\x03\x04\x05", size=list(shape), dtype="float32", chunks=1)])]),
        ("decode", [Request(metadata=pack_metadata(meta), tensors=[runtime_pb2.Tensor(
            buffer=b"\0" * 8, size=[2], dtype="float99", chunks=1)])]),
        ("wrong_run", parts({**meta, "run": "other"}, [torch.zeros(shape)])),
        ("wrong_stage", parts({**meta, "to_stage": 2}, [torch.zeros(shape)])),
        ("unauthorized", parts(meta, [torch.zeros(shape)])),
        ("route", parts({**meta, "route": [2, 1]}, [torch.zeros(shape)])),
        ("decode", parts({**meta, "route": "1,2"}, [torch.zeros(shape)])),
        ("too_large", parts(meta, [torch.zeros(host.max_message_bytes // 2)]) * 3),
        ("too_large", [Request(metadata=pack_metadata(meta), tensors=[runtime_pb2.Tensor(
            buffer=b"\0" * 16, size=[10**6, 10**6], dtype="float32", chunks=1)])]),
    ]
    svc, _ = servicer(host)

    async def barrage() -> list[str]:
        return [(await forward(svc, Parts(p), peer=EVIL))["reason"] for _, p in cases]

    assert run(barrage()) == [reason for reason, _ in cases]
    assert svc.guard.banned_for(EVIL) == 0  # 14 strict rejections: under the default threshold of 20
    assert not host.accepted


# -- timeouts ----------------------------------------------------------------------------------------------


def test_a_stalled_stream_is_rejected_at_the_part_timeout() -> None:
    svc, host = servicer(part_timeout_s=0.05)
    stream = Parts(hop_parts(), stall_after=1)
    reply = run(forward(svc, stream))
    assert reply["reason"] == "timeout" and "stalled" in reply["detail"], reply
    assert stream.consumed == 1 and not host.accepted
    assert svc.hop_slots.in_use == 0


def test_a_sender_that_never_sends_the_first_part_times_out() -> None:
    svc, _ = servicer(part_timeout_s=0.05)
    reply = run(forward(svc, Parts(hop_parts(), stall_after=0), peer=EVIL))
    assert reply["reason"] == "timeout" and "stalled" in reply["detail"], reply


def test_stalls_never_ban_an_overloaded_sender() -> None:
    svc, _ = servicer(part_timeout_s=0.01, ban=BanPolicy(threshold=2, window_s=10, ban_s=100))

    async def scenario() -> list[str]:
        return [(await forward(svc, Parts(hop_parts(), stall_after=1)))["reason"] for _ in range(4)]

    assert run(scenario()) == ["timeout"] * 4
    assert bans(svc) == 0


def test_a_trickling_stream_is_rejected_at_its_deadline() -> None:
    svc, _ = servicer(part_timeout_s=5.0, hop_deadline_s=0.2)
    stream = Parts(hop_parts(chunk=512), gap_s=0.05)  # 32 parts, one every 50 ms: 1.6 s in all
    reply = run(forward(svc, stream))
    assert reply["reason"] == "timeout" and "deadline" in reply["detail"], reply
    assert stream.consumed < len(stream.parts)


# -- concurrency -------------------------------------------------------------------------------------------


def test_hops_over_the_concurrency_limit_are_rate_limited() -> None:
    svc, host = servicer(hop_slots=2, hop_slots_per_sender=2)

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], int, dict[str, Any]]:
        host.hold, host.all_entered, host.expect_entered = asyncio.Event(), asyncio.Event(), 2
        held = [asyncio.ensure_future(forward(svc, Parts(hop_parts(hop_meta(mb=i))))) for i in range(2)]
        await host.all_entered.wait()
        excess = Parts(hop_parts(hop_meta(mb=2)))
        over = await forward(svc, excess)
        host.hold.set()
        done = list(await asyncio.gather(*held))
        host.hold = None
        after = await forward(svc, Parts(hop_parts(hop_meta(mb=3))))
        return done, over, excess.consumed, after

    done, over, consumed, after = run(scenario())
    assert over["reason"] == "rate_limited" and consumed == 0
    assert done == [{"ok": True}] * 2 and after == {"ok": True}
    assert rejected(svc, "rate_limited") == 1 and svc.hop_slots.in_use == 0
    assert svc.guard.banned_for(STAGE0) == 0


def test_one_sender_cannot_take_every_hop_slot() -> None:
    svc, host = servicer(hop_slots=4, hop_slots_per_sender=1)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        host.hold, host.all_entered, host.expect_entered = asyncio.Event(), asyncio.Event(), 1
        first = asyncio.ensure_future(forward(svc, Parts(hop_parts())))
        await host.all_entered.wait()
        same = await forward(svc, Parts(hop_parts(hop_meta(mb=1))))
        host.expect_entered, host.all_entered = 2, asyncio.Event()
        other = asyncio.ensure_future(forward(svc, Parts(hop_parts(hop_meta(from_stage=2))), peer=STAGE2,
                                              method="backward"))
        await host.all_entered.wait()
        host.hold.set()
        await asyncio.gather(first, other)
        return same, other.result()

    same, other = run(scenario())
    assert same["reason"] == "rate_limited" and other == {"ok": True}


def test_replicas_over_the_concurrency_limit_are_rate_limited() -> None:
    svc, host = servicer(replica_slots=1)
    meta = {"run": RUN, "stage": 0, "step": 4, "generation": 0, "grad_norm": 1.0, "grad_norm_raw": 1.0,
            "config_hash": MODEL.config_hash(), "names": list(REPLICA_STATE)}
    parts = list(iter_message_parts(Request, meta, list(REPLICA_STATE.values()), 64))

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        stalled = Parts(parts, stall_after=2)
        first = asyncio.ensure_future(svc.rpc_replica(stalled, ctx(STAGE0)))
        await stalled.stalled.wait()  # the first stream is being read and holds the slot
        over = unpack_metadata((await svc.rpc_replica(Parts(parts), ctx(STAGE0))).metadata)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        again = unpack_metadata((await svc.rpc_replica(Parts(parts), ctx(STAGE0))).metadata)
        return over, again

    over, again = run(scenario())
    assert over["reason"] == "rate_limited" and again == {"ok": True}
    assert svc.replica_slots.in_use == 0 and len(host.replicas) == 1


# -- bans --------------------------------------------------------------------------------------------------


def test_repeated_malicious_rejections_ban_the_sender() -> None:
    svc, host = servicer(ban=BanPolicy(threshold=3, window_s=10, ban_s=100))

    async def scenario() -> list[dict[str, Any]]:
        replies = [await forward(svc, Parts(hop_parts(hop_meta(route=[2, 1]))), peer=STAGE0) for _ in range(3)]
        banned = Parts(hop_parts())
        replies.append(await forward(svc, banned))
        assert banned.consumed == 0
        commit = await svc.rpc_commit(Request(metadata=pack_metadata(
            {"run": RUN, "step": 1, "attempt": 1, "num_mb": 4, "generation": 0})), ctx(STAGE0))
        replies.append(unpack_metadata(commit.metadata))
        host.clock.now += 101
        replies.append(await forward(svc, Parts(hop_parts())))
        return replies

    replies = run(scenario())
    assert [r.get("reason") for r in replies] == ["route", "route", "route", "banned", "banned", None]
    assert replies[-1] == {"ok": True}
    assert bans(svc) == 1 and rejected(svc, "banned") == 1 and rejected(svc, "banned", "commit") == 1


def test_rejections_spread_beyond_the_window_do_not_ban() -> None:
    svc, host = servicer(ban=BanPolicy(threshold=3, window_s=10, ban_s=100))

    async def scenario() -> list[str]:
        reasons = []
        for _ in range(6):
            reasons.append((await forward(svc, Parts(hop_parts()), peer=EVIL))["reason"])
            host.clock.now += 6
        return reasons

    assert run(scenario()) == ["unauthorized"] * 6
    assert bans(svc) == 0


def test_honest_stale_step_bursts_never_ban() -> None:
    """After an aborted attempt a neighbour's hops come back stale_step in bursts of up to num_microbatches x
    stages; churn reasons are not counted at all."""
    svc, host = servicer()  # the default policy
    burst = CONFIG.train.num_microbatches * (MODEL.num_stages + 1)

    async def scenario() -> dict[str, Any]:
        for reason in ("stale_step", "not_ready", "generation", "behind"):
            host.hop_error = InvalidPayload(reason, "churn")
            for mb in range(burst):
                assert (await forward(svc, Parts(hop_parts(hop_meta(mb=mb % 4)))))["reason"] == reason
        host.hop_error = None
        return await forward(svc, Parts(hop_parts()))

    assert run(scenario()) == {"ok": True}
    assert bans(svc) == 0 and rejected(svc, "stale_step") == burst


def test_a_churn_burst_of_unauthorized_stays_under_the_default_threshold() -> None:
    svc, _ = servicer()
    burst = 2 * CONFIG.train.num_microbatches  # every hop of one attempt, both directions
    assert svc.limits.ban.threshold > burst

    async def scenario() -> list[str]:
        return [(await forward(svc, Parts(hop_parts()), peer=EVIL))["reason"] for _ in range(burst)]

    assert set(run(scenario())) == {"unauthorized"}
    assert bans(svc) == 0


def test_each_rejection_kind_is_logged_once_per_sender(caplog: pytest.LogCaptureFixture) -> None:
    svc, _ = servicer()

    async def scenario() -> None:
        for peer in (EVIL, SPARE):
            for _ in range(3):
                await forward(svc, Parts(hop_parts()), peer=peer)

    with caplog.at_level("WARNING", logger="cfnode.net.service"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected forward")]
    assert len(lines) == 2 and rejected(svc, "unauthorized") == 6


# -- replicas ----------------------------------------------------------------------------------------------


def replica_parts(**over: Any) -> list[Request]:
    meta = {"run": RUN, "stage": 0, "step": 4, "generation": 0, "grad_norm": 1.0, "grad_norm_raw": 1.0,
            "config_hash": MODEL.config_hash(), "names": list(REPLICA_STATE), **over}
    return list(iter_message_parts(Request, meta, list(REPLICA_STATE.values()), 64))


def test_a_replica_from_its_stage_owner_is_accepted() -> None:
    svc, host = servicer()
    reply = run(svc.rpc_replica(Parts(replica_parts()), ctx(STAGE0)))
    assert unpack_metadata(reply.metadata) == {"ok": True} and len(host.replicas) == 1


@pytest.mark.parametrize(("reason", "peer", "over"), [
    ("unauthorized", EVIL, {}),
    ("wrong_run", STAGE0, {"run": "other"}),
    ("decode", STAGE0, {"names": [1, 2]}),
    ("decode", STAGE0, {"grad_norm": "x"}),
])
def test_a_bad_replica_costs_one_part(reason: str, peer: str, over: dict[str, Any]) -> None:
    svc, host = servicer()
    stream = Parts(replica_parts(**over))
    reply = unpack_metadata(run(svc.rpc_replica(stream, ctx(peer))).metadata)
    assert reply["reason"] == reason and stream.consumed == 1 and not host.replicas


def test_replica_names_must_match_the_tensors() -> None:
    svc, host = servicer()
    reply = unpack_metadata(run(svc.rpc_replica(Parts(replica_parts(names=["a"])), ctx(STAGE0))).metadata)
    assert reply["reason"] == "decode" and not host.replicas


# -- byte caps from the stage's own sizes ------------------------------------------------------------------


def raw_hop(buffer_bytes: int, *, size: tuple[int, ...] = SHAPE, dtype: str = "float32") -> list[Request]:
    """A hop whose header declares `size` but whose stream carries `buffer_bytes` bytes, in 4 KiB parts."""
    parts = [runtime_pb2.Tensor(buffer=b"\0" * min(CHUNK, buffer_bytes), size=list(size), dtype=dtype)]
    left = buffer_bytes - len(parts[0].buffer)
    while left > 0:
        parts.append(runtime_pb2.Tensor(buffer=b"\0" * min(CHUNK, left)))
        left -= CHUNK
    return [Request(metadata=pack_metadata(hop_meta()), tensors=[parts[0]])] + [
        Request(tensors=[p]) for p in parts[1:]]


def test_a_hop_is_capped_at_its_exact_size() -> None:
    svc, _ = servicer(framing_slack_bytes=0)
    assert run(forward(svc, Parts(raw_hop(EXACT)))) == {"ok": True}
    over = Parts(raw_hop(EXACT + 1))
    reply = run(forward(svc, over))
    assert reply["reason"] == "too_large" and str(EXACT) in reply["detail"], reply
    assert over.consumed == len(over.parts)  # stopped at the part that crossed the cap


def test_a_hop_is_capped_at_its_exact_size_plus_the_framing_slack() -> None:
    svc, _ = servicer()
    slack = svc.limits.framing_slack_bytes
    assert slack < EXACT * 8
    reply = run(forward(svc, Parts(raw_hop(EXACT + slack))))
    assert reply["reason"] == "decode"  # under the cap: the stream is read, then it does not decode
    assert run(forward(svc, Parts(raw_hop(EXACT + slack + 1))))["reason"] == "too_large"


def test_a_declared_tensor_beyond_the_upper_bound_is_too_large() -> None:
    svc, host = servicer()
    huge = Parts(raw_hop(16, size=(host.max_message_bytes // 4 + 1,)))
    assert run(forward(svc, huge))["reason"] == "too_large"
    wrong = Parts(raw_hop(16, size=(SHAPE[0], SHAPE[1], SHAPE[2] + 1)))
    assert run(forward(svc, wrong))["reason"] == "shape"


def test_a_replica_is_capped_at_the_replicated_stages_size() -> None:
    svc, host = servicer(framing_slack_bytes=0)
    big = {"embed_tokens.weight": torch.ones(8, 4), "norm.weight": torch.ones(5)}  # one float too many
    meta = {"run": RUN, "stage": 0, "step": 4, "generation": 0, "grad_norm": 1.0, "grad_norm_raw": 1.0,
            "config_hash": MODEL.config_hash(), "names": list(big)}
    parts = list(iter_message_parts(Request, meta, list(big.values()), 64))
    reply = unpack_metadata(run(svc.rpc_replica(Parts(parts), ctx(STAGE0))).metadata)
    assert reply["reason"] == "too_large" and str(REPLICA_BYTES) in reply["detail"], reply
    assert not host.replicas


# -- get_weights -------------------------------------------------------------------------------------------


async def fetch(svc: StageServicer, peer: str, uid: str = "weights") -> dict[str, Any]:
    async def parts():
        async for part in svc.rpc_get_weights(runtime_pb2.ExpertUID(uid=uid), ctx(peer)):
            yield part

    meta, tensors = await read_message(parts(), max_bytes=1 << 20)
    return {**meta, "tensors": len(tensors)}


def test_get_weights_from_an_unauthorised_caller_is_refused_without_a_snapshot() -> None:
    svc, host = servicer()
    reply = run(fetch(svc, EVIL))
    assert reply["ok"] is False and reply["reason"] == "unauthorized"
    assert host.snapshots == 0 and rejected(svc, "unauthorized", "get_weights") == 1


def test_get_weights_serves_ring_members_and_spares() -> None:
    svc, host = servicer()

    async def scenario() -> list[dict[str, Any]]:
        return [await fetch(svc, peer) for peer in (STAGE0, SPARE)]

    for reply in run(scenario()):
        assert reply["ok"] is True and reply["names"] == ["w"] and reply["tensors"] == 1
    assert host.snapshots == 2 and svc.weights_slots.in_use == 0


def test_get_weights_is_rate_limited_per_caller() -> None:
    svc, host = servicer(weights_burst=2, weights_refill_s=100.0)

    async def scenario() -> list[Any]:
        out: list[Any] = [(await fetch(svc, STAGE0))["ok"] for _ in range(3)]
        out.append((await fetch(svc, SPARE))["ok"])  # another caller has its own bucket
        host.clock.now += 50  # one token back
        out += [(await fetch(svc, STAGE0))["ok"], (await fetch(svc, STAGE0)).get("reason")]
        return out

    assert run(scenario()) == [True, True, False, True, True, "rate_limited"]
    assert host.snapshots == 4 and rejected(svc, "rate_limited", "get_weights") == 2
    assert bans(svc) == 0


def test_get_weights_concurrency_is_limited_while_a_download_runs() -> None:
    svc, _ = servicer(weights_slots=1)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        first = svc.rpc_get_weights(runtime_pb2.ExpertUID(uid="weights"), ctx(STAGE0))
        await anext(first)  # the download has started and holds the slot
        over = await fetch(svc, STAGE2)
        await first.aclose()  # the caller went away
        return over, await fetch(svc, STAGE2)

    over, again = run(scenario())
    assert over["reason"] == "rate_limited" and again["ok"] is True
    assert svc.weights_slots.in_use == 0


def test_a_banned_caller_cannot_fetch_weights() -> None:
    svc, _ = servicer(ban=BanPolicy(threshold=2, window_s=10, ban_s=100))

    async def scenario() -> list[str]:
        return [(await fetch(svc, EVIL))["reason"] for _ in range(3)]

    assert run(scenario()) == ["unauthorized", "unauthorized", "banned"]
    assert bans(svc) == 1


# -- the pure limits (cfnode.net.guard) --------------------------------------------------------------------


def test_guard_bans_after_threshold_within_window_and_expires() -> None:
    now = [0.0]
    guard = RejectionGuard(BanPolicy(threshold=3, window_s=10, ban_s=60), lambda: now[0])
    assert not guard.record("p", "shape")
    now[0] = 5
    assert not guard.record("p", "decode")
    now[0] = 9.9
    assert guard.record("p", "unauthorized")  # 3 within 10 s
    assert guard.banned_for("p") == pytest.approx(60)
    assert guard.banned() == {"p": pytest.approx(60)}
    now[0] = 30
    assert not guard.record("p", "shape")  # no extension while banned
    assert guard.banned_for("p") == pytest.approx(39.9)
    now[0] = 70
    assert guard.banned_for("p") == 0 and guard.banned() == {}
    assert not guard.record("p", "shape") and not guard.record("p", "shape")  # a fresh window after the ban
    assert guard.record("p", "shape")


def test_guard_window_slides() -> None:
    now = [0.0]
    guard = RejectionGuard(BanPolicy(threshold=3, window_s=10, ban_s=60), lambda: now[0])
    for t in (0, 4, 10, 14, 20, 24):  # never 3 within any 10 s
        now[0] = t
        assert not guard.record("p", "route")
    now[0] = 25
    assert guard.record("p", "route")  # 20, 24, 25


def test_guard_counts_only_strict_reasons_and_each_sender_apart() -> None:
    guard = RejectionGuard(BanPolicy(threshold=2, window_s=10, ban_s=60), lambda: 0.0)
    for reason in ("stale_step", "not_ready", "generation", "wrong_stage", "behind", "nonfinite_grad",
                   "rate_limited", "banned", "timeout"):
        assert reason not in STRICT_REASONS
        for _ in range(10):
            assert not guard.record("honest", reason)
    assert guard.banned_for("honest") == 0
    assert STRICT_REASONS == {"decode", "too_large", "shape", "dtype", "nonfinite", "unauthorized", "route",
                              "wrong_run"}
    assert not guard.record("a", "decode") and not guard.record("b", "decode")
    assert guard.record("a", "decode") and guard.banned_for("b") == 0


def test_guard_memory_is_bounded() -> None:
    guard = RejectionGuard(BanPolicy(threshold=2, window_s=10, ban_s=60), lambda: 0.0, max_tracked=3)
    for i in range(10):
        guard.record(f"p{i}", "decode")
    assert len(guard._windows) == 3
    assert guard.record("p9", "decode")  # recent senders are still tracked


def test_slot_limiter() -> None:
    slots = SlotLimiter(3, per_sender=2)
    assert slots.try_acquire("a") and slots.try_acquire("a")
    assert not slots.try_acquire("a")  # per sender
    assert slots.try_acquire("b") and not slots.try_acquire("c")  # in all
    slots.release("a")
    assert slots.try_acquire("c") and slots.in_use == 3
    with pytest.raises(RuntimeError):
        slots.release("nobody")


def test_caller_buckets_refill() -> None:
    now = [0.0]
    buckets = CallerBuckets(2, refill_s=10.0, clock=lambda: now[0])
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")
    assert buckets.take("b")
    now[0] = 4.9
    assert not buckets.take("a")
    now[0] = 5.0
    assert buckets.take("a") and not buckets.take("a")
    now[0] = 1000
    assert buckets.tokens("a") == 2  # never above the capacity


def test_limits_from_config() -> None:
    limits = ServiceLimits.from_config(NodeConfig())
    assert (limits.hop_slots, limits.hop_slots_per_sender) == (20, 10)  # window = max(4 in flight, 4 val batches)
    assert (limits.replica_slots, limits.weights_slots) == (2, 2)
    assert limits.part_timeout_s == 10.0 and limits.hop_deadline_s == 40.0 == limits.replica_deadline_s
    assert limits.weights_refill_s == 8.0 and limits.weights_burst == 4
    assert (limits.ban.threshold, limits.ban.window_s, limits.ban.ban_s) == (20, 60.0, 300.0)
    big = ServiceLimits.from_config(NodeConfig(train=TrainConfig(num_microbatches=32, max_in_flight=8)))
    assert big.ban.threshold == 128 and big.hop_slots == 36


def test_assign_and_done_are_taken_only_by_stage_0s_group_from_its_members() -> None:
    svc, host = servicer()
    assign = {**hop_meta(), "path": ["me", "stage2"], "driver": STAGE0, "origin": "me"}
    done = {"run": RUN, "step": 5, "attempt": 1, "mb": 0, "inc": 0, "loss": 4.5, "generation": 0}

    def call(method: str, meta: dict[str, Any], peer: str) -> dict[str, Any]:
        rpc = svc.rpc_assign if method == "assign" else svc.rpc_done
        return unpack_metadata(run(rpc(Request(metadata=pack_metadata(meta)), ctx(peer))).metadata)

    assert call("assign", assign, STAGE0)["reason"] == "wrong_stage"  # this host serves stage 1
    host.serving_stage = lambda: 0  # type: ignore[method-assign]
    assert call("assign", assign, STAGE2)["reason"] == "unauthorized"  # not a member of stage 0's group
    assert call("done", {k: v for k, v in done.items() if k != "loss"}, STAGE0)["reason"] == "decode"
    assert call("done", {**done, "run": "other"}, STAGE0)["reason"] == "wrong_run"
    assert call("assign", assign, STAGE0)["ok"] and call("done", done, STAGE0)["ok"]
    assert [m for m, _ in host.accepted] == ["assign", "done"]
    assert rejected(svc, "unauthorized", "assign") == 1 and rejected(svc, "decode", "done") == 1
