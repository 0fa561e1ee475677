"""DHT keys and record values (the wire contract of docs/protocol.md), and the pure rules that read them.

Only this module builds DHT keys. Records are small msgpack-able dicts carrying `version`; readers ignore
unknown fields and reject records they cannot parse, so old and new nodes can tell each other apart.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cfnode.config import PROTOCOL_VERSION


class StageState(enum.Enum):
    OFFLINE = "OFFLINE"
    JOINING = "JOINING"
    ONLINE = "ONLINE"
    RECOVERING = "RECOVERING"
    STANDBY = "STANDBY"


def stage_key(run_id: str, stage_idx: int) -> str:
    return f"{run_id}:stage:{stage_idx}"


def standby_key(run_id: str) -> str:
    return f"{run_id}:standby"


def meta_key(run_id: str) -> str:
    return f"{run_id}:meta"


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    """One node's heartbeat under `{run}:stage:{i}` (or `{run}:standby`), subkey = its peer id."""

    state: StageState
    step: int = 0
    generation: int = 0
    grad_norm: float = 1.0
    """Post-clip L2 norm of the stage's gradient at its last committed step (CheckFree's weight)."""
    grad_norm_raw: float = 1.0
    throughput: float = 0.0
    donor: bool = True
    """False from a rebuild until the stage's first commit: its weights and norm are not yet its own, so
    another rebuild prefers a stage that survived (docs/recovery.md, adjacent losses)."""
    replica_step: int = -1
    """CheckFree+: the step of the stage-0 replica this node holds (-1: none)."""
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "step": int(self.step),
            "generation": int(self.generation),
            "grad_norm": float(self.grad_norm),
            "grad_norm_raw": float(self.grad_norm_raw),
            "throughput": float(self.throughput),
            "donor": bool(self.donor),
            "replica_step": int(self.replica_step),
            "version": int(self.version),
        }

    @classmethod
    def from_wire(cls, value: object) -> StageRecord | None:
        """Parse a record; None if it is malformed (a reader never trusts the DHT)."""
        if not isinstance(value, Mapping):
            return None
        try:
            floats = [float(value.get(k, 1.0)) for k in ("grad_norm", "grad_norm_raw", "throughput")]
            if not all(math.isfinite(f) for f in floats):
                return None
            return cls(
                state=StageState(value["state"]),
                step=int(value.get("step", 0)),
                generation=int(value.get("generation", 0)),
                grad_norm=float(value.get("grad_norm", 1.0)),
                grad_norm_raw=float(value.get("grad_norm_raw", 1.0)),
                throughput=float(value.get("throughput", 0.0)),
                donor=bool(value.get("donor", True)),
                replica_step=int(value.get("replica_step", -1)),
                version=int(value.get("version", 0)),
            )
        except (KeyError, ValueError, TypeError, OverflowError):
            return None


@dataclass(frozen=True, kw_only=True)
class MetaRecord:
    """`{run}:meta`: what every node of the run must agree on."""

    num_stages: int
    model_config_hash: str
    recovery_mode: str = "checkfree"
    """Every node must route microbatches the same way (checkfree+ swaps edge stages)."""
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {"num_stages": self.num_stages, "model_config_hash": self.model_config_hash,
                "recovery_mode": self.recovery_mode, "version": self.version}

    @classmethod
    def from_wire(cls, value: object) -> MetaRecord | None:
        if not isinstance(value, Mapping):
            return None
        try:
            return cls(num_stages=int(value["num_stages"]), model_config_hash=str(value["model_config_hash"]),
                       recovery_mode=str(value.get("recovery_mode", "checkfree")),
                       version=int(value.get("version", 0)))
        except (KeyError, ValueError, TypeError, OverflowError):
            return None


@dataclass(frozen=True, kw_only=True)
class PeerRecord:
    """A record as read from the DHT, with the peer it belongs to and its expiration (DHT time)."""

    peer_id: str
    record: StageRecord
    expiration_time: float

    def age_s(self, now: float, ttl_s: float) -> float:
        """Seconds since the heartbeat that wrote it (its expiration minus the ttl)."""
        return max(0.0, now - (self.expiration_time - ttl_s))


@dataclass(frozen=True)
class SwarmView:
    """Live stage records of one run as seen at `now`: stage index -> peer records; plus the spares."""

    stages: Mapping[int, tuple[PeerRecord, ...]] = field(default_factory=dict)
    standby: tuple[PeerRecord, ...] = ()
    now: float = 0.0

    def members(self, stage_idx: int) -> tuple[PeerRecord, ...]:
        return self.stages.get(stage_idx, ())

    def online_owner(self, stage_idx: int) -> PeerRecord | None:
        """The ONLINE owner of a stage: highest generation wins, then the smallest peer id (deterministic)."""
        online = [p for p in self.members(stage_idx) if p.record.state is StageState.ONLINE]
        if not online:
            return None
        return min(online, key=lambda p: (-p.record.generation, p.peer_id))

    def max_generation(self, stage_idx: int) -> int:
        return max((p.record.generation for p in self.members(stage_idx)), default=0)


def is_alive(expiration_time: float, now: float) -> bool:
    """Liveness rule: a record is alive until its expiration (heartbeats push the expiration forward)."""
    return expiration_time > now


def is_occupied(members: tuple[PeerRecord, ...], now: float) -> bool:
    """A stage is occupied while any live member is JOINING, RECOVERING or ONLINE."""
    return any(
        is_alive(p.expiration_time, now)
        and p.record.state in (StageState.JOINING, StageState.RECOVERING, StageState.ONLINE)
        for p in members
    )


def first_empty_stage(view: SwarmView, num_stages: int) -> int | None:
    """The lowest stage index in 0..num_stages with no live owner (ARCHITECTURE §5 step 1)."""
    for idx in range(num_stages + 1):
        if not is_occupied(view.members(idx), view.now):
            return idx
    return None


def keeps_claim(view: SwarmView, stage_idx: int, my_peer_id: str) -> bool:
    """After writing JOINING and waiting the jitter: keep the stage only if nobody else is ONLINE or
    RECOVERING on it and our peer id is the smallest among the JOINING ones (ARCHITECTURE §5)."""
    others_active = [
        p for p in view.members(stage_idx)
        if p.peer_id != my_peer_id and is_alive(p.expiration_time, view.now)
        and p.record.state in (StageState.ONLINE, StageState.RECOVERING)
    ]
    if others_active:
        return False
    joining = sorted(
        p.peer_id for p in view.members(stage_idx)
        if is_alive(p.expiration_time, view.now) and p.record.state is StageState.JOINING
    )
    return bool(joining) and joining[0] == my_peer_id


def swarm_has_trained(view: SwarmView, num_stages: int) -> bool:
    """True once any live ONLINE stage reports a committed step: a stage taken now must be rebuilt from its
    neighbours rather than from the seeded init (ARCHITECTURE §5 step 3)."""
    return any(
        (owner := view.online_owner(i)) is not None and owner.record.step > 0 for i in range(num_stages + 1)
    )


def needs_recovery(view: SwarmView, stage_idx: int, num_stages: int) -> bool:
    """A stage that had trained must be rebuilt from its neighbours rather than from the seeded init:
    true when any live neighbour reports step > 0 (ARCHITECTURE §5 step 3)."""
    ring = num_stages + 1
    for idx in ((stage_idx - 1) % ring, (stage_idx + 1) % ring):
        owner = view.online_owner(idx)
        if owner is not None and owner.record.step > 0:
            return True
    return False


def parse_stage_entries(raw: object, now: float) -> tuple[PeerRecord, ...]:
    """Turn the DHT's `{subkey: ValueWithExpiration}` dict into live, well-formed PeerRecords."""
    if not isinstance(raw, Mapping):
        return ()
    out = []
    for subkey, item in raw.items():
        value = getattr(item, "value", None)
        expiration = getattr(item, "expiration_time", None)
        record = StageRecord.from_wire(value)
        if record is None or not isinstance(subkey, str) or expiration is None:
            continue
        if not is_alive(float(expiration), now):
            continue
        out.append(PeerRecord(peer_id=subkey, record=record, expiration_time=float(expiration)))
    return tuple(sorted(out, key=lambda p: p.peer_id))
