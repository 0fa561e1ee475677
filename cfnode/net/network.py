"""How a node reaches its peers: a `Network` opens an `Endpoint` (the node's RPC surface is served, and a
`StageClient` calls the others). The real one is hivemind's p2p daemon shared with the DHT; the protocol
harness (`cfnode/testing/`) supplies an in-memory one with injected faults, so the same node code runs over
both.
"""

from __future__ import annotations

import logging
from typing import Protocol

from hivemind.dht import DHT

from cfnode.config import NetworkConfig
from cfnode.deadline import within
from cfnode.metrics import NodeMetrics
from cfnode.net.client import StageClient
from cfnode.net.service import StageHost, StageServicer

logger = logging.getLogger(__name__)


class Endpoint(Protocol):
    """A node's open connection to the swarm."""

    client: StageClient

    def maddrs(self) -> list[str]:
        """Addresses other peers can dial (what `cfnode join --peers` takes), best first."""
        ...

    async def close(self) -> None: ...


class Network(Protocol):
    async def open(self, host: StageHost, metrics: NodeMetrics) -> Endpoint: ...


class P2PEndpoint:
    def __init__(self, dht: DHT, p2p: object, servicer: StageServicer, client: StageClient) -> None:
        self._dht, self._p2p, self._servicer, self.client = dht, p2p, servicer, client

    def maddrs(self) -> list[str]:
        from cfnode.net.dht import visible_maddrs

        return visible_maddrs(self._dht)

    async def close(self) -> None:
        try:
            await within(self._servicer.remove_p2p_handlers(self._p2p), 2)
            await within(self._p2p.shutdown(), 2)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            logger.debug("p2p shutdown: %s", e)


class P2PNetwork:
    """hivemind p2p: a replica of the DHT's daemon (no second p2pd), the servicer's handlers registered on it."""

    def __init__(self, dht: DHT, net: NetworkConfig) -> None:
        self.dht, self.net = dht, net

    async def open(self, host: StageHost, metrics: NodeMetrics) -> P2PEndpoint:
        p2p = await self.dht.replicate_p2p()
        servicer = StageServicer(host)
        await servicer.add_p2p_handlers(p2p)
        return P2PEndpoint(self.dht, p2p, servicer, StageClient(p2p, self.net, metrics))
