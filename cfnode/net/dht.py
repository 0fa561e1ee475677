"""The hivemind DHT: creating it safely (watchdog, typed start-up errors) and the few calls cfnode makes.

Traps handled here (reference/p2p.md §9): the DHT forks, so it is created before anything else; a SIGKILL of
the main process would orphan the DHT child and its p2pd, so a watchdog inside the DHT process exits when its
parent dies; concurrent DHT calls with large values corrupt the control pipe, so every call goes through one
asyncio lock and values stay < 4 KB; cached reads are stale, so membership uses `get_many` with
`sufficient_expiration_time=inf` (the `latest=True` equivalent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from hivemind.dht import DHT, DHTNode
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time

from cfnode.config import PROTOCOL_VERSION, NetworkConfig
from cfnode.deadline import within
from cfnode.errors import IdentityTakenError, NoPeerReachableError
from cfnode.net.identity import NodeIdentity, peer_id_of_marker
from cfnode.net.records import (
    MetaRecord,
    PeerRecord,
    StageRecord,
    SwarmView,
    meta_key,
    parse_stage_entries,
    stage_key,
    standby_key,
)
from cfnode.net.validation import META_TTL_S, REJECT_REASONS, rejected_counts

logger = logging.getLogger(__name__)

DHT_CALL_TIMEOUT_S = 10.0
_WATCHDOG_TASKS: set[asyncio.Task[None]] = set()  # keeps the watchdog referenced inside the DHT process


async def _exit_when_parent_dies(dht: DHT, node: DHTNode, *, parent_pid: int, poll_s: float = 0.5) -> None:
    """Runs inside the DHT process: when the node's main process is gone, shut down (p2pd exits with us)."""

    async def _watch() -> None:
        while os.getppid() == parent_pid:  # noqa: ASYNC110 - polling the parent is the point
            await asyncio.sleep(poll_s)
        try:
            await asyncio.wait_for(node.shutdown(), timeout=3)
        finally:
            os._exit(0)

    _WATCHDOG_TASKS.add(asyncio.create_task(_watch()))


async def _get_many(dht: DHT, node: DHTNode, *, keys: tuple[str, ...]) -> dict[str, Any]:
    """Runs inside the DHT process: fresh (non-cached) read of several keys, returned as plain data."""
    found = await node.get_many(keys, sufficient_expiration_time=math.inf)
    out: dict[str, Any] = {}
    for key, item in found.items():
        if item is None:
            out[key] = None
            continue
        value = item.value
        if isinstance(value, dict):
            out[key] = {
                sub: (getattr(v, "value", None), getattr(v, "expiration_time", None)) for sub, v in value.items()
            }
        else:
            out[key] = ("__plain__", value, item.expiration_time)
    return out


def create_dht(net: NetworkConfig, *, client_mode: bool = False, validators: Sequence[RecordValidatorBase] = (),
               identity: NodeIdentity | None = None) -> DHT:
    """Start the DHT process (call this first: it forks) and install the parent-death watchdog.

    `validators` guard every record this DHT stores, serves or reads (net/validation.py); `identity` is the
    key they sign with: p2pd runs with its file, so the peer id is the key's (checked), and a temporary
    identity file is deleted as soon as p2pd has read it. Raises NoPeerReachableError (exit 3) or
    IdentityTakenError (exit 4) with an actionable message.
    """
    if identity is not None:
        try:
            return _create_dht(net, client_mode=client_mode, validators=validators, identity_path=identity.path,
                               expected_peer_id=identity.peer_id, fresh_identity=identity.temporary)
        finally:
            if identity.temporary:
                identity.discard()
    return _create_dht(net, client_mode=client_mode, validators=validators, identity_path=net.identity_path)


def _create_dht(net: NetworkConfig, *, client_mode: bool, validators: Sequence[RecordValidatorBase],
                identity_path: str | None, expected_peer_id: str | None = None, fresh_identity: bool = False) -> DHT:
    kwargs: dict[str, Any] = {
        "host_maddrs": list(net.host_maddrs),
        "startup_timeout": net.startup_timeout_s,
        "client_mode": client_mode,
        # UPnP/NAT-PMP probing is for public hosts; a loopback-only node must not look for a router.
        "nat_port_map": not all(m.startswith(("/ip4/127.", "/ip6/::1/")) for m in net.host_maddrs),
    }
    if net.announce_maddrs:
        kwargs["announce_maddrs"] = list(net.announce_maddrs)
    if identity_path:
        kwargs["identity_path"] = identity_path
    if fresh_identity:  # a key made a moment ago is nobody else's: skip hivemind's probe (an extra p2pd)
        kwargs["check_if_identity_free"] = False
    try:
        dht = DHT(initial_peers=list(net.initial_peers) or None, start=True, record_validators=list(validators),
                  **kwargs)
    except P2PDaemonError as e:
        text = str(e)
        if "already taken" in text:
            raise IdentityTakenError(
                f"identity {identity_path} is already in use by a running peer (a previous instance may "
                f"still be alive; stop it or use another --identity-path): {text}"
            ) from e
        if "bootstrap" in text or "connect" in text:
            raise NoPeerReachableError(
                f"could not reach any of --peers {list(net.initial_peers)}: {text}. Check the address, that the "
                "peer is running, and that its port is open (try an /ip4 address if IPv6 is not routed)."
            ) from e
        raise
    except Exception as e:  # hivemind raises bare exceptions for unreachable peers in some paths
        if net.initial_peers and ("bootstrap" in str(e) or "connect" in str(e).lower()):
            raise NoPeerReachableError(f"could not reach any of --peers {list(net.initial_peers)}: {e}") from e
        raise
    dht.run_coroutine(partial(_exit_when_parent_dies, parent_pid=os.getpid()))
    if expected_peer_id is not None and dht.peer_id.to_base58() != expected_peer_id:
        dht.shutdown()
        raise RuntimeError(f"p2pd runs as {dht.peer_id.to_base58()}, not as the signing key's peer "
                           f"{expected_peer_id}: records would not be bound to this peer")
    return dht


async def _routing_table_size(dht: DHT, node: DHTNode) -> int:
    """Runs inside the DHT process: how many peers this node's DHT routing table holds."""
    return len(node.protocol.routing_table.peer_id_to_uid)


def routing_table_size(dht: DHT) -> int:
    """Peers in the DHT routing table (blocking; for the bootstrap's plain-thread loop)."""
    return int(dht.run_coroutine(_routing_table_size))


def visible_maddrs(dht: DHT) -> list[str]:
    """This peer's multiaddrs with its /p2p/ id, what others pass to --peers: IPv4 first, and an address
    other machines can dial before loopback (unless loopback is all there is)."""
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    return sorted(maddrs, key=lambda m: (not m.startswith("/ip4/"), m.startswith(("/ip4/127.", "/ip6/::1/")), m))


class SwarmStore(Protocol):
    """What a node needs from the DHT: its own records written, everyone's read. `SwarmDHT` is hivemind's; the
    protocol harness has an in-memory one with expiry, visibility delay and injected faults."""

    peer_id: str

    async def store_stage(self, stage_idx: int | None, record: StageRecord, *, ttl_s: float | None = None) -> bool: ...
    async def store_meta(self, meta: MetaRecord) -> bool: ...
    async def read_meta(self) -> Mapping[str, MetaRecord] | MetaRecord | None:
        """Owner-bound stores (SwarmDHT) return every live copy by its writer's peer id (`run_meta` picks the
        run's); a store without owners (the in-memory harness) may return the one record."""
    async def read_view(self) -> SwarmView: ...
    async def dht_peers(self) -> int: ...


def call_timeout_s(ttl_s: float) -> float:
    """Deadline of one DHT call: well under ttl/2, so one stuck call cannot let a record expire while the node
    waits on it (two heartbeats still fit in a ttl)."""
    return max(0.2, min(DHT_CALL_TIMEOUT_S, ttl_s / 3))


class SwarmDHT:
    """Async access to one run's records. One instance per node, used on the node's loop.

    Writes and reads go through two separate locks: the heartbeat's store never waits behind a slow read. Both
    are issued from the loop's one thread, so the DHT's control pipe is never written concurrently (the
    corruption trap of reference/p2p.md §9 needs several threads)."""

    def __init__(self, dht: DHT, *, run_id: str, num_stages: int, ttl_s: float, owner: bytes | None = None,
                 timeout_s: float | None = None) -> None:
        """`owner`: this node's owner marker (net/identity.py), the subkey of everything it writes; the DHT must
        sign with the same key (RSASignatureValidator). A reader (`cfnode status`) needs none, and may take
        longer per call (`timeout_s`) than a node, whose calls must fit its heartbeat (`call_timeout_s`)."""
        self.dht = dht
        self.run_id = run_id
        self.num_stages = num_stages
        self.ttl_s = ttl_s
        self.timeout_s = call_timeout_s(ttl_s) if timeout_s is None else timeout_s
        self.peer_id = dht.peer_id.to_base58()
        if owner is not None and peer_id_of_marker(owner) != self.peer_id:
            raise ValueError(f"owner marker of peer {peer_id_of_marker(owner)} given to the DHT of {self.peer_id}")
        self.owner = owner
        self.dropped: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        """Entries this reader dropped itself (an unmarked subkey, an old version) that the DHT let through:
        only possible without the run's validator."""
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    def _subkey(self) -> bytes:
        if self.owner is None:
            raise RuntimeError("this SwarmDHT is a reader: it has no owner marker to write under")
        return self.owner

    async def _call(self, future: Any) -> Any:
        return await within(future, self.timeout_s)

    async def store_stage(self, stage_idx: int | None, record: StageRecord, *, ttl_s: float | None = None) -> bool:
        """Heartbeat: write our record under the stage key (or the standby key when stage_idx is None)."""
        key = standby_key(self.run_id) if stage_idx is None else stage_key(self.run_id, stage_idx)
        expiration = get_dht_time() + (ttl_s if ttl_s is not None else self.ttl_s)
        async with self._write_lock:
            fut = self.dht.store(key, record.to_wire(), expiration_time=expiration, subkey=self._subkey(),
                                 return_future=True)
            return bool(await self._call(fut))

    async def store_meta(self, meta: MetaRecord, *, ttl_s: float = META_TTL_S) -> bool:
        """Our copy of the run's meta, under our owner marker (nobody else can overwrite it)."""
        async with self._write_lock:
            fut = self.dht.store(meta_key(self.run_id), meta.to_wire(), expiration_time=get_dht_time() + ttl_s,
                                 subkey=self._subkey(), return_future=True)
            return bool(await self._call(fut))

    async def read_meta(self) -> dict[str, MetaRecord]:
        """Every live, well-formed copy of the meta by its writer's peer id (fresh read); `run_meta` picks."""
        async with self._read_lock:
            fut = self.dht.run_coroutine(partial(_get_many, keys=(meta_key(self.run_id),)), return_future=True)
            raw = await self._call(fut)
        out = {}
        for peer_id, entry in self._owned(raw.get(meta_key(self.run_id))).items():
            meta = MetaRecord.from_wire(entry.value)
            if meta is not None and _is_current(meta.version, self.dropped):
                out[peer_id] = meta
        return out

    async def rejected_records(self) -> dict[str, int]:
        """Records of this run rejected so far, by reason (net/validation.py): the DHT process's validator
        counts, plus the entries this reader dropped itself."""
        async with self._read_lock:
            fut = self.dht.run_coroutine(rejected_counts, return_future=True)
            counts = dict(await self._call(fut))
        for reason, n in self.dropped.items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    async def dht_peers(self) -> int:
        """Peers in this node's DHT routing table (the `cfnode_dht_peers` gauge)."""
        async with self._read_lock:
            fut = self.dht.run_coroutine(_routing_table_size, return_future=True)
            return int(await self._call(fut))

    async def read_view(self) -> SwarmView:
        """Fresh view of every stage key and the standby key."""
        keys = (*(stage_key(self.run_id, i) for i in range(self.num_stages + 1)), standby_key(self.run_id))
        async with self._read_lock:
            fut = self.dht.run_coroutine(partial(_get_many, keys=keys), return_future=True)
            raw = await self._call(fut)
        now = get_dht_time()
        stages = {}
        for i in range(self.num_stages + 1):
            stages[i] = parse_stage_entries(self._current(self._owned(raw.get(stage_key(self.run_id, i)))), now)
        standby = parse_stage_entries(self._current(self._owned(raw.get(standby_key(self.run_id)))), now)
        return SwarmView(stages=stages, standby=standby, now=now)

    def _owned(self, raw: Any) -> dict[str, _Entry]:
        """A key's `{subkey: (value, expiration)}` keyed by the peer id each owner marker derives to; an entry
        under any other subkey (a plain peer id as version 1 wrote, anything forged) is dropped and counted."""
        out: dict[str, _Entry] = {}
        if not isinstance(raw, dict):
            if raw is not None:  # a plain value where a dictionary belongs
                self.dropped["not_owner"] += 1
            return out
        for subkey, (value, expiration) in raw.items():
            peer_id = peer_id_of_marker(subkey) if isinstance(subkey, bytes) else None
            if peer_id is None:
                self.dropped["not_owner"] += 1
                continue
            out[peer_id] = _Entry(value, expiration)
        return out

    def _current(self, entries: dict[str, _Entry]) -> dict[str, _Entry]:
        """Entries whose record is of this protocol version or later (a v1 record is ignored, and counted)."""
        return {p: e for p, e in entries.items()
                if not isinstance(e.value, Mapping) or _is_current(e.value.get("version", 0), self.dropped)}


async def mirror_rejections(swarm: SwarmDHT, sink: Callable[[dict[str, int]], None], *, period_s: float) -> None:
    """Every period, hand the DHT process's rejection counts to `sink` (NodeMetrics.mirror_dht_rejections)
    until cancelled; a failed read is skipped (the counts are running totals: nothing is lost)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            sink(await swarm.rejected_records())
        except Exception as e:  # noqa: BLE001 - metrics must never take the node down
            logger.debug("reading the DHT's rejection counts failed: %s: %s", type(e).__name__, e)


class _Entry:
    __slots__ = ("expiration_time", "value")

    def __init__(self, value: Any, expiration_time: Any) -> None:
        self.value = value
        self.expiration_time = expiration_time


def _is_current(version: Any, dropped: dict[str, int]) -> bool:
    try:
        if int(version) >= PROTOCOL_VERSION:
            return True
    except (TypeError, ValueError, OverflowError):
        return True  # unparseable: parse_stage_entries drops it
    dropped["version"] += 1
    return False


def _as_entries(raw: Any) -> dict[str, _Entry]:
    if not isinstance(raw, dict):
        return {}
    return {sub: _Entry(v, exp) for sub, (v, exp) in raw.items() if isinstance(sub, str)}


__all__ = ["PeerRecord", "SwarmDHT", "SwarmStore", "call_timeout_s", "create_dht", "mirror_rejections", "routing_table_size",
           "visible_maddrs"]
