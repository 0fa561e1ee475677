"""`cfnode bootstrap`: a DHT-only peer with a persistent identity that newcomers dial first.

It holds no model state; losing it does not stop a formed swarm (peers know each other), only newcomers
that know no other address.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from hivemind.p2p import P2P

from cfnode.config import NetworkConfig
from cfnode.net.dht import create_dht, visible_maddrs

logger = logging.getLogger(__name__)


def ensure_identity(path: str) -> None:
    """Create a libp2p identity file (mode 0400) if it does not exist yet."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    P2P.generate_identity(path)
    logger.info("created identity %s", path)


def join_hint(maddrs: list[str]) -> str:
    """The one line others paste; cfnode's own syntax (repeatable --peers), never hivemind's space list."""
    return f"To join this swarm: cfnode join --peers {maddrs[0]}"


def run_bootstrap(net: NetworkConfig, announce: Callable[[list[str]], None]) -> None:
    """Run until SIGTERM/SIGINT. `announce(lines)` receives the join line and the other addresses."""
    if net.identity_path:
        ensure_identity(net.identity_path)
    dht = create_dht(net)
    # Handlers only after the DHT forked: a child that inherited them would ignore SIGTERM from shutdown().
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        maddrs = visible_maddrs(dht)
        announce([join_hint(maddrs), *(f"  also reachable at {m}" for m in maddrs[1:])])
        while not stop.wait(timeout=30):
            peers = len(dht.run_coroutine(_routing_table_size_call))
            logger.info("bootstrap alive; %d peers in the routing table", peers)
    finally:
        dht.shutdown()


async def _routing_table_size_call(dht, node) -> list[str]:  # type: ignore[no-untyped-def]
    """Runs in the DHT process: the peers in this node's routing table (refreshes stale entries too)."""
    return [str(peer) for peer in node.protocol.routing_table.peer_id_to_uid]
