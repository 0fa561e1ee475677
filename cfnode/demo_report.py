"""What `cfnode demo` reports: the `--json-summary` built from every node's events (steps, losses, each kill and
what followed it: a member routed around, or a stage rebuilt, and the exact joins of stage groups) and
`loss.png`. Pure functions of the events, so they are tested without a swarm.
"""

from __future__ import annotations

import time
from typing import Any


def recoveries(kills: list[dict[str, Any]], all_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per --kill / --kill-group, what happened, from the nodes' own events: the loss of one member of a stage
    group (`loss` "member": the group carried on, `rebuilt` false, `how` "routed-around") or of the whole stage
    and its rebuild (`how` as the rebuild says, e.g. "grad-avg"), with the detection, rebuild and kill-to-serving
    times and the exact joins of the stage's group that followed (`how` "joined", never a rebuild)."""
    steps = sorted((e for e in all_events if e["event"] == "step"), key=lambda e: e["ts"])
    out = []
    for i, kill in enumerate(kills):
        t0 = kill["ts"]  # this kill's events: until the next kill of the same stage
        until = next((k["ts"] for k in kills[i + 1:] if k["stage"] == kill["stage"]), float("inf"))
        window = [e for e in all_events if t0 <= e["ts"] < until]
        row = _kill_row(kill, window)
        finished = sorted((e for e in window if e["event"] == "recovery_finished" and e.get("stage") == kill["stage"]),
                          key=lambda e: e["ts"])
        if finished:
            f = finished[0]
            row.update(rebuilt=True, rule=f.get("rule"), how=f.get("how"), kind=f.get("kind"), rebuilt_by=f.get("node"),
                       rebuild_s=f.get("duration_s"), fetch_s=f.get("fetch_s"), generation=f.get("generation"))
        serving_from = finished[0]["ts"] if finished else (t0 if kill.get("member_loss") else None)
        if serving_from is not None:
            row.update(_serving(steps, all_events, t0, serving_from))
        out.append(row)
    return out


def _kill_row(kill: dict[str, Any], window: list[dict[str, Any]]) -> dict[str, Any]:
    t0, member_loss = kill["ts"], bool(kill.get("member_loss"))
    detected = [e["ts"] for e in window if e["event"] in (
        "neighbour_unreachable", "neighbour_lost", "group_lost", "step_aborted", "waiting_for_stage")]
    nodes = kill.get("nodes", [kill["node"]])
    return {"stage": kill["stage"], "killed_at_step": kill["killed_at_step"], "nodes": nodes,
            "loss": "member" if member_loss else "stage", "members_before": kill.get("members_before", 1),
            "members_killed": len(nodes), "rebuilt": False, "rebuilt_by": None,
            "rule": None, "how": _member_loss_how(kill, window) if member_loss else None,
            "kind": "member-loss" if member_loss else None,
            "detect_s": round(min(detected) - t0, 3) if detected else None, "rebuild_s": None,
            "serving_s": None, "steps_aborted": None,
            "joins": [join_row(e) for e in window if e["event"] == "joined_group" and e.get("stage") == kill["stage"]]}


def _member_loss_how(kill: dict[str, Any], window: list[dict[str, Any]]) -> str:
    """A member of a group was lost: the others carried on ("routed-around"); for stage 0's lead, a follower
    took over driving ("takeover")."""
    if kill["stage"] == 0 and any(e["event"] == "stage0_takeover" for e in window):
        return "takeover"
    return "routed-around"


def _serving(steps: list[dict[str, Any]], all_events: list[dict[str, Any]], t0: float,
             since: float) -> dict[str, Any]:
    """serving_s: from the kill to the first step committed after `since` (the rebuild, or the kill itself when
    the group carried on); the steps aborted meanwhile; the loss over 5 steps before and after."""
    served = [e for e in steps if e["ts"] >= since]
    if not served:
        return {}
    before = [e["loss"] for e in steps if e["ts"] < t0][-5:]
    after = [e["loss"] for e in served[:5]]
    return {"serving_s": round(served[0]["ts"] - t0, 3),
            "steps_aborted": sum(1 for e in all_events if e["event"] == "step_aborted"
                                 and t0 <= e["ts"] <= served[0]["ts"]),
            "loss_before": round(sum(before) / len(before), 4) if before else None,
            "loss_after": round(sum(after) / len(after), 4) if after else None}


def join_row(e: dict[str, Any]) -> dict[str, Any]:
    """A `joined_group` event: a newcomer became an exact copy of a live member (no CheckFree, nothing lost)."""
    return {"stage": e.get("stage"), "node": e.get("node"), "how": "joined", "kind": "exact-copy",
            "source": e.get("source"), "step": e.get("step"), "generation": e.get("generation"),
            "duration_s": e.get("duration_s"), "ts": e["ts"]}


def summarize(events_by_node: dict[str, list[dict[str, Any]]], kills: list[dict[str, Any]], *,
              tokens_per_step: int, replicas: int, started: float) -> dict[str, Any]:
    """The demo's `--json-summary` from every node's events (name -> events) and the kills done."""
    all_events = [{**e, "node": name} for name, events in events_by_node.items() for e in events]
    steps = sorted((e for e in all_events if e["event"] == "step"), key=lambda e: e["ts"])
    vals = [e["val_loss"] for e in steps if e.get("val_loss") is not None]
    timed = steps[1:] if len(steps) > 1 else steps
    tokens_per_s = None
    if len(timed) >= 2:
        per_step = (timed[-1]["time"] - timed[0]["time"]) / (len(timed) - 1)
        tokens_per_s = tokens_per_step / per_step if per_step > 0 else None
    return {
        "steps_completed": steps[-1]["step"] if steps else 0,
        "loss_first": steps[0]["loss"] if steps else None,
        "loss_last": steps[-1]["loss"] if steps else None,
        "val_loss_first": vals[0] if vals else None,
        "val_loss_last": vals[-1] if vals else None,
        "tokens_per_s": tokens_per_s,
        "wall_s": round(time.time() - started, 1),
        "replicas": replicas,
        "recoveries": recoveries(kills, all_events),
        "joins": [join_row(e) for e in sorted(all_events, key=lambda e: e["ts"]) if e["event"] == "joined_group"],
        "steps": [{k: e.get(k) for k in ("step", "loss", "val_loss")} for e in steps],
        # each --kill / --kill-group as done: stage, at_step, killed_at_step, ts, node (the first victim), nodes,
        # whole_group, members_before, member_loss
        "kills": [dict(k) for k in kills],
        "events": sorted((e for e in all_events if e["event"] != "step"), key=lambda e: e["ts"]),
    }


def write_loss_plot(path: str, summary: dict[str, Any]) -> str:
    """Train and validation loss vs step; kills (red dashed; "kill member of N": one member of a stage group)
    and finished rebuilds (green dotted) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: dict[int, dict[str, Any]] = {e["step"]: e for e in summary["steps"]}  # a retried step: the last
    xs = sorted(steps)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(xs, [steps[x]["loss"] for x in xs], "-", color="tab:blue", linewidth=1.2, label="train loss")
    val = [(x, steps[x]["val_loss"]) for x in xs if steps[x].get("val_loss") is not None]
    if val:
        ax.plot([x for x, _ in val], [v for _, v in val], "o-", color="tab:orange", markersize=4,
                label="validation loss")
    for i, kill in enumerate(summary.get("kills", [])):
        ax.axvline(kill["killed_at_step"], color="tab:red", linestyle="--", linewidth=1,
                   label="kill -9 of a stage" if i == 0 else None)
        what = "member of " if kill.get("member_loss") else ""
        ax.annotate(f"kill {what}{kill['stage']}", (kill["killed_at_step"], 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", color="tab:red", fontsize=8)
    rebuilds = [e for e in summary["events"] if e["event"] == "recovery_finished"]
    for i, e in enumerate(rebuilds):
        ax.axvline(e.get("step", 0), color="tab:green", linestyle=":", linewidth=1.5,
                   label="stage rebuilt" if i == 0 else None)
        ax.annotate(f"rebuilt {e['stage']} ({e.get('how') or e.get('rule')})", (e.get("step", 0), 1),
                    xycoords=("data", "axes fraction"), xytext=(3, -24), textcoords="offset points",
                    color="tab:green", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy)")
    ax.set_title(f"cfnode demo: {summary['steps_completed']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
