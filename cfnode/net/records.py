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

from cfnode.config import PROTOCOL_VERSION, WIRE_DTYPES
from cfnode.device import COMPUTE_DTYPES


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
    generations: tuple[int, ...] = ()
    """The highest generation the writer knows for each stage 0..L: the swarm's memory of generations, which
    outlives any one holder's record (a claimant takes the maximum, plus one: generations never repeat)."""
    lost: tuple[tuple[int, int], ...] = ()
    """Stage 0 only: (stage, generation) of groups whose every member failed a ping after a failed hop. Readers
    treat those records as gone at once (the fast path: a spare claims without waiting for the ttl); a false
    alarm is safe, the rebuilt stage has a higher generation and the old members step down."""
    joined_from: str = ""
    """A member that joined a live stage group: the peer id of the member whose exact state it copied (it keeps
    the group's generation). Empty for the member that built or rebuilt the stage (the group's founder)."""
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
            "generations": [int(g) for g in self.generations],
            "joined_from": str(self.joined_from),
            "lost": [[int(i), int(g)] for i, g in self.lost],
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
                generations=_generations(value.get("generations", ())),
                joined_from=_peer_id(value.get("joined_from", "")),
                lost=_lost(value.get("lost", ())),
                version=int(value.get("version", 0)),
            )
        except (KeyError, ValueError, TypeError, OverflowError):
            return None


MAX_GENERATIONS_LISTED = 1024


def _lost(value: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_GENERATIONS_LISTED:
        raise ValueError("lost must be a short list")
    out = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError("lost entries are [stage, generation]")
        out.append((int(item[0]), int(item[1])))
    return tuple(out)


def _peer_id(value: object) -> str:
    if not isinstance(value, str) or len(value) > 128:
        raise ValueError("a peer id is a short string")
    return value


def _generations(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_GENERATIONS_LISTED:
        raise ValueError("generations must be a short list")
    out = tuple(int(g) for g in value)
    if any(g < 0 for g in out):
        raise ValueError("negative generation")
    return out


@dataclass(frozen=True, kw_only=True)
class MetaRecord:
    """`{run}:meta`, one copy per node (subkey: its owner marker): what every node of the run must agree on.
    The run's copy is the one `run_meta` picks."""

    num_stages: int
    model_config_hash: str
    recovery_mode: str = "checkfree"
    """Every node must route microbatches the same way (checkfree+ swaps edge stages)."""
    recovery_rule: str = "grad-avg"
    """How a lost middle stage is rebuilt: every rebuilder must use the run's rule."""
    microbatch_size: int = 8
    num_microbatches: int = 4
    """Every stage must expect the same activation shapes and microbatches per step."""
    clip_norm: float = 1.0
    """Every stage clips its gradient at the same norm (CheckFree weights by the post-clip norms)."""
    start_step: int = 0
    """Every stage counts steps from the same start (a resumed export's step)."""
    replicas: int = 1
    """The most members a stage group may have (1: one peer per stage, the others wait as spares)."""
    compute_dtype: str = "float32"
    """`--compute-dtype`: every stage autocasts alike (and float16 stages share the static loss scale)."""
    wire_dtype: str = "float32"
    """`--wire-dtype`: every stage encodes and expects hops alike (net/wire.py)."""
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"num_stages": self.num_stages, "model_config_hash": self.model_config_hash,
                                "recovery_mode": self.recovery_mode, "recovery_rule": self.recovery_rule,
                                "microbatch_size": self.microbatch_size, "num_microbatches": self.num_microbatches,
                                "clip_norm": self.clip_norm, "start_step": self.start_step,
                                "replicas": self.replicas, "version": self.version}
        for name in ("compute_dtype", "wire_dtype"):  # absent means float32: such a run's meta is what it always was
            if getattr(self, name) != "float32":
                wire[name] = getattr(self, name)
        return wire

    @classmethod
    def from_wire(cls, value: object) -> MetaRecord | None:
        if not isinstance(value, Mapping):
            return None
        try:
            clip_norm = float(value.get("clip_norm", 1.0))
            if not math.isfinite(clip_norm):
                return None
            return cls(num_stages=int(value["num_stages"]), model_config_hash=str(value["model_config_hash"]),
                       recovery_mode=str(value.get("recovery_mode", "checkfree")),
                       recovery_rule=str(value.get("recovery_rule", "grad-avg")),
                       microbatch_size=int(value.get("microbatch_size", 8)),
                       num_microbatches=int(value.get("num_microbatches", 4)), clip_norm=clip_norm,
                       start_step=int(value.get("start_step", 0)), replicas=int(value.get("replicas", 1)),
                       compute_dtype=_compute_dtype(value.get("compute_dtype", "float32")),
                       wire_dtype=_wire_dtype(value.get("wire_dtype", "float32")),
                       version=int(value.get("version", 0)))
        except (KeyError, ValueError, TypeError, OverflowError):
            return None


def _compute_dtype(value: object) -> str:
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {value!r}")
    return str(value)


def _wire_dtype(value: object) -> str:
    if value not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {value!r}")
    return str(value)


_MEMBER_ORDER = {"ONLINE": 0, "RECOVERING": 1, "JOINING": 2}


def run_meta(metas: Mapping[str, MetaRecord], view: SwarmView) -> MetaRecord | None:
    """The run's meta among the copies every node writes (peer id -> its MetaRecord): the copy of the live
    member of the lowest-numbered stage that wrote one (within a stage: the ONLINE owner first, then RECOVERING,
    then JOINING records, highest generation and smallest peer id first), else of a live spare (smallest peer
    id), else None (no live member wrote one: a fresh run). A copy from a peer not in the view is ignored, so
    an outsider's copy never decides."""
    if not metas:
        return None
    for idx in sorted(view.stages):
        members = sorted(
            (p for p in view.members(idx)
             if is_alive(p.expiration_time, view.now) and p.record.state.value in _MEMBER_ORDER),
            key=lambda p: (_MEMBER_ORDER[p.record.state.value], -p.record.generation, p.peer_id))
        for p in members:
            if p.peer_id in metas:
                return metas[p.peer_id]
    for p in sorted(view.standby, key=lambda p: p.peer_id):
        if is_alive(p.expiration_time, view.now) and p.record.state is StageState.STANDBY and p.peer_id in metas:
            return metas[p.peer_id]
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
        """The ONLINE owner of a stage: its group's lead (`group`), with one peer per stage the holder at the
        highest generation (two that raced: the smaller peer id)."""
        group = self.group(stage_idx)
        return group[0] if group else None

    def group(self, stage_idx: int) -> tuple[PeerRecord, ...]:
        """The stage's group, lead first: its ONLINE members at the highest ONLINE generation that joined by
        exact copy, and of those that founded it (built or rebuilt the stage) only the one whose id sorts first,
        the others step down (net/groups.py). The founder leads (for stage 0: drives); without one, the joiner
        whose id sorts first (it becomes the founder: node/process.py). With one peer per stage it is the owner
        alone."""
        online = [p for p in self.members(stage_idx) if p.record.state is StageState.ONLINE]
        if not online:
            return ()
        top = max(p.record.generation for p in online)
        at_top = [p for p in online if p.record.generation == top]
        founders = sorted((p for p in at_top if not p.record.joined_from), key=lambda p: p.peer_id)
        joiners = sorted((p for p in at_top if p.record.joined_from), key=lambda p: p.peer_id)
        return tuple(founders[:1] + joiners)

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


def swarm_has_trained(view: SwarmView, num_stages: int, start_step: int = 0) -> bool:
    """True once any live ONLINE stage reports a step committed after the run's `start_step`: a stage taken now
    must be rebuilt from its neighbours rather than from its initial weights (ARCHITECTURE §5 step 3)."""
    return any(
        (owner := view.online_owner(i)) is not None and owner.record.step > start_step for i in range(num_stages + 1)
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


# -- reading the swarm safely: incomplete reads, generation memory and bounds, claim confirmation --------

GENERATION_SLACK = 2
"""A record may claim at most this many generations above the highest one a reader knows for its stage. A
claimant takes the highest generation it knows plus one, so an honest record is within +1 of what a reader
that saw the previous claims knows; +2 leaves room for one claim the reader missed. A forged record at a huge
generation (which would fence the real owner and route the ring to the forger) is dropped."""


def merge_views(prev: SwarmView, new: SwarmView) -> SwarmView:
    """An incomplete read is not a loss: a record seen before that has not expired yet stays in the view when a
    read misses it. Per (stage, peer) the record with the later expiration wins, as in the DHT itself."""

    def merged(old: tuple[PeerRecord, ...], fresh: tuple[PeerRecord, ...]) -> tuple[PeerRecord, ...]:
        best = {p.peer_id: p for p in old if is_alive(p.expiration_time, new.now)}
        for p in fresh:
            held = best.get(p.peer_id)
            if held is None or p.expiration_time >= held.expiration_time:
                best[p.peer_id] = p
        return tuple(sorted(best.values(), key=lambda p: p.peer_id))

    indices = sorted(set(prev.stages) | set(new.stages))
    stages = {i: merged(prev.members(i), new.members(i)) for i in indices}
    return SwarmView(stages=stages, standby=merged(prev.standby, new.standby), now=new.now)


def bound_generations(view: SwarmView, known: Mapping[int, int], *, slack: int = GENERATION_SLACK
                      ) -> tuple[SwarmView, tuple[PeerRecord, ...]]:
    """Drop stage records whose generation exceeds what this reader knows for the stage by more than `slack`;
    returns (the view without them, the dropped records). A generation is also known when the ONLINE owner of
    another stage, itself within bounds, remembers it (`generations`): a reader that missed a few claims
    (stalled, or a run of failed rebuilds) still accepts the new owner, while a lone forger is not
    corroborated. A stage the reader knows nothing of yet is taken as read (trust on first read)."""

    def within(i: int, p: PeerRecord, allowed: Mapping[int, int]) -> bool:
        return i not in allowed or p.record.generation <= allowed[i] + slack

    first = {i: [p for p in ps if within(i, p, known)] for i, ps in view.stages.items()}
    allowed = dict(known)
    for j, ps in first.items():
        owner = SwarmView(stages={j: tuple(ps)}).online_owner(j)
        if owner is None:
            continue
        for i, g in enumerate(owner.record.generations):
            if i != j and i in allowed:
                allowed[i] = max(allowed[i], g)
    dropped: list[PeerRecord] = []
    stages: dict[int, tuple[PeerRecord, ...]] = {}
    for i, members in view.stages.items():
        kept = []
        for p in members:
            (kept if within(i, p, allowed) else dropped).append(p)
        stages[i] = tuple(kept)
    return SwarmView(stages=stages, standby=view.standby, now=view.now), tuple(dropped)


def learn_generations(view: SwarmView, known: Mapping[int, int], *, slack: int = GENERATION_SLACK
                      ) -> dict[int, int]:
    """The highest generation known for every stage after reading `view`: what we knew, every record's own
    generation, and the generations each stage's ONLINE owner remembers (within `slack` of what we knew), so
    a generation outlives the records of the holders that used it."""
    out = dict(known)
    for i, members in view.stages.items():
        for p in members:
            out[i] = max(out.get(i, 0), p.record.generation)
    for i in list(view.stages):
        owner = view.online_owner(i)
        if owner is None:
            continue
        for j, g in enumerate(owner.record.generations):
            if j in known and g > known[j] + slack:
                continue
            out[j] = max(out.get(j, 0), g)
    return out


def claim_rivals(view: SwarmView, stage_idx: int, my_peer_id: str, generation: int) -> tuple[PeerRecord, ...]:
    """Live records of another peer on `stage_idx` that our claim at `generation` must yield to: any ONLINE
    one (the stage was not empty after all: a holder we misread, or one that thawed, keeps it), and any
    RECOVERING one at our generation or above. Empty: we are the unique claimant (checked a claim jitter after
    announcing RECOVERING, right before ONLINE).

    A rival makes us yield whatever the peer ids: of two claimants whose writes reach each other within the
    jitter, the later one surely sees the earlier, but the earlier may not see the later, so a tie-break by id
    could let both through. Both yielding is resolved by the next JOINING round's tie-break."""
    return tuple(
        p for p in view.members(stage_idx)
        if p.peer_id != my_peer_id and is_alive(p.expiration_time, view.now)
        and (p.record.state is StageState.ONLINE
             or (p.record.state is StageState.RECOVERING and p.record.generation >= generation))
    )


def with_own_record(view: SwarmView, stage_idx: int | None, mine: PeerRecord) -> SwarmView:
    """The view with our own current record in it (we know it better than any read)."""
    if stage_idx is None:
        return view
    members = (*(p for p in view.members(stage_idx) if p.peer_id != mine.peer_id), mine)
    stages = dict(view.stages)
    stages[stage_idx] = tuple(sorted(members, key=lambda p: p.peer_id))
    return SwarmView(stages=stages, standby=view.standby, now=view.now)
