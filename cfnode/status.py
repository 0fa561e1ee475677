"""`cfnode status`: a short-lived client-mode DHT peer reads the run's records and renders the stage map.

`snapshot()` and the renderers are pure (tests feed them a SwarmView); `read_status` reads once,
`watch_status` keeps one DHT peer and yields a fresh snapshot every interval (`cfnode status --watch`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from cfnode.config import NetworkConfig
from cfnode.errors import NoPeerReachableError
from cfnode.net.dht import SwarmDHT, create_dht
from cfnode.net.groups import group_throughput
from cfnode.net.identity import open_identity
from cfnode.net.records import MetaRecord, StageState, SwarmView, run_meta
from cfnode.net.validation import RunRecordValidator

DEFAULT_MAX_STAGES = 64
READ_TIMEOUT_S = 10.0
"""Deadline of each DHT read of `status` (a one-shot reader: no heartbeat to keep, unlike a node's ttl/3)."""
CLEAR_SCREEN = "\x1b[2J\x1b[H"


def read_status(peers: tuple[str, ...], run_id: str, *, ttl_s: float) -> dict[str, Any]:
    frames = watch_status(peers, run_id, ttl_s=ttl_s, interval_s=0.0, count=1)
    try:
        return next(frames)
    finally:
        frames.close()  # shuts the DHT peer down now, not at garbage collection


def watch_status(peers: tuple[str, ...], run_id: str, *, ttl_s: float, interval_s: float,
                 count: int | None = None) -> Iterator[dict[str, Any]]:
    """Snapshots of the run, one every `interval_s` (forever, or `count` of them), through one DHT peer.
    A read that times out yields `{"run_id", "error"}` and the watch goes on."""
    if not peers:
        raise NoPeerReachableError("no --peers given")
    identity = open_identity(None)  # a throwaway key: the reader signs nothing, but validates like a node
    validators = [identity.signature_validator(), RunRecordValidator(run_id, DEFAULT_MAX_STAGES, ttl_s=ttl_s)]
    dht = create_dht(NetworkConfig(initial_peers=peers), client_mode=True, validators=validators, identity=identity)
    loop = asyncio.new_event_loop()
    try:
        made = 0
        while count is None or made < count:
            if made:
                time.sleep(interval_s)
            try:
                yield loop.run_until_complete(_read(dht, run_id, ttl_s))
            except (TimeoutError, asyncio.TimeoutError) as e:
                yield {"run_id": run_id, "error": f"reading the DHT timed out: {e}"}
            made += 1
    finally:
        loop.close()
        dht.shutdown()


async def _read(dht: Any, run_id: str, ttl_s: float) -> dict[str, Any]:
    """The run's meta is the copy of its lowest live member (`run_meta`), so read the view first: as many
    stages as the largest copy claims (at most DEFAULT_MAX_STAGES), again if the run's own copy says otherwise."""
    metas = await SwarmDHT(dht, run_id=run_id, num_stages=0, ttl_s=ttl_s, timeout_s=READ_TIMEOUT_S).read_meta()
    num_stages = _stages_to_read(max((m.num_stages for m in metas.values()), default=DEFAULT_MAX_STAGES))
    view = await SwarmDHT(dht, run_id=run_id, num_stages=num_stages, ttl_s=ttl_s, timeout_s=READ_TIMEOUT_S).read_view()
    meta = run_meta(metas, view)
    if meta is not None and _stages_to_read(meta.num_stages) != num_stages:
        view = await SwarmDHT(dht, run_id=run_id, num_stages=_stages_to_read(meta.num_stages), ttl_s=ttl_s,
                              timeout_s=READ_TIMEOUT_S).read_view()
    return snapshot(run_id, meta, view, ttl_s=ttl_s)


def _stages_to_read(num_stages: int) -> int:
    return max(0, min(DEFAULT_MAX_STAGES, num_stages))


def snapshot(run_id: str, meta: MetaRecord | None, view: SwarmView, *, ttl_s: float) -> dict[str, Any]:
    """The run as one JSON-able dict: a row per live record (and per EMPTY stage when the run's size is
    known), each stage's group (members, generation, step, throughput and each member's share of it), the spares,
    the rebuilds in progress and whether stage 0 is lost for good."""
    num_stages = meta.num_stages if meta else max((i for i, ps in view.stages.items() if ps), default=0)
    rows = []
    for idx in range(num_stages + 1):
        members = view.members(idx)
        if not members:
            if meta is not None:
                rows.append({"stage": idx, "peer": None, "state": "EMPTY", "step": None, "generation": None,
                             "grad_norm": None, "throughput": None, "age_s": None})
            continue
        for p in members:
            rows.append({"stage": idx, "peer": p.peer_id, "state": p.record.state.value, "step": p.record.step,
                         "generation": p.record.generation, "grad_norm": round(p.record.grad_norm, 4),
                         "throughput": round(p.record.throughput, 2), "age_s": round(p.age_s(view.now, ttl_s), 1),
                         "joined_from": p.record.joined_from or None})
    for p in view.standby:
        rows.append({"stage": None, "peer": p.peer_id, "state": StageState.STANDBY.value, "step": None,
                     "generation": None, "grad_norm": None, "age_s": round(p.age_s(view.now, ttl_s), 1)})
    empty = [r["stage"] for r in rows if r["state"] == "EMPTY"]
    trained = any((r["step"] or 0) > 0 and r["state"] == "ONLINE" for r in rows)
    online = sorted({r["stage"] for r in rows if r["state"] == "ONLINE"})
    groups = []
    for idx in range(num_stages + 1):
        group = view.group(idx)
        if group:
            total = group_throughput(group)
            groups.append({"stage": idx, "members": [p.peer_id for p in group],
                           "generation": group[0].record.generation, "step": max(p.record.step for p in group),
                           "throughput": round(total, 2),
                           "load": [round(p.record.throughput / total, 3) if total > 0 else None for p in group]})
    return {"run_id": run_id, "num_stages": num_stages if meta else None,
            "replicas": meta.replicas if meta else None, "groups": groups,
            "model_config_hash": meta.model_config_hash if meta else None, "stages": rows,
            "empty_stages": empty, "online_stages": online,
            "spares": [r["peer"] for r in rows if r["state"] == StageState.STANDBY.value],
            "recovering": [{"stage": r["stage"], "peer": r["peer"], "generation": r["generation"],
                            "age_s": r["age_s"]} for r in rows if r["state"] == StageState.RECOVERING.value],
            "unrecoverable": trained and not any(r["stage"] == 0 and r["state"] in ("ONLINE", "JOINING", "RECOVERING")
                                                 for r in rows)}


def render_table(snapshot: dict[str, Any]) -> str:
    if "error" in snapshot:
        return f"run {snapshot['run_id']}: {snapshot['error']}"
    head = f"run {snapshot['run_id']}: {snapshot['num_stages']} transformer stages, model {snapshot['model_config_hash']}"
    cols = ("stage", "peer", "state", "step", "generation", "grad_norm", "throughput", "age_s")
    lines = [head, "  ".join(f"{c:>10}" if c != "peer" else f"{c:<16}" for c in cols)]
    for row in snapshot["stages"]:
        cells = []
        for c in cols:
            v = row.get(c)
            text = "-" if v is None else (str(v)[:16] if c == "peer" else str(v))
            cells.append(f"{text:<16}" if c == "peer" else f"{text:>10}")
        lines.append("  ".join(cells))
    if snapshot["empty_stages"]:
        lines.append(f"empty stages: {snapshot['empty_stages']}")
    for g in snapshot.get("groups", []):
        if len(g["members"]) > 1 or (snapshot.get("replicas") or 1) > 1:
            shares = ", ".join("-" if x is None else f"{100 * x:.0f}%" for x in g["load"])
            lines.append(f"group of stage {g['stage']}: {len(g['members'])} of {snapshot.get('replicas') or '?'} "
                         f"members, generation {g['generation']}, step {g['step']}, {g['throughput']} "
                         f"microbatches/s (shares {shares})")
    spares = snapshot.get("spares", [])
    lines.append(f"spares (STANDBY): {len(spares)}" + (f" ({', '.join(p[:16] for p in spares)})" if spares else ""))
    for r in snapshot.get("recovering", []):
        lines.append(f"recovering: stage {r['stage']} being rebuilt by {r['peer'][:16]} "
                     f"(generation {r['generation']}, {r['age_s']}s since its last heartbeat)")
    if snapshot.get("unrecoverable"):
        lines.append("UNRECOVERABLE: stage 0 is lost and the swarm had trained")
    return "\n".join(lines)


def render_frame(snapshot: dict[str, Any], *, interval_s: float, clear: bool, now: float | None = None) -> str:
    """One `--watch` screen: clear (on a terminal), a header with the time and refresh period, the table."""
    stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if now is None else now))
    head = f"{CLEAR_SCREEN if clear else ''}cfnode status  {stamp}  every {interval_s:g}s (Ctrl-C to stop)"
    return f"{head}\n{render_table(snapshot)}"
