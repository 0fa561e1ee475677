"""An in-memory transport: every node's real `StageServicer` registered by peer id, and stubs with the call
shapes of hivemind's (`await stub.rpc_forward(parts, timeout=...)`, `await stub.rpc_get_weights(uid)` -> async
iterator), so the real `StageClient` runs over it.

A call runs the target's handler in a task of the target's own (context, so its clock and name) and the caller
waits for it; a caller's timeout abandons the wait, never the handler. Transport failures are ConnectionError
(`StageClient` maps them to PeerUnavailableError), as hivemind's P2PHandlerError is for a crashed handler.

Faults (faults.py): a request dropped (refused at once, or black-holed until the caller's timeout), delayed,
duplicated, held back behind the next one on its link (reordered), its reply lost after the handler ran, a
streamed reply cut short; a dead peer fails every call to or from it at once; a stalled peer's calls, in and
out, block until it is thawed. Hooks run right before and after a handler (e.g. kill the receiver after its
commit ran, before the reply leaves).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cfnode.config import NetworkConfig
from cfnode.metrics import NodeMetrics
from cfnode.net.client import StageClient
from cfnode.net.service import StageHost, StageServicer
from cfnode.testing.clock import next_order, virtual_now
from cfnode.testing.faults import FaultDice, MessageFate, PeerGone, Peers

logger = logging.getLogger(__name__)

STREAM_IN = ("forward", "backward", "replica")


class HandlerFailed(ConnectionError):
    """The remote handler raised (hivemind: P2PHandlerError)."""


@dataclass(frozen=True)
class Call:
    """One RPC as a hook sees it."""

    method: str
    src: str
    dst: str
    seq: int
    detail: str = ""
    """rpc_get_weights: the uid asked for ("weights", "replica", "state")."""


@dataclass(frozen=True)
class Delivery:
    time: float
    seq: int
    method: str
    src: str
    dst: str
    outcome: str
    order: int = field(default_factory=next_order, compare=False)


Hook = Callable[[str, Call], None]
"""hook(phase, call) with phase "before" (the handler is about to run) or "after" (it ran; no reply yet); for a
streamed reply (rpc_get_weights) "before" (the stream opens) and "part" (a part was produced, not yet sent)."""


class _PeerID:
    def __init__(self, peer_id: str) -> None:
        self._id = peer_id

    def to_base58(self) -> str:
        return self._id


class _Context:
    """What a handler reads of hivemind's P2PContext."""

    def __init__(self, caller: str, method: str) -> None:
        self.remote_id = _PeerID(caller)
        self.handle_name = f"StageServicer.rpc_{method}"


async def _iterate(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


class MemoryNetwork:
    """The transport world: servicers by peer id, in-flight handlers per node, the delivery log."""

    def __init__(self, peers: Peers, dice: FaultDice,
                 context_of: Callable[[str], contextvars.Context | None] = lambda _: None) -> None:
        self.peers = peers
        self.dice = dice
        self.context_of = context_of
        self.servicers: dict[str, StageServicer] = {}
        self.hooks: list[Hook] = []
        self.log: list[Delivery] = []
        self.handler_errors: list[tuple[float, str, str, str]] = []
        self._handlers: dict[str, dict[asyncio.Task[Any], None]] = {}
        self._held: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._seq = 0

    def for_node(self, peer_id: str, net: NetworkConfig) -> NodeNetwork:
        return NodeNetwork(self, peer_id, net)

    def note(self, seq: int, method: str, src: str, dst: str, outcome: str) -> None:
        self.log.append(Delivery(virtual_now(), seq, method, src, dst, outcome))

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- handlers ----------------------------------------------------------------------------------------

    def start_handler(self, call: Call, payload: Any) -> asyncio.Task[Any]:
        """Run the handler in a task of the receiver (its context), tracked so a kill or close cancels it."""
        task = asyncio.get_running_loop().create_task(self._handle(call, payload),
                                                      name=f"rpc-{call.method}-{call.seq}",
                                                      context=self.context_of(call.dst))
        self._track(call, task)
        return task

    def _track(self, call: Call, task: asyncio.Task[Any]) -> None:
        running = self._handlers.setdefault(call.dst, {})
        running[task] = None

        def done(t: asyncio.Task[Any]) -> None:
            running.pop(t, None)
            if t.cancelled():
                return
            e = t.exception()  # retrieved here even when the caller stopped waiting
            if e is not None and not isinstance(e, ConnectionError):
                self.handler_errors.append((virtual_now(), call.dst, call.method, f"{type(e).__name__}: {e}"))
                logger.debug("handler rpc_%s on %s raised", call.method, call.dst[:12], exc_info=e)

        task.add_done_callback(done)

    async def _handle(self, call: Call, payload: Any) -> Any:
        await self.peers.gate(call.dst)  # a stalled receiver does not run handlers
        servicer = self.servicers.get(call.dst)
        if servicer is None:
            raise ConnectionError(f"{call.dst[:12]} closed its endpoint")
        for hook in list(self.hooks):
            hook("before", call)
        self.peers.check(call.dst)
        request = _iterate(payload) if call.method in STREAM_IN else payload
        reply = await getattr(servicer, f"rpc_{call.method}")(request, _Context(call.src, call.method))
        for hook in list(self.hooks):
            hook("after", call)
        return reply

    async def stop_handlers(self, peer_id: str) -> None:
        """Cancel a node's in-flight handlers (it was killed or closed its endpoint) and wait for them."""
        tasks = list(self._handlers.pop(peer_id, {}))
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_handlers(self, peer_id: str) -> None:
        for task in list(self._handlers.get(peer_id, {})):
            task.cancel()

    def pending_handlers(self) -> list[asyncio.Task[Any]]:
        return [t for ts in self._handlers.values() for t in ts if not t.done()]

    # -- reordering --------------------------------------------------------------------------------------

    async def hold(self, link: tuple[str, str]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.setdefault(link, []).append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.dice.messages.hold_max_s)
        except (TimeoutError, asyncio.TimeoutError):
            pass

    def release(self, link: tuple[str, str]) -> None:
        for fut in self._held.pop(link, []):
            if not fut.done():
                fut.set_result(None)

    # -- one call ----------------------------------------------------------------------------------------

    async def call(self, method: str, src: str, dst: str, payload: Any) -> Any:
        """Deliver a unary-reply request and return the handler's reply (faults applied)."""
        seq = self.next_seq()
        call = Call(method, src, dst, seq)
        await self.peers.gate(src)
        if dst not in self.servicers or self.peers.is_dead(dst):
            self.note(seq, method, src, dst, "unreachable")
            raise ConnectionError(f"{dst[:12]} is unreachable")
        fate = self.dice.message()
        latency = self.dice.messages.latency_s
        if fate.drop == "refuse":
            self.note(seq, method, src, dst, "refused")
            await asyncio.sleep(latency)
            raise ConnectionError(f"request to {dst[:12]} dropped")
        if fate.drop == "blackhole":
            self.note(seq, method, src, dst, "blackholed")
            await _forever()
        await asyncio.sleep(latency + fate.delay_s)
        link = (src, dst)
        if fate.reorder:
            await self.hold(link)
        else:
            self.release(link)  # anything held on this link is delivered right after this one
        self.peers.check(src)
        if dst not in self.servicers or self.peers.is_dead(dst):
            self.note(seq, method, src, dst, "unreachable")
            raise ConnectionError(f"{dst[:12]} is unreachable")
        self.note(seq, method, src, dst, _describe(fate))
        task = self.start_handler(call, payload)
        if fate.duplicate:
            self.spawn_duplicate(call, payload)
        try:
            reply = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _being_cancelled():
                raise ConnectionError(f"{dst[:12]} reset the stream (it went away)") from None
            raise
        except PeerGone as e:
            raise ConnectionError(str(e)) from None
        except ConnectionError:
            raise
        except Exception as e:
            raise HandlerFailed(f"rpc_{method} on {dst[:12]} failed: {type(e).__name__}: {e}") from e
        if fate.lost_reply:
            self.note(seq, method, src, dst, "reply_lost")
            await _forever()
        await self.peers.gate(dst)
        await asyncio.sleep(latency)
        await self.peers.gate(src)
        return reply

    def spawn_duplicate(self, call: Call, payload: Any) -> None:
        """Deliver the same request again a moment later; its reply goes nowhere."""

        async def again() -> Any:
            await asyncio.sleep(self.dice.messages.latency_s)
            if self.peers.is_dead(call.dst) or call.dst not in self.servicers:
                return None
            self.note(call.seq, call.method, call.src, call.dst, "duplicate")
            return await self._handle(call, payload)

        task = asyncio.get_running_loop().create_task(again(), name=f"rpc-{call.method}-{call.seq}-dup",
                                                      context=self.context_of(call.dst))
        self._track(call, task)

    async def open_stream(self, method: str, src: str, dst: str, request: Any) -> AsyncIterator[Any]:
        """A streamed-reply call (rpc_get_weights): the target's generator, pulled part by part."""
        seq = self.next_seq()
        await self.peers.gate(src)
        servicer = self.servicers.get(dst)
        if servicer is None or self.peers.is_dead(dst):
            self.note(seq, method, src, dst, "unreachable")
            raise ConnectionError(f"{dst[:12]} is unreachable")
        fate = self.dice.message()
        if fate.drop == "refuse":
            self.note(seq, method, src, dst, "refused")
            raise ConnectionError(f"request to {dst[:12]} dropped")
        if fate.drop == "blackhole":
            self.note(seq, method, src, dst, "blackholed")
            await _forever()
        await asyncio.sleep(self.dice.messages.latency_s + fate.delay_s)
        await self.peers.gate(dst)
        self.note(seq, method, src, dst, "delivered")
        call = Call(method, src, dst, seq, str(getattr(request, "uid", "")))
        if self.hooks:
            for hook in list(self.hooks):
                hook("before", call)
            self.peers.check(dst)
        generator = getattr(servicer, f"rpc_{method}")(request, _Context(src, method))
        return self._pull(generator, call)

    async def _pull(self, generator: Any, call: Call) -> AsyncIterator[Any]:
        src, dst, seq, method = call.src, call.dst, call.seq, call.method
        try:
            while True:
                self.peers.check(dst)
                await self.peers.gate(dst)
                await self.peers.gate(src)
                try:
                    part = await generator.__anext__()
                except StopAsyncIteration:
                    return
                if self.dice.stream_cut():
                    self.note(seq, method, src, dst, "stream_cut")
                    return
                if self.hooks:
                    for hook in list(self.hooks):
                        hook("part", call)
                    self.peers.check(dst)  # a source killed mid-copy sends nothing more
                await asyncio.sleep(self.dice.messages.latency_s)
                yield part
        except PeerGone as e:
            raise ConnectionError(str(e)) from None
        finally:
            await generator.aclose()


def _describe(fate: MessageFate) -> str:
    parts = [name for name, on in (("delayed", fate.delay_s > 0), ("reordered", fate.reorder),
                                   ("duplicated", fate.duplicate), ("reply-lost", fate.lost_reply)) if on]
    return "delivered" + (f" ({', '.join(parts)})" if parts else "")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _unary_rpc(method: str, *, stream_in: bool) -> Any:
    """A stub method with hivemind's signature: `await stub.rpc_x(request_or_parts, timeout=...)`."""

    async def rpc(self: MemoryStub, request: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        payload = [p async for p in request] if stream_in else request  # the caller streams it all out
        coro = self._net.call(method, self._src, self._dst, payload)
        return await (coro if timeout is None else asyncio.wait_for(coro, timeout))  # as hivemind's caller

    rpc.__name__ = f"rpc_{method}"
    return rpc


class MemoryStub:
    """hivemind's `StageServicer` stub shape, from `src` to `dst`."""

    def __init__(self, net: MemoryNetwork, src: str, dst: str) -> None:
        self._net, self._src, self._dst = net, src, dst

    rpc_forward = _unary_rpc("forward", stream_in=True)
    rpc_backward = _unary_rpc("backward", stream_in=True)
    rpc_replica = _unary_rpc("replica", stream_in=True)
    rpc_commit = _unary_rpc("commit", stream_in=False)
    rpc_abort = _unary_rpc("abort", stream_in=False)
    rpc_assign = _unary_rpc("assign", stream_in=False)
    rpc_done = _unary_rpc("done", stream_in=False)
    rpc_admit = _unary_rpc("admit", stream_in=False)
    rpc_restore = _unary_rpc("restore", stream_in=False)
    rpc_info = _unary_rpc("info", stream_in=False)

    async def rpc_get_weights(self, request: Any, timeout: float | None = None) -> AsyncIterator[Any]:  # noqa: ASYNC109
        if timeout is not None:
            raise ValueError("Timeouts for handlers returning streams are not supported")  # as hivemind
        return await self._net.open_stream("get_weights", self._src, self._dst, request)


class MemoryEndpoint:
    def __init__(self, net: MemoryNetwork, peer_id: str, client: StageClient) -> None:
        self._net, self.peer_id, self.client = net, peer_id, client
        self.closed = False

    def maddrs(self) -> list[str]:
        return [f"/memory/p2p/{self.peer_id}"]

    async def close(self) -> None:
        self.closed = True
        self._net.servicers.pop(self.peer_id, None)
        await self._net.stop_handlers(self.peer_id)


class NodeNetwork:
    """`cfnode.net.network.Network` of one node."""

    def __init__(self, net: MemoryNetwork, peer_id: str, config: NetworkConfig) -> None:
        self.net, self.peer_id, self.config = net, peer_id, config
        self.endpoint: MemoryEndpoint | None = None

    async def open(self, host: StageHost, metrics: NodeMetrics) -> MemoryEndpoint:
        await self.net.peers.gate(self.peer_id)
        self.net.servicers[self.peer_id] = StageServicer(host)
        client = StageClient(None, self.config, metrics,
                             stub_for=lambda dst: MemoryStub(self.net, self.peer_id, dst))
        self.endpoint = MemoryEndpoint(self.net, self.peer_id, client)
        return self.endpoint
