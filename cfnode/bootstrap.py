"""`cfnode bootstrap`: a DHT-only peer with a persistent identity that newcomers dial first.

It holds no model state; losing it does not stop a formed swarm (peers know each other), only newcomers
that know no other address.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from hivemind.p2p import P2P

from cfnode.config import MetricsConfig, NetworkConfig
from cfnode.metrics import BootstrapMetrics
from cfnode.net.dht import create_dht, routing_table_size, visible_maddrs
from cfnode.net.identity import open_identity

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


LOG_EVERY_S = 30.0
METRICS_REFRESH_S = 2.0


def run_bootstrap(net: NetworkConfig, announce: Callable[[list[str]], None],
                  metrics: MetricsConfig | None = None) -> None:
    """Run until SIGTERM/SIGINT. `announce(lines)` receives the join line, the other addresses and, with
    `metrics.port` set, the line `metrics port N` (the bound port; 0 picks a free one)."""
    if net.identity_path:
        ensure_identity(net.identity_path)
    # Run-agnostic: it knows no run's keys, so it checks signatures only (a marked subkey must be signed by
    # its owner); the runs' nodes check their records' schema and bounds (net/validation.py).
    identity = open_identity(net.identity_path)
    dht = create_dht(net, validators=[identity.signature_validator()], identity=identity)
    # Handlers only after the DHT forked: a child that inherited them would ignore SIGTERM from shutdown().
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = BootstrapMetrics()
        stats.node_info.labels(peer_id=dht.peer_id.to_base58(), role="bootstrap", run_id="").set(1)
        stats.dht_peers.set(routing_table_size(dht))
        lines = []
        if metrics is not None and metrics.port is not None:
            lines.append(f"metrics port {stats.serve(metrics.host, metrics.port)}")
        maddrs = visible_maddrs(dht)
        announce([join_hint(maddrs), *(f"  also reachable at {m}" for m in maddrs[1:]), *lines])
        logged_at = time.monotonic()
        while not stop.wait(timeout=METRICS_REFRESH_S):
            peers = routing_table_size(dht)
            stats.dht_peers.set(peers)
            if time.monotonic() - logged_at >= LOG_EVERY_S:
                logged_at = time.monotonic()
                logger.info("bootstrap alive; %d peers in the routing table", peers)
    finally:
        dht.shutdown()
