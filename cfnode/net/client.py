"""StageClient: every outgoing call, each with a timeout; the one place hivemind/transport errors become
cfnode errors (`PeerUnavailableError` retryable, `RejectedError` typed refusal)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout

from cfnode.config import NetworkConfig
from cfnode.deadline import within
from cfnode.errors import InvalidPayload, PeerUnavailableError, RejectedError
from cfnode.metrics import NodeMetrics
from cfnode.net.codec import OFFLOAD_BYTES, iter_message_parts, pack_metadata, read_message, unpack_metadata
from cfnode.net.service import StageServicer

_TRANSPORT_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, EOFError,
                     asyncio.IncompleteReadError)


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _check_reply(meta: dict[str, Any]) -> dict[str, Any]:
    if not meta.get("ok", False):
        holds = meta.get("holds")
        valid = (isinstance(holds, list) and len(holds) == 2
                 and all(isinstance(h, int) and not isinstance(h, bool) for h in holds))
        raise RejectedError(str(meta.get("reason", "unknown")), str(meta.get("detail", "")),
                            holds=(holds[0], holds[1]) if valid else None)
    return meta


class StageClient:
    """`stub_for` replaces hivemind's stubs (the protocol harness passes in-memory ones); with it, p2p may be
    None."""

    def __init__(self, p2p: P2P | None, net: NetworkConfig, metrics: NodeMetrics, *,
                 stub_for: Callable[[str], Any] | None = None) -> None:
        self.p2p = p2p
        self.net = net
        self.metrics = metrics
        self._stub_for = stub_for

    def _stub(self, peer_id: str) -> Any:
        if self._stub_for is not None:
            return self._stub_for(peer_id)
        return StageServicer.get_stub(self.p2p, PeerID.from_base58(peer_id))

    async def _unary(self, method: str, peer_id: str, call: Any, timeout_s: float) -> Any:
        started = time.perf_counter()
        try:
            reply = await within(call, timeout_s)
        except (TimeoutError, asyncio.TimeoutError) as e:
            self.metrics.rpc_failures.labels(method=method).inc()
            raise PeerUnavailableError(f"{method} to {peer_id[:12]} timed out after {timeout_s:.1f}s") from e
        except (*_TRANSPORT_ERRORS, ValueError) as e:  # ValueError: hivemind's asingle() on a reply-less stream
            self.metrics.rpc_failures.labels(method=method).inc()
            raise PeerUnavailableError(f"{method} to {peer_id[:12]} failed: {type(e).__name__}: {e}") from e
        self.metrics.rpc_duration.labels(method=method, side="client").observe(time.perf_counter() - started)
        return reply

    async def push(self, method: str, peer_id: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        """rpc_forward / rpc_backward: stream one tensor, wait for the ack. A large tensor is serialized off the
        event loop (codec.OFFLOAD_BYTES), like the receiver decodes it."""
        def serialize() -> list[runtime_pb2.ExpertRequest]:
            return list(self.iter_parts(meta, [tensor], self.net.wire_dtype))

        big = tensor.numel() * tensor.element_size() >= OFFLOAD_BYTES
        parts = await asyncio.to_thread(serialize) if big else serialize()
        stub = self._stub(peer_id)
        rpc = stub.rpc_forward if method == "forward" else stub.rpc_backward
        timeout_s = self.net.request_timeout_s
        reply = await self._unary(method, peer_id, rpc(_aiter(parts), timeout=timeout_s), timeout_s)
        try:
            _check_reply(unpack_metadata(reply.metadata))
        except InvalidPayload as e:
            raise PeerUnavailableError(f"{method} to {peer_id[:12]}: unreadable reply") from e
        kind = "activations" if method == "forward" else "gradients"
        sent = sum(len(t.buffer) for part in parts for t in part.tensors)  # in the wire dtype
        self.metrics.transfer_bytes.labels(direction="sent", kind=kind).inc(sent)

    def iter_parts(self, meta: dict[str, Any], tensors: list[torch.Tensor],
                   wire_dtype: str = "float32") -> Iterator[runtime_pb2.ExpertRequest]:
        """A message's parts; its tensors exact (float32) unless a hop's `wire_dtype` says otherwise."""
        return iter_message_parts(runtime_pb2.ExpertRequest, meta, tensors, self.net.chunk_bytes, wire_dtype)

    async def push_raw(self, method: str, peer_id: str, parts: list[runtime_pb2.ExpertRequest]) -> dict[str, Any]:
        """Send pre-built parts (used by tests that craft malformed messages); returns the reply metadata."""
        stub = self._stub(peer_id)
        rpc = stub.rpc_forward if method == "forward" else stub.rpc_backward
        timeout_s = self.net.request_timeout_s
        reply = await self._unary(method, peer_id, rpc(_aiter(parts), timeout=timeout_s), timeout_s)
        return unpack_metadata(reply.metadata)

    async def commit(self, peer_id: str, meta: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
        stub = self._stub(peer_id)
        timeout_s = timeout_s or self.net.request_timeout_s
        req = runtime_pb2.ExpertRequest(metadata=pack_metadata(meta))
        reply = await self._unary("commit", peer_id, stub.rpc_commit(req, timeout=timeout_s), timeout_s)
        return _check_reply(unpack_metadata(reply.metadata))

    async def admit(self, peer_id: str, meta: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """rpc_admit (stage groups): ask stage 0 to let us into a stage's group; answered at a step boundary."""
        req = runtime_pb2.ExpertRequest(metadata=pack_metadata(meta))
        reply = await self._unary("admit", peer_id, self._stub(peer_id).rpc_admit(req, timeout=timeout_s), timeout_s)
        return _check_reply(unpack_metadata(reply.metadata))

    async def restore(self, peer_id: str, meta: dict[str, Any]) -> dict[str, Any]:
        """rpc_restore (checkpoint baseline): roll the peer's stage back to a checkpoint."""
        timeout_s = max(self.net.request_timeout_s, 60.0)  # loading weights + Adam state from the store
        req = runtime_pb2.ExpertRequest(metadata=pack_metadata(meta))
        reply = await self._unary("restore", peer_id, self._stub(peer_id).rpc_restore(req, timeout=timeout_s),
                                  timeout_s)
        return _check_reply(unpack_metadata(reply.metadata))

    async def abort(self, peer_id: str, meta: dict[str, Any]) -> None:
        stub = self._stub(peer_id)
        timeout_s = self.net.ping_timeout_s
        req = runtime_pb2.ExpertRequest(metadata=pack_metadata(meta))
        reply = await self._unary("abort", peer_id, stub.rpc_abort(req, timeout=timeout_s), timeout_s)
        _check_reply(unpack_metadata(reply.metadata))

    async def assign(self, peer_id: str, meta: dict[str, Any]) -> None:
        """rpc_assign: stage 0's lead hands a training microbatch (a hop's metadata) to a follower of its group."""
        await self._stage0_call("assign", peer_id, meta)

    async def done(self, peer_id: str, meta: dict[str, Any]) -> None:
        """rpc_done: a follower of stage 0's group reports a microbatch it was assigned done, with its loss."""
        await self._stage0_call("done", peer_id, meta)

    async def _stage0_call(self, method: str, peer_id: str, meta: dict[str, Any]) -> None:
        timeout_s = self.net.request_timeout_s
        req = runtime_pb2.ExpertRequest(metadata=pack_metadata(meta))
        call = getattr(self._stub(peer_id), f"rpc_{method}")(req, timeout=timeout_s)
        reply = await self._unary(method, peer_id, call, timeout_s)
        _check_reply(unpack_metadata(reply.metadata))

    async def info(self, peer_id: str) -> dict[str, Any]:
        """Ping: the peer's {stage, step, state, generation, grad norms, ...} within ping_timeout_s."""
        stub = self._stub(peer_id)
        timeout_s = self.net.ping_timeout_s
        req = runtime_pb2.ExpertUID(uid="info")
        reply = await self._unary("info", peer_id, stub.rpc_info(req, timeout=timeout_s), timeout_s)
        try:
            return unpack_metadata(reply.serialized_info)
        except InvalidPayload as e:
            raise PeerUnavailableError(f"info from {peer_id[:12]}: unreadable reply") from e

    async def push_replica(self, peer_id: str, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """rpc_replica: stream stage 0's weights to a replica holder (stage 1 or L), wait for the ack."""
        names = list(state)
        parts = list(self.iter_parts({**meta, "names": names}, [state[n] for n in names]))
        size = sum(t.numel() * t.element_size() for t in state.values())
        timeout_s = self.net.request_timeout_s + size / (10 * 2**20)  # allow 10 MiB/s on top of the request timeout
        reply = await self._unary("replica", peer_id, self._stub(peer_id).rpc_replica(_aiter(parts), timeout=timeout_s),
                                  timeout_s)
        try:
            _check_reply(unpack_metadata(reply.metadata))
        except InvalidPayload as e:
            raise PeerUnavailableError(f"replica to {peer_id[:12]}: unreadable reply") from e
        self.metrics.transfer_bytes.labels(direction="sent", kind="replica").inc(
            sum(t.numel() * t.element_size() for t in state.values()))

    async def get_weights(self, peer_id: str, *, max_bytes: int, timeout_s: float, replica: bool = False,
                          state: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Fetch a stage's weights (with `replica`, the stage-0 replica it holds; with `state`, its weights, Adam
        state and step, for an exact copy) as a stream; each part must arrive within the request timeout."""
        stub = self._stub(peer_id)
        started = time.perf_counter()
        uid = "replica" if replica else "state" if state else "weights"
        try:
            stream = await within(stub.rpc_get_weights(runtime_pb2.ExpertUID(uid=uid)), self.net.request_timeout_s)
            meta, tensors = await within(
                read_message(aiter_with_timeout(stream, self.net.request_timeout_s), max_bytes=max_bytes),
                timeout_s,
            )
        except (TimeoutError, asyncio.TimeoutError) as e:
            self.metrics.rpc_failures.labels(method="get_weights").inc()
            raise PeerUnavailableError(f"get_weights from {peer_id[:12]} timed out") from e
        except _TRANSPORT_ERRORS as e:
            self.metrics.rpc_failures.labels(method="get_weights").inc()
            raise PeerUnavailableError(f"get_weights from {peer_id[:12]} failed: {e}") from e
        except InvalidPayload as e:
            raise RejectedError(e.reason, e.detail) from e
        _check_reply(meta)
        names = meta.get("names")
        if not isinstance(names, list) or len(names) != len(tensors):
            raise RejectedError("decode", "weight names do not match the tensors sent")
        self.metrics.rpc_duration.labels(method="get_weights", side="client").observe(time.perf_counter() - started)
        self.metrics.transfer_bytes.labels(direction="received", kind="weights").inc(
            sum(t.numel() * t.element_size() for t in tensors))
        return meta, dict(zip(names, tensors, strict=True))
