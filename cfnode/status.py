"""`cfnode status`: a short-lived client-mode DHT peer reads the run's records and renders the stage map."""

from __future__ import annotations

import asyncio
from typing import Any

from cfnode.config import NetworkConfig
from cfnode.errors import NoPeerReachableError
from cfnode.net.dht import SwarmDHT, create_dht
from cfnode.net.records import StageState

DEFAULT_MAX_STAGES = 64


def read_status(peers: tuple[str, ...], run_id: str, *, ttl_s: float) -> dict[str, Any]:
    if not peers:
        raise NoPeerReachableError("no --peers given")
    dht = create_dht(NetworkConfig(initial_peers=peers), client_mode=True)
    try:
        return asyncio.run(_read(dht, run_id, ttl_s))
    finally:
        dht.shutdown()


async def _read(dht: Any, run_id: str, ttl_s: float) -> dict[str, Any]:
    probe = SwarmDHT(dht, run_id=run_id, num_stages=0, ttl_s=ttl_s)
    meta = await probe.read_meta()
    num_stages = meta.num_stages if meta else DEFAULT_MAX_STAGES
    view = await SwarmDHT(dht, run_id=run_id, num_stages=num_stages, ttl_s=ttl_s).read_view()
    rows = []
    for idx in range(num_stages + 1):
        members = view.members(idx)
        if not members:
            if meta is not None:
                rows.append({"stage": idx, "peer": None, "state": "EMPTY", "step": None, "generation": None,
                             "grad_norm": None, "age_s": None})
            continue
        for p in members:
            rows.append({"stage": idx, "peer": p.peer_id, "state": p.record.state.value, "step": p.record.step,
                         "generation": p.record.generation, "grad_norm": round(p.record.grad_norm, 4),
                         "age_s": round(p.age_s(view.now, ttl_s), 1)})
    for p in view.standby:
        rows.append({"stage": None, "peer": p.peer_id, "state": StageState.STANDBY.value, "step": None,
                     "generation": None, "grad_norm": None, "age_s": round(p.age_s(view.now, ttl_s), 1)})
    empty = [r["stage"] for r in rows if r["state"] == "EMPTY"]
    trained = any((r["step"] or 0) > 0 and r["state"] == "ONLINE" for r in rows)
    return {"run_id": run_id, "num_stages": num_stages if meta else None,
            "model_config_hash": meta.model_config_hash if meta else None, "stages": rows,
            "empty_stages": empty,
            "unrecoverable": trained and not any(r["stage"] == 0 and r["state"] in ("ONLINE", "JOINING", "RECOVERING")
                                                 for r in rows)}


def render_table(snapshot: dict[str, Any]) -> str:
    head = f"run {snapshot['run_id']}: {snapshot['num_stages']} transformer stages, model {snapshot['model_config_hash']}"
    cols = ("stage", "peer", "state", "step", "generation", "grad_norm", "age_s")
    lines = [head, "  ".join(f"{c:>10}" if c != "peer" else f"{c:<16}" for c in cols)]
    for row in snapshot["stages"]:
        cells = []
        for c in cols:
            v = row[c]
            text = "-" if v is None else (str(v)[:16] if c == "peer" else str(v))
            cells.append(f"{text:<16}" if c == "peer" else f"{text:>10}")
        lines.append("  ".join(cells))
    if snapshot["empty_stages"]:
        lines.append(f"empty stages: {snapshot['empty_stages']}")
    return "\n".join(lines)
