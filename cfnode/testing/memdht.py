"""An in-memory DHT with hivemind's record semantics, and the per-node `SwarmStore` handle over it.

Semantics copied from hivemind 1.1.12 (`utils/timed_storage.py`, `dht/storage.py`; reference/p2p.md §2): a key
holds a dictionary of subkeys, each with its own expiration; a store whose expiration is in the past is refused,
a store of a subkey replaces it only with a strictly later expiration (else it is refused: False); expired
subkeys vanish at read time. Values travel through msgpack like the real DHT's.

Faults (faults.py `FaultDice`, `Peers`): per-call latency and slowness, a call that hangs until the caller's
deadline, reads that miss keys, a visibility delay (other readers see a write `visibility_s` later), a stalled
peer's calls block, a dead peer's calls fail and its late writes are dropped, and `expire()` makes a record
vanish early. Every store attempt is logged in `writes` (the invariants read the successful ones).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgpack

from cfnode.deadline import within
from cfnode.net.dht import _as_entries, call_timeout_s
from cfnode.net.records import (
    MetaRecord,
    StageRecord,
    SwarmView,
    meta_key,
    parse_stage_entries,
    stage_key,
    standby_key,
)
from cfnode.testing.clock import EPOCH, VirtualClock, next_order, virtual_now
from cfnode.testing.faults import FaultDice, PeerGone, Peers

PLAIN = None
"""The subkey slot of a plain (non-dictionary) value such as `{run}:meta`."""


@dataclass(frozen=True)
class Write:
    """One store attempt as it landed: outcome is stored, refused, past (expiration already passed) or dead
    (the writer was killed before it landed)."""

    time: float
    writer: str
    key: str
    subkey: str | None
    value: Any
    expiration: float
    outcome: str
    order: int = field(default_factory=next_order, compare=False)


@dataclass
class _Version:
    value: Any
    expiration: float
    writer: str
    visible_at: float


def _wire_copy(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


class MemoryDHT:
    """One shared world: key -> subkey -> versions (newest last), each visible to others from `visible_at`."""

    def __init__(self, peers: Peers, dice: FaultDice) -> None:
        self.peers = peers
        self.dice = dice
        self._data: dict[str, dict[str | None, list[_Version]]] = {}
        self.writes: list[Write] = []
        self.expired_early: list[tuple[float, str, str | None]] = []

    @staticmethod
    def now() -> float:
        """The DHT's true time (storage nodes' clocks are not skewed)."""
        return EPOCH + virtual_now()

    async def _io(self, peer_id: str) -> None:
        """A call's trip: blocks while the caller is stalled, fails if it is dead, may hang or be slow."""
        await self.peers.gate(peer_id)
        hangs, latency = self.dice.dht_call()
        if hangs:
            await asyncio.get_running_loop().create_future()  # until the caller's deadline cancels it
        await asyncio.sleep(latency)
        await self.peers.gate(peer_id)

    async def store(self, writer: str, key: str, subkey: str | None, value: Any, expiration: float) -> bool:
        try:
            await self._io(writer)
        except PeerGone:
            self.writes.append(Write(virtual_now(), writer, key, subkey, value, float(expiration), "dead"))
            raise
        return self.land(writer, key, subkey, value, expiration)

    def land(self, writer: str, key: str, subkey: str | None, value: Any, expiration: float) -> bool:
        """Apply a store now (no I/O): hivemind's accept/refuse rule."""
        now = self.now()
        versions = self._data.setdefault(key, {}).setdefault(subkey, [])
        current = versions[-1] if versions and versions[-1].expiration >= now else None
        if self.peers.is_dead(writer):
            outcome = "dead"
        elif expiration < now:
            outcome = "past"
        elif current is not None and current.expiration >= expiration:
            outcome = "refused"
        else:
            outcome = "stored"
            value = _wire_copy(value)
            versions.append(_Version(value, float(expiration), writer, virtual_now() + self.dice.visibility_s()))
            self._prune(versions)
        self.writes.append(Write(virtual_now(), writer, key, subkey, value, float(expiration), outcome))
        return outcome == "stored"

    @staticmethod
    def _prune(versions: list[_Version]) -> None:
        """Drop versions hidden behind a newer one every reader sees."""
        t = virtual_now()
        for i in range(len(versions) - 1, 0, -1):
            if versions[i].visible_at <= t:
                del versions[:i]
                return

    def visible(self, reader: str, key: str) -> dict[str | None, tuple[Any, float]]:
        """What `reader` would read of `key` now: live subkeys, each its newest version visible to it."""
        now, t = self.now(), virtual_now()
        out: dict[str | None, tuple[Any, float]] = {}
        for subkey, versions in self._data.get(key, {}).items():
            seen = next((v for v in reversed(versions) if v.writer == reader or v.visible_at <= t), None)
            if seen is not None and seen.expiration > now:
                out[subkey] = (_wire_copy(seen.value), seen.expiration)
        return out

    async def get_many(self, reader: str, keys: tuple[str, ...]) -> dict[str, Any]:
        """The raw structure `cfnode.net.dht._get_many` returns: key -> {subkey: (value, expiration)} or None;
        a plain value as ("__plain__", value, expiration)."""
        await self._io(reader)
        out: dict[str, Any] = {}
        for key in keys:
            found = self.visible(reader, key)
            if self.dice.key_missing() or not found:
                out[key] = None
            elif PLAIN in found:
                value, expiration = found[PLAIN]
                out[key] = ("__plain__", value, expiration)
            else:
                out[key] = found
        return out

    def expire(self, key: str, subkey: str | None) -> bool:
        """Fault: the record vanishes now (a storage node lost it), as if its expiration had passed."""
        versions = self._data.get(key, {}).get(subkey)
        if not versions:
            return False
        past = self.now() - 1e-6
        for v in versions:
            v.expiration = min(v.expiration, past)
        self.expired_early.append((virtual_now(), key, subkey))
        return True

    def stored(self) -> list[Write]:
        return [w for w in self.writes if w.outcome == "stored"]

    def true_view(self, run_id: str, num_stages: int) -> SwarmView:
        """What a reader would see now with every write visible and no fault: the harness's ground truth."""
        now, t = self.now(), virtual_now()

        def entries(key: str) -> dict[str, Any]:
            out = {}
            for subkey, versions in self._data.get(key, {}).items():
                seen = next((v for v in reversed(versions) if v.visible_at <= t), None)
                if isinstance(subkey, str) and seen is not None and seen.expiration > now:
                    out[subkey] = (_wire_copy(seen.value), seen.expiration)
            return out

        stages = {i: parse_stage_entries(_as_entries(entries(stage_key(run_id, i))), now)
                  for i in range(num_stages + 1)}
        standby = parse_stage_entries(_as_entries(entries(standby_key(run_id))), now)
        return SwarmView(stages=stages, standby=standby, now=now)


class MemorySwarm:
    """`cfnode.net.dht.SwarmStore` of one node over a `MemoryDHT`, shaped like `SwarmDHT`: the same two locks,
    the same `call_timeout_s(ttl)` deadline (TimeoutError), the same raw read structure and parsing."""

    def __init__(self, world: MemoryDHT, peer_id: str, *, run_id: str, num_stages: int, ttl_s: float,
                 clock: VirtualClock) -> None:
        self.world = world
        self.peer_id = peer_id
        self.run_id = run_id
        self.num_stages = num_stages
        self.ttl_s = ttl_s
        self.timeout_s = call_timeout_s(ttl_s)
        self.clock = clock
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    async def _call(self, awaitable: Any) -> Any:
        return await within(awaitable, self.timeout_s)

    async def store_stage(self, stage_idx: int | None, record: StageRecord, *, ttl_s: float | None = None) -> bool:
        key = standby_key(self.run_id) if stage_idx is None else stage_key(self.run_id, stage_idx)
        expiration = self.clock.time() + (ttl_s if ttl_s is not None else self.ttl_s)
        async with self._write_lock:
            return bool(await self._call(self.world.store(self.peer_id, key, self.peer_id, record.to_wire(),
                                                          expiration)))

    async def store_meta(self, meta: MetaRecord, *, ttl_s: float = 3600.0) -> bool:
        async with self._write_lock:
            return bool(await self._call(self.world.store(self.peer_id, meta_key(self.run_id), PLAIN,
                                                          meta.to_wire(), self.clock.time() + ttl_s)))

    async def read_meta(self) -> MetaRecord | None:
        key = meta_key(self.run_id)
        async with self._read_lock:
            raw = (await self._call(self.world.get_many(self.peer_id, (key,))))[key]
        if not isinstance(raw, tuple):
            return None
        return MetaRecord.from_wire(raw[1])

    async def dht_peers(self) -> int:
        async with self._read_lock:
            await self._call(self.world._io(self.peer_id))
        return self.world.peers.count_alive() - 1

    async def read_view(self) -> SwarmView:
        """`SwarmDHT.read_view` over the in-memory world (same keys, raw structure and parse functions)."""
        keys = (*(stage_key(self.run_id, i) for i in range(self.num_stages + 1)), standby_key(self.run_id))
        async with self._read_lock:
            raw = await self._call(self.world.get_many(self.peer_id, keys))
        now = self.clock.time()
        stages = {}
        for i in range(self.num_stages + 1):
            stages[i] = parse_stage_entries(_as_entries(raw.get(stage_key(self.run_id, i))), now)
        standby = parse_stage_entries(_as_entries(raw.get(standby_key(self.run_id))), now)
        return SwarmView(stages=stages, standby=standby, now=now)
