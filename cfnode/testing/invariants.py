"""The properties every scenario must keep, as plain functions over what the harness recorded. Each returns a
list of violations (empty: holds); a message says which invariant, and what happened when.
"""

from __future__ import annotations

import re
from typing import Any

from cfnode.testing.cluster import Cluster, HarnessNode
from cfnode.testing.memberstate import GroupSizes
from cfnode.testing.memdht import Write
from cfnode.testing.patches import Ledger


def _stage_of_key(run_id: str, key: str) -> int | None:
    m = re.fullmatch(re.escape(run_id) + r":stage:(\d+)", key)
    return int(m.group(1)) if m else None


def single_online_owner(writes: list[Write], run_id: str, name_of: Any = str) -> list[str]:
    """(1) Over the whole DHT write history, at most one peer ever announced itself ONLINE for a given
    (stage, generation)."""
    owners: dict[tuple[int, int], dict[str, float]] = {}
    for w in writes:
        stage = _stage_of_key(run_id, w.key)
        if w.outcome != "stored" or stage is None or not isinstance(w.value, dict):
            continue
        if w.value.get("state") != "ONLINE":
            continue
        owners.setdefault((stage, int(w.value.get("generation", 0))), {}).setdefault(w.writer, w.time)
    out = []
    for (stage, gen), who in sorted(owners.items()):
        if len(who) > 1:
            listed = ", ".join(f"{name_of(p)} from t={t:.3f}" for p, t in who.items())
            out.append(f"[single-owner] stage {stage} generation {gen} had {len(who)} ONLINE owners: {listed}")
    return out


def updates_match_steps(ledger: Ledger) -> list[str]:
    """(2) For every StageWorker: step == the step it was built/installed at + its optimizer's step() calls."""
    out = []
    for entry in ledger.workers:
        base, count = entry.current()
        w = entry.worker
        skipped = int(getattr(w, "skipped", 0))  # steps the swarm passed without an update (non-finite grad)
        if count < 0:
            out.append(f"[updates] {entry.node} stage {w.stage_idx}: its optimizer was replaced outside "
                       "install()/restore()")
            continue
        if w.step != base + count + skipped:
            out.append(f"[updates] {entry.node} stage {w.stage_idx}: worker.step is {w.step} but it was installed "
                       f"at step {base}, its optimizer stepped {count} time(s) and {skipped} step(s) were skipped")
        own = getattr(w, "updates", None)  # the worker's own bookkeeping, when it keeps one
        if own is not None and own != count:
            out.append(f"[updates] {entry.node} stage {w.stage_idx}: the worker counts {own} update(s), its optimizer "
                       f"stepped {count} time(s)")
    return out


def contiguous_steps(cluster: Cluster) -> list[str]:
    """(3) Each stage-0 driver committed steps start+1, start+2, ... with no gap or repeat; no step was committed
    by two drivers."""
    out, seen = [], {}
    for h in cluster.nodes.values():
        for driver, start in h.drivers:
            steps = [int(r["step"]) for r in driver.history]
            expected = list(range(start + 1, start + 1 + len(steps)))
            if steps != expected:
                out.append(f"[contiguous] {h.name}'s driver (from step {start}) committed steps {steps}")
            for s in steps:
                if s in seen and seen[s] != h.name + str(id(driver)):
                    out.append(f"[contiguous] step {s} committed by two drivers ({h.name} and another)")
                seen[s] = h.name + str(id(driver))
    return out


def microbatch_accounting(cluster: Cluster) -> list[str]:
    """(4) issued == committed + dropped for every driver (plus, for a driver the harness stopped or killed
    mid-attempt, that attempt's microbatches)."""
    out = []
    for h in cluster.nodes.values():
        for driver, _ in h.drivers:
            st = driver.stats
            in_flight = 0  # a driver cancelled mid-attempt accounts for it itself (dropped, reason "cancelled")
            if st["issued"] != st["committed"] + st["dropped"] + in_flight:
                out.append(f"[accounting] {h.name}: issued {st['issued']} != committed {st['committed']} + dropped "
                           f"{st['dropped']}" + (f" + {in_flight} interrupted" if in_flight else ""))
    return out


def clean_teardown(pending: list[str], threads_before: list[str], threads_after: list[str]) -> list[str]:
    """(5) After teardown no task of any node is pending and no thread was left behind."""
    out = [f"[teardown] task still pending: {p}" for p in pending]
    extra = sorted(set(threads_after) - set(threads_before))
    out += [f"[teardown] thread left running: {t}" for t in extra]
    return out


def no_crashes(cluster: Cluster) -> list[str]:
    """(6) A live node never dies of an error: Node.run() does not raise, its tasks do not fail, its RPC
    handlers answer (typed rejections) rather than raise."""
    out = []
    for h in cluster.nodes.values():
        if h.crash:
            out.append(f"[crash] {h.name}: {h.crash}")
        out += [f"[task] {h.name}: {f}" for f in h.task_failures]
    for t, dst, method, err in cluster.net.handler_errors:
        out.append(f"[handler] t={t:.3f} rpc_{method} on {cluster.name_of(dst)} raised {err}")
    return out


def dead_stay_silent(cluster: Cluster) -> list[str]:
    """(harness) kill -9 means kill -9: nothing a node wrote lands in the DHT after it was killed (its
    OFFLINE goodbye included)."""
    out = []
    for w in cluster.dht.writes:
        h = cluster.by_peer.get(w.writer)
        if h is not None and h.killed_order is not None and w.order > h.killed_order and w.outcome == "stored":
            out.append(f"[kill-model] {h.name} was killed at t={h.killed_at:.3f} but its write of {w.key} "
                       f"landed at t={w.time:.3f}")
    return out


def trained_since(writes: list[Write]) -> float | None:
    """When the swarm first recorded a committed step (any stored record with step > 0)."""
    return next((w.time for w in writes if w.outcome == "stored" and isinstance(w.value, dict)
                 and int(w.value.get("step", 0) or 0) > 0), None)


def why_unrecoverable(cluster: Cluster, num_stages: int) -> str | None:
    """Why this swarm could not be expected to finish (None: it could). A stage-0 loss after training started
    counts only while no live node serves stage 0 again: checkfree+, redundant and checkpoint rebuild it."""
    trained = trained_since(cluster.dht.writes)
    for h in cluster.nodes.values() if cluster.serving(0) is None else ():
        lost_at = h.lost_at(cluster.teardown_at)
        if lost_at is None or h.finished or h.stage_when_lost != 0:
            continue
        if trained is not None and trained <= lost_at:
            how = "killed" if h.killed_at is not None else "stopped"
            return (f"stage 0's node {h.name} was {how} at t={lost_at:.3f}, after training started: checkfree "
                    "cannot rebuild stage 0")
    left = [h for h in cluster.nodes.values() if h.lost_at(cluster.teardown_at) is None]
    if len(left) < num_stages + 1 and not any(h.finished for h in cluster.nodes.values()):
        return f"only {len(left)} node(s) left for {num_stages + 1} stages"
    return None


def finished_node(cluster: Cluster) -> HarnessNode | None:
    return next((h for h in cluster.nodes.values() if h.finished), None)


def progress(cluster: Cluster, num_stages: int, target_step: int, limit_s: float) -> tuple[list[str], str]:
    """(7) A recoverable swarm reaches the target step within the limit. Returns (violations, summary)."""
    done = finished_node(cluster)
    if done is not None:
        step = done.node.worker.step if done.node.worker is not None else -1
        if step != target_step:
            return [f"[progress] {done.name} finished at step {step}, not {target_step}"], "finished"
        return [], f"reached step {target_step}"
    why = why_unrecoverable(cluster, num_stages)
    if why is not None:
        return [], f"not required to finish: {why}"
    best = max((d.worker.step if (d := h.node).worker is not None and h.node.stage == 0 else 0
                for h in cluster.nodes.values()), default=0)
    return [f"[progress] a recoverable swarm did not reach step {target_step} within {limit_s:.0f}s virtual "
            f"(stage 0 at step {best})"], "stuck"


def group_size(sizes: GroupSizes) -> list[str]:
    """(groups) A stage group never has more than `replicas` members: not in the DHT's records, not among the
    participants of a committed step."""
    return [f"[group-size] {o}" for o in sizes.over]


def identical_members(cluster: Cluster) -> list[str]:
    """(groups) After every applied step, every member of a group at that (stage, generation, step) holds
    bit-identical weights and Adam state (`torch.equal`); a newcomer equals its group at the step it copied."""
    states = cluster.states
    return [] if states is None else [f"[identical] {m}" for m in states.mismatches]
