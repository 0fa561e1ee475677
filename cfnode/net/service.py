"""StageServicer: the RPC surface of a node (rpc_forward, rpc_backward, rpc_get_weights, rpc_info, rpc_commit,
rpc_abort, rpc_replica). Handlers decode, validate and hand over to the node; they never run torch math on the
loop.

Validation order (docs/protocol.md): byte cap while streaming -> decode -> metadata fields -> run / target
stage -> tensor shape, dtype, finiteness -> route -> sender is the ONLINE owner of the expected neighbour with the
generation it claims -> step/attempt freshness. Every rejection is typed, counted in
`cfnode_rpc_rejected_total{method,reason}`, logged once per (method, reason, sender) and answered with
`{ok: false, reason, detail}`; the node keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, Protocol

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from cfnode.errors import InvalidPayload
from cfnode.metrics import NodeMetrics
from cfnode.net.codec import (
    iter_message_parts,
    pack_metadata,
    read_message,
    require_fields,
    unpack_metadata,
    validate_tensor,
)

logger = logging.getLogger(__name__)

HOP_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "step": int, "attempt": int, "mb": int, "num_mb": int, "generation": int,
    "from_stage": int, "to_stage": int, "kind": str, "route": list,
}
REPLICA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "stage": int, "step": int, "generation": int, "names": list, "grad_norm": (int, float),
    "grad_norm_raw": (int, float), "config_hash": str,
}


class StageHost(Protocol):
    """What the servicer needs from the node."""

    run_id: str
    metrics: NodeMetrics
    max_message_bytes: int
    max_replica_bytes: int
    chunk_bytes: int

    def serving_stage(self) -> int | None: ...
    def hidden_shape(self) -> tuple[int, ...]: ...
    def check_route(self, meta: dict[str, Any]) -> None: ...
    def expected_sender(self, method: str, meta: dict[str, Any]) -> int: ...
    async def check_sender(self, peer_id: str, stage_idx: int, generation: int) -> None: ...
    async def accept_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None: ...
    async def accept_commit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]: ...
    async def accept_abort(self, meta: dict[str, Any], peer_id: str) -> None: ...
    async def accept_replica(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None: ...
    async def accept_restore(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]: ...
    async def weights_snapshot(self, replica: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...
    def info(self) -> dict[str, Any]: ...


def _ok(**fields: Any) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=pack_metadata({"ok": True, **fields}))


def _rejected(err: InvalidPayload) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        metadata=pack_metadata({"ok": False, "reason": err.reason, "detail": err.detail[:500]})
    )


class StageServicer(ServicerBase):
    def __init__(self, host: StageHost) -> None:
        self.host = host
        self._logged: set[tuple[str, str, str]] = set()

    def _reject(self, method: str, err: InvalidPayload, peer_id: str) -> runtime_pb2.ExpertResponse:
        m = self.host.metrics
        m.rpc_rejected.labels(method=method, reason=err.reason).inc()
        m.rpc_requests.labels(method=method, result="rejected").inc()
        if (method, err.reason, peer_id) not in self._logged:
            self._logged.add((method, err.reason, peer_id))
            logger.warning("rejected %s from %s: %s (further rejections of this kind are only counted)",
                           method, peer_id[:12], err)
        return _rejected(err)

    async def _hop(self, method: str, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                   context: P2PContext) -> runtime_pb2.ExpertResponse:
        started = time.perf_counter()
        peer_id = context.remote_id.to_base58()
        host = self.host
        try:
            stage = host.serving_stage()
            meta, tensors = await read_message(requests, max_bytes=host.max_message_bytes)
            require_fields(meta, HOP_FIELDS)
            if meta["run"] != host.run_id:
                raise InvalidPayload("wrong_run", f"message for run {meta['run']!r}, this is {host.run_id!r}")
            if stage is None:
                raise InvalidPayload("not_ready", "this node serves no stage")
            if meta["to_stage"] != stage:
                raise InvalidPayload("wrong_stage", f"message for stage {meta['to_stage']}, this is stage {stage}")
            if meta["kind"] not in ("train", "val"):
                raise InvalidPayload("decode", f"unknown kind {meta['kind']!r}")
            if len(tensors) != 1:
                raise InvalidPayload("decode", f"expected 1 tensor, got {len(tensors)}")
            validate_tensor(tensors[0], shape=host.hidden_shape(), dtype=torch.float32, name=method)
            host.check_route(meta)
            expected = host.expected_sender(method, meta)
            if meta["from_stage"] != expected:
                raise InvalidPayload("unauthorized", f"{method} must come from stage {expected}")
            await host.check_sender(peer_id, expected, meta["generation"])
            await host.accept_hop(method, meta, tensors[0])
        except InvalidPayload as e:
            return self._reject(method, e, peer_id)
        host.metrics.rpc_requests.labels(method=method, result="ok").inc()
        host.metrics.transfer_bytes.labels(direction="received",
                                           kind="activations" if method == "forward" else "gradients"
                                           ).inc(tensors[0].numel() * tensors[0].element_size())
        host.metrics.rpc_duration.labels(method=method, side="server").observe(time.perf_counter() - started)
        return _ok()

    async def rpc_forward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._hop("forward", requests, context)

    async def rpc_backward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                           context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._hop("backward", requests, context)

    async def rpc_commit(self, request: runtime_pb2.ExpertRequest,
                         context: P2PContext) -> runtime_pb2.ExpertResponse:
        peer_id = context.remote_id.to_base58()
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

    async def rpc_abort(self, request: runtime_pb2.ExpertRequest,
                        context: P2PContext) -> runtime_pb2.ExpertResponse:
        peer_id = context.remote_id.to_base58()
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

    async def rpc_replica(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A stage pushes its weights after each commit to the stages that keep a copy of it (checkfree+: stage
        0 to stages 1 and L; redundant: every stage to its predecessor), to rebuild it from."""
        peer_id = context.remote_id.to_base58()
        host = self.host
        try:
            meta, tensors = await read_message(requests, max_bytes=host.max_replica_bytes)
            require_fields(meta, REPLICA_FIELDS)
            if meta["run"] != host.run_id:
                raise InvalidPayload("wrong_run", f"replica for run {meta['run']!r}")
            if host.serving_stage() is None:
                raise InvalidPayload("not_ready", "this node serves no stage")
            if len(meta["names"]) != len(tensors) or not all(isinstance(n, str) for n in meta["names"]):
                raise InvalidPayload("decode", "replica names do not match the tensors sent")
            await host.check_sender(peer_id, meta["stage"], meta["generation"])
            await host.accept_replica(meta, dict(zip(meta["names"], tensors, strict=True)))
        except InvalidPayload as e:
            return self._reject("replica", e, peer_id)
        host.metrics.rpc_requests.labels(method="replica", result="ok").inc()
        host.metrics.transfer_bytes.labels(direction="received", kind="replica").inc(
            sum(t.numel() * t.element_size() for t in tensors))
        return _ok()

    async def rpc_restore(self, request: runtime_pb2.ExpertRequest,
                          context: P2PContext) -> runtime_pb2.ExpertResponse:
        """`checkpoint` baseline: stage 0 makes every stage roll back to the checkpoint of `to_step`."""
        peer_id = context.remote_id.to_base58()
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
        """Stream this stage's weights (uid "weights") or its stage-0 replica (uid "replica"): first part
        {ok, names, stage, step, generation, grad norms, hash}."""
        if self.host.serving_stage() is None:
            err = InvalidPayload("not_ready", "this node serves no stage")
            yield self._reject("get_weights", err, context.remote_id.to_base58())
            return
        try:
            meta, state = await self.host.weights_snapshot(replica=request.uid == "replica")
        except InvalidPayload as e:
            yield self._reject("get_weights", e, context.remote_id.to_base58())
            return
        names = list(state)
        meta = {"ok": True, "names": names, **meta}
        total = 0
        for part in iter_message_parts(runtime_pb2.ExpertResponse, meta, (state[n] for n in names),
                                       self.host.chunk_bytes):
            total += sum(len(t.buffer) for t in part.tensors)
            yield part
        self.host.metrics.rpc_requests.labels(method="get_weights", result="ok").inc()
        self.host.metrics.transfer_bytes.labels(direction="sent", kind="weights").inc(total)
