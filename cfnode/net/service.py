"""StageServicer: the RPC surface of a node (rpc_forward, rpc_backward, rpc_get_weights, rpc_info, rpc_commit,
rpc_abort, rpc_assign, rpc_done, rpc_replica, rpc_restore, rpc_admit). Handlers decode, validate and hand over to the node; they never run torch
math on the loop.

Admission first: a banned sender is refused `banned` before any part is read; a method over its concurrency
limit is refused `rate_limited`. Streams are read under a per-part timeout and a deadline, with byte caps from
the stage's own sizes, and checked as early as possible (docs/protocol.md, "Validation order"): everything the
first part carries, then the sender, before the rest is read, so a malformed, stalling or unauthorised sender
costs one part. Every rejection is typed, counted in `cfnode_rpc_rejected_total{method,reason}`, logged once
per (method, reason, sender), fed to the ban guard (net/guard.py) and answered with `{ok: false, reason,
detail}`; the node keeps serving.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, AsyncIterator, Protocol

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from cfnode.clock import Clock
from cfnode.config import NodeConfig
from cfnode.errors import InvalidPayload
from cfnode.metrics import NodeMetrics
from cfnode.net import wire
from cfnode.net.codec import (
    declared_bytes,
    iter_message_parts,
    pack_metadata,
    read_message,
    require_fields,
    unpack_metadata,
    validate_header,
    validate_tensor,
)
from cfnode.net.guard import CallerBuckets, RejectionGuard, ServiceLimits, SlotLimiter

logger = logging.getLogger(__name__)

HOP_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "step": int, "attempt": int, "mb": int, "num_mb": int, "generation": int,
    "from_stage": int, "to_stage": int, "kind": str, "route": list,
}
DONE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "step": int, "attempt": int, "mb": int, "inc": int, "loss": (int, float), "generation": int,
}
REPLICA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "stage": int, "step": int, "generation": int, "names": list, "grad_norm": (int, float),
    "grad_norm_raw": (int, float), "config_hash": str,
}


class StageHost(Protocol):
    """What the servicer needs from the node."""

    run_id: str
    config: NodeConfig
    clock: Clock
    metrics: NodeMetrics
    max_message_bytes: int
    """Upper bound of a hop stream (`--max-message-bytes`); a hop is also capped at its tensor's exact size."""
    max_replica_bytes: int
    """Upper bound of a replica stream (the largest stage, plus framing)."""
    chunk_bytes: int

    def serving_stage(self) -> int | None: ...
    def hidden_shape(self) -> tuple[int, ...]: ...
    def check_route(self, meta: dict[str, Any]) -> None: ...
    def expected_sender(self, method: str, meta: dict[str, Any]) -> int: ...
    async def check_sender(self, peer_id: str, stage_idx: int, generation: int) -> None: ...
    async def accept_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None: ...
    async def accept_commit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]: ...
    async def accept_abort(self, meta: dict[str, Any], peer_id: str) -> None: ...
    async def accept_assign(self, meta: dict[str, Any], peer_id: str) -> None: ...
    async def accept_done(self, meta: dict[str, Any], peer_id: str) -> None: ...
    async def accept_replica(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None: ...
    async def accept_restore(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]: ...
    async def weights_snapshot(self, replica: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...
    async def member_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...
    def check_path(self, method: str, meta: dict[str, Any], peer_id: str) -> None: ...
    async def accept_admit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]: ...
    def info(self) -> dict[str, Any]: ...

    def replica_bytes(self, of_stage: int) -> int:
        """float32 bytes of stage `of_stage`'s whole state dict (what a replica push of it carries, framing
        excluded); called only for a stage whose ONLINE owner sent the push (so 0 <= of_stage <= L)."""
        ...

    async def may_fetch_weights(self, peer_id: str, uid: str) -> bool:
        """Whether `peer_id` may fetch this stage's weights (uid "weights") or the replica it holds ("replica"):
        ring members (any live stage record in the view) and live spares, re-reading the view (rate-limited)
        for a peer not seen yet; False for anybody else. Never raises."""
        ...


def _ok(**fields: Any) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=pack_metadata({"ok": True, **fields}))


def _rejected(err: InvalidPayload) -> runtime_pb2.ExpertResponse:
    reply: dict[str, Any] = {"ok": False, "reason": err.reason, "detail": err.detail[:500]}
    if err.holds is not None:
        reply["holds"] = [int(err.holds[0]), int(err.holds[1])]
    return runtime_pb2.ExpertResponse(metadata=pack_metadata(reply))


LOGGED_LIMIT = 10_000
"""(method, reason, sender) triples remembered for log-once; the oldest is forgotten first."""


class StageServicer(ServicerBase):
    """`limits` default to `ServiceLimits.from_config(host.config)`, `clock` (monotonic seconds, for bans and
    rate limits) to `host.clock.monotonic`."""

    def __init__(self, host: StageHost, *, limits: ServiceLimits | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.host = host
        self.limits = limits = limits or ServiceLimits.from_config(host.config)
        clock = clock or host.clock.monotonic
        self.guard = RejectionGuard(limits.ban, clock)
        self.hop_slots = SlotLimiter(limits.hop_slots, limits.hop_slots_per_sender)
        self.replica_slots = SlotLimiter(limits.replica_slots)
        self.weights_slots = SlotLimiter(limits.weights_slots)
        self.weights_buckets = CallerBuckets(limits.weights_burst, limits.weights_refill_s, clock)
        self._logged: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    def _reject(self, method: str, err: InvalidPayload, peer_id: str) -> runtime_pb2.ExpertResponse:
        m = self.host.metrics
        m.rpc_rejected.labels(method=method, reason=err.reason).inc()
        m.rpc_requests.labels(method=method, result="rejected").inc()
        if (method, err.reason, peer_id) not in self._logged:
            self._logged[(method, err.reason, peer_id)] = None
            while len(self._logged) > LOGGED_LIMIT:
                self._logged.popitem(last=False)
            logger.warning("rejected %s from %s: %s (further rejections of this kind are only counted)",
                           method, peer_id[:12], err)
        if self.guard.record(peer_id, err.reason):
            m.peer_bans.labels(reason="rejections").inc()
            ban = self.guard.policy
            logger.warning("banned %s for %.0f s: %d rejections within %.0f s (the last: %s %s)", peer_id[:12],
                           ban.ban_s, ban.threshold, ban.window_s, method, err.reason)
        return _rejected(err)

    def _admit(self, method: str, peer_id: str, slots: SlotLimiter | None) -> InvalidPayload | None:
        """Refuse a banned sender, or one over the method's concurrency limit (else a slot is now held)."""
        left = self.guard.banned_for(peer_id)
        if left > 0:
            return InvalidPayload("banned", f"banned for another {left:.0f} s after repeated rejections")
        if slots is not None and not slots.try_acquire(peer_id):
            per_sender = "" if slots.per_sender is None else f", {slots.per_sender} per sender"
            return InvalidPayload("rate_limited", f"too many concurrent {method} streams "
                                                  f"({slots.total} in all{per_sender})")
        return None

    def _refuse_banned(self, method: str, peer_id: str) -> runtime_pb2.ExpertResponse | None:
        err = self._admit(method, peer_id, None)
        return None if err is None else self._reject(method, err, peer_id)

    async def _hop(self, method: str, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                   context: P2PContext) -> runtime_pb2.ExpertResponse:
        started = time.perf_counter()
        peer_id = context.remote_id.to_base58()
        host = self.host
        refused = self._admit(method, peer_id, self.hop_slots)
        if refused is not None:
            return self._reject(method, refused, peer_id)
        stats: dict[str, int] = {}
        try:
            meta, tensor = await self._read_hop(method, requests, peer_id, stats)
            await host.accept_hop(method, meta, tensor)
        except InvalidPayload as e:
            return self._reject(method, e, peer_id)
        finally:
            self.hop_slots.release(peer_id)
        host.metrics.rpc_requests.labels(method=method, result="ok").inc()
        host.metrics.transfer_bytes.labels(direction="received",
                                           kind="activations" if method == "forward" else "gradients"
                                           ).inc(stats.get("bytes", 0))
        host.metrics.rpc_duration.labels(method=method, side="server").observe(time.perf_counter() - started)
        return _ok()

    async def _read_hop(self, method: str, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        peer_id: str, stats: dict[str, int]) -> tuple[dict[str, Any], torch.Tensor]:
        """Read and validate a hop in the documented order; the sender is checked once the first part is in. The
        tensor arrives in the run's wire dtype (net/wire.py) and is handed on as float32."""
        host = self.host
        shape = host.hidden_shape()
        wire_dtype = host.config.network.wire_dtype
        header_dtype, compression = wire.header(wire_dtype)
        cap = min(host.max_message_bytes, 4 * math.prod(shape) + self.limits.framing_slack_bytes)

        async def on_meta(meta: dict[str, Any]) -> None:
            require_fields(meta, HOP_FIELDS)
            if meta["run"] != host.run_id:
                raise InvalidPayload("wrong_run", f"message for run {meta['run']!r}, this is {host.run_id!r}")
            stage = host.serving_stage()
            if stage is None:
                raise InvalidPayload("not_ready", "this node serves no stage")
            if meta["to_stage"] != stage:
                raise InvalidPayload("wrong_stage", f"message for stage {meta['to_stage']}, this is stage {stage}")
            if meta["kind"] not in ("train", "val"):
                raise InvalidPayload("decode", f"unknown kind {meta['kind']!r:.40}")

        def on_header(index: int, part: runtime_pb2.Tensor) -> None:
            if index > 0:
                raise InvalidPayload("decode", "expected 1 tensor, got more")
            if declared_bytes(part) > host.max_message_bytes:
                raise InvalidPayload("too_large", f"declared tensor {list(part.size)[:8]} {part.dtype[:40]} "
                                                  f"exceeds {host.max_message_bytes} bytes")
            validate_header(part, shape=shape, dtype=header_dtype, name=method, compression=compression)

        def check(tensor: torch.Tensor) -> torch.Tensor:  # with the decoding, off the loop (codec.read_message)
            tensor = wire.to_float32(tensor, wire_dtype)
            validate_tensor(tensor, shape=shape, dtype=torch.float32, name=method)
            return tensor

        async def on_first_part(meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
            host.check_route(meta)
            expected = host.expected_sender(method, meta)
            if meta["from_stage"] != expected:
                raise InvalidPayload("unauthorized", f"{method} must come from stage {expected}")
            await host.check_sender(peer_id, expected, meta["generation"])
            host.check_path(method, meta, peer_id)

        meta, tensors = await read_message(
            requests, max_bytes=cap, on_meta=on_meta, on_header=on_header, on_first_part=on_first_part,
            part_timeout_s=self.limits.part_timeout_s, deadline_s=self.limits.hop_deadline_s, stats=stats,
            check=check)
        if len(tensors) != 1:
            raise InvalidPayload("decode", f"expected 1 tensor, got {len(tensors)}")
        return meta, tensors[0]

    async def rpc_forward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._hop("forward", requests, context)

    async def rpc_backward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                           context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._hop("backward", requests, context)

    async def rpc_commit(self, request: runtime_pb2.ExpertRequest,
                         context: P2PContext) -> runtime_pb2.ExpertResponse:
        peer_id = context.remote_id.to_base58()
        if (refused := self._refuse_banned("commit", peer_id)) is not None:
            return refused
        try:
            meta = unpack_metadata(request.metadata)
            require_fields(meta, {"run": str, "step": int, "attempt": int, "num_mb": int, "generation": int})
            if meta["run"] != self.host.run_id:
                raise InvalidPayload("wrong_run", f"commit for run {meta['run']!r}")
            await self.host.check_sender(peer_id, 0, meta["generation"])
            result = await self.host.accept_commit(meta, peer_id)
        except InvalidPayload as e:
            return self._reject("commit", e, peer_id)
        self.host.metrics.rpc_requests.labels(method="commit", result="ok").inc()
        return _ok(**result)

    async def rpc_admit(self, request: runtime_pb2.ExpertRequest,
                        context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Stage groups: a newcomer asks stage 0 to be let into a stage's group; the reply (at the next step
        boundary, while the ring waits for it) names the step and the member to copy."""
        peer_id = context.remote_id.to_base58()
        if (refused := self._refuse_banned("admit", peer_id)) is not None:
            return refused
        try:
            meta = unpack_metadata(request.metadata)
            require_fields(meta, {"run": str, "stage": int, "generation": int})
            if meta["run"] != self.host.run_id:
                raise InvalidPayload("wrong_run", f"admit for run {meta['run']!r}")
            result = await self.host.accept_admit(meta, peer_id)
        except InvalidPayload as e:
            return self._reject("admit", e, peer_id)
        self.host.metrics.rpc_requests.labels(method="admit", result="ok").inc()
        return _ok(**result)

    async def rpc_abort(self, request: runtime_pb2.ExpertRequest,
                        context: P2PContext) -> runtime_pb2.ExpertResponse:
        peer_id = context.remote_id.to_base58()
        if (refused := self._refuse_banned("abort", peer_id)) is not None:
            return refused
        try:
            meta = unpack_metadata(request.metadata)
            require_fields(meta, {"run": str, "step": int, "attempt": int, "reason": str, "from_stage": int,
                                  "generation": int})
            if meta["run"] != self.host.run_id:
                raise InvalidPayload("wrong_run", f"abort for run {meta['run']!r}")
            await self.host.check_sender(peer_id, meta["from_stage"], meta["generation"])
            await self.host.accept_abort(meta, peer_id)
        except InvalidPayload as e:
            return self._reject("abort", e, peer_id)
        self.host.metrics.rpc_requests.labels(method="abort", result="ok").inc()
        return _ok()

    async def rpc_assign(self, request: runtime_pb2.ExpertRequest,
                         context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Stage 0's lead hands a training microbatch to a follower of its group (docs/groups.md): the follower
        embeds it, sends it along the path the hop names, computes the head and the loss, and reports it done."""
        return await self._stage0_call("assign", request, context, HOP_FIELDS)

    async def rpc_done(self, request: runtime_pb2.ExpertRequest,
                       context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A follower of stage 0's group tells the lead that a microbatch it was assigned is done, with its loss."""
        return await self._stage0_call("done", request, context, DONE_FIELDS)

    async def _stage0_call(self, method: str, request: runtime_pb2.ExpertRequest, context: P2PContext,
                           fields: dict[str, type | tuple[type, ...]]) -> runtime_pb2.ExpertResponse:
        """rpc_assign / rpc_done: between members of stage 0's group, each checked as an ONLINE member of it."""
        peer_id = context.remote_id.to_base58()
        if (refused := self._refuse_banned(method, peer_id)) is not None:
            return refused
        try:
            meta = unpack_metadata(request.metadata)
            require_fields(meta, fields)
            if meta["run"] != self.host.run_id:
                raise InvalidPayload("wrong_run", f"{method} for run {meta['run']!r}")
            if self.host.serving_stage() != 0:
                raise InvalidPayload("wrong_stage", f"{method} goes to a member of stage 0's group")
            await self.host.check_sender(peer_id, 0, meta["generation"])
            handler = self.host.accept_assign if method == "assign" else self.host.accept_done
            await handler(meta, peer_id)
        except InvalidPayload as e:
            return self._reject(method, e, peer_id)
        self.host.metrics.rpc_requests.labels(method=method, result="ok").inc()
        return _ok()

    async def rpc_replica(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A stage pushes its weights after each commit to the stages that keep a copy of it (checkfree+: stage
        0 to stages 1 and L in turn; redundant: every stage to its predecessor), to rebuild it from."""
        peer_id = context.remote_id.to_base58()
        host, limits = self.host, self.limits
        refused = self._admit("replica", peer_id, self.replica_slots)
        if refused is not None:
            return self._reject("replica", refused, peer_id)

        async def on_meta(meta: dict[str, Any]) -> int:
            require_fields(meta, REPLICA_FIELDS)
            if meta["run"] != host.run_id:
                raise InvalidPayload("wrong_run", f"replica for run {meta['run']!r}")
            if host.serving_stage() is None:
                raise InvalidPayload("not_ready", "this node serves no stage")
            if not all(isinstance(n, str) for n in meta["names"]):
                raise InvalidPayload("decode", "replica names do not match the tensors sent")
            await host.check_sender(peer_id, meta["stage"], meta["generation"])
            return host.replica_bytes(meta["stage"]) + limits.framing_slack_bytes

        try:
            meta, tensors = await read_message(
                requests, max_bytes=host.max_replica_bytes, on_meta=on_meta, part_timeout_s=limits.part_timeout_s,
                deadline_s=limits.replica_deadline_s + host.max_replica_bytes / limits.replica_rate_bytes_s)
            if len(meta["names"]) != len(tensors):
                raise InvalidPayload("decode", "replica names do not match the tensors sent")
            await host.accept_replica(meta, dict(zip(meta["names"], tensors, strict=True)))
        except InvalidPayload as e:
            return self._reject("replica", e, peer_id)
        finally:
            self.replica_slots.release(peer_id)
        host.metrics.rpc_requests.labels(method="replica", result="ok").inc()
        host.metrics.transfer_bytes.labels(direction="received", kind="replica").inc(
            sum(t.numel() * t.element_size() for t in tensors))
        return _ok()

    async def rpc_restore(self, request: runtime_pb2.ExpertRequest,
                          context: P2PContext) -> runtime_pb2.ExpertResponse:
        """`checkpoint` baseline: stage 0 makes every stage roll back to the checkpoint of `to_step`."""
        peer_id = context.remote_id.to_base58()
        if (refused := self._refuse_banned("restore", peer_id)) is not None:
            return refused
        try:
            meta = unpack_metadata(request.metadata)
            require_fields(meta, {"run": str, "to_step": int, "generation": int, "attempt_floor": int})
            if meta["run"] != self.host.run_id:
                raise InvalidPayload("wrong_run", f"restore for run {meta['run']!r}")
            await self.host.check_sender(peer_id, 0, meta["generation"])
            result = await self.host.accept_restore(meta, peer_id)
        except InvalidPayload as e:
            return self._reject("restore", e, peer_id)
        self.host.metrics.rpc_requests.labels(method="restore", result="ok").inc()
        return _ok(**result)

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self.host.metrics.rpc_requests.labels(method="info", result="ok").inc()
        return runtime_pb2.ExpertInfo(serialized_info=pack_metadata(self.host.info()))

    async def rpc_get_weights(self, request: runtime_pb2.ExpertUID,
                              context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stream this stage's weights (uid "weights"), its stage-0 replica (uid "replica") or, for a newcomer of
        its group, its weights with Adam state and step (uid "state"): first part
        {ok, names, stage, step, generation, grad norms, hash}. Only for callers the host authorises (ring
        members and spares), at most `weights_burst` per caller per `weights_refill_s` and `weights_slots` at
        once: the snapshot clones the whole stage on the compute thread."""
        peer_id = context.remote_id.to_base58()
        host = self.host
        refused = self._admit("get_weights", peer_id, None)
        if refused is None and host.serving_stage() is None:
            refused = InvalidPayload("not_ready", "this node serves no stage")
        if refused is None and not await host.may_fetch_weights(peer_id, request.uid):
            refused = InvalidPayload("unauthorized", "only ring members and spares may fetch weights")
        if refused is None and not self.weights_slots.try_acquire(peer_id):
            refused = InvalidPayload("rate_limited", f"{self.weights_slots.total} weight downloads already run")
        elif refused is None and not self.weights_buckets.take(peer_id):
            self.weights_slots.release(peer_id)
            refused = InvalidPayload("rate_limited", f"more than {self.limits.weights_burst} weight downloads "
                                                     f"per {self.limits.weights_refill_s:g} s")
        if refused is not None:
            yield self._reject("get_weights", refused, peer_id)
            return
        try:
            try:
                if request.uid == "state":
                    meta, state = await host.member_state()
                else:
                    meta, state = await host.weights_snapshot(replica=request.uid == "replica")
            except InvalidPayload as e:
                yield self._reject("get_weights", e, peer_id)
                return
            names = list(state)
            meta = {"ok": True, "names": names, **meta}
            total = 0
            for part in iter_message_parts(runtime_pb2.ExpertResponse, meta, (state[n] for n in names),
                                           host.chunk_bytes):
                total += sum(len(t.buffer) for t in part.tensors)
                yield part
        finally:
            self.weights_slots.release(peer_id)
        host.metrics.rpc_requests.labels(method="get_weights", result="ok").inc()
        host.metrics.transfer_bytes.labels(direction="sent", kind="weights").inc(total)
