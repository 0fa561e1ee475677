"""What each stage-group scenario family (groupscenarios.py) must show besides the invariants: that its fault
fired and hit what it was meant to (`proof`), and what survived it. `run_group(family, seed)` runs one and returns
a picklable `GroupSummary` (batch.py runs many in worker processes); `missing` lists what was not shown.

Everything is read from the replayable trace (events, harness actions, all-reduce rounds) and the scenario's
`GroupFacts` (the participants of every committed step, states compared), never from wall time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cfnode.testing.groupscenarios import generate_group
from cfnode.testing.runner import Outcome, run_scenario


@dataclass(frozen=True)
class GroupSummary:
    family: str
    seed: int
    ok: bool
    """No invariant violated."""
    report: str
    proof: tuple[str, ...]
    """What the family's fault did, as shown by the trace."""
    missing: tuple[str, ...]
    """What the family had to show and did not."""
    kinds: tuple[str, ...]
    digest: str
    wall_s: float


@dataclass(frozen=True)
class Event:
    t: float
    who: str
    name: str
    fields: dict[str, Any]


class Trace:
    """Typed views of an outcome's trace rows."""

    def __init__(self, o: Outcome) -> None:
        self.o = o
        self.events = [Event(r[0], r[2], r[3], dict(r[4])) for r in o.trace if r[1] == "event"]
        self.actions = [(r[0], r[2], r[3], r[4]) for r in o.trace if r[1] == "action"]
        self.rounds = [(r[0], r[2], r[5], r[6]) for r in o.trace if r[1] == "average"]
        facts = o.groups
        assert facts is not None, "not a groups scenario"
        self.facts = facts

    def of(self, name: str, who: str | None = None, **match: Any) -> list[Event]:
        return [e for e in self.events if e.name == name and (who is None or e.who == who)
                and all(e.fields.get(k) == v for k, v in match.items())]

    def fault(self, label: str) -> tuple[float, str, str] | None:
        """(time, victim, action) of the first kill/stall whose reason mentions `label`."""
        return next(((t, who, action) for t, who, action, why in self.actions
                     if action in ("kill", "stall") and label in why), None)

    def faults(self, label: str) -> list[tuple[float, str, str]]:
        """(time, victim, action) of every kill/stall whose reason mentions `label`."""
        return [(t, who, action) for t, who, action, why in self.actions if action in ("kill", "stall")
                and label in why]

    def steps_after(self, t: float) -> list[Event]:
        return [e for e in self.of("step") if e.t > t]

    def online_stage(self, who: str, before: float = math.inf) -> int | None:
        """The stage `who` last went ONLINE on before `before`."""
        went = [e for e in self.of("online", who) if e.t <= before]
        return int(went[-1].fields["stage"]) if went else None

    def members_at(self, t: float) -> dict[int, tuple[str, ...]]:
        """Stage -> the nodes ONLINE on it at `t` (gone ONLINE, not since killed, stopped, fenced or moved)."""
        out: dict[int, list[str]] = {}
        for who in sorted({e.who for e in self.events}):
            stage = self.online_stage(who, t)
            if stage is None:
                since = 0.0
            else:
                since = [e for e in self.of("online", who) if e.t <= t][-1].t
            gone = any(since < e.t < t for e in self.events if e.who == who and e.name in ("fenced", "rebalancing"))
            gone |= any(since < at <= t for at, name, action, _ in self.actions
                        if name == who and action in ("kill", "stop"))
            if stage is not None and not gone:
                out.setdefault(stage, []).append(who)
        return {i: tuple(ms) for i, ms in sorted(out.items())}

    def rebuilt(self, stage: int, after: float) -> Event | None:
        """The first ONLINE of `stage` at a higher generation than it had at `after` (a CheckFree rebuild, or a
        fresh build if no step was committed yet), or None."""
        before = [int(e.fields["generation"]) for e in self.of("online", stage=stage) if e.t <= after]
        return next((e for e in self.of("online", stage=stage)
                     if e.t > after and int(e.fields["generation"]) > max(before, default=0)), None)

    def short(self, name: str) -> str:
        return self.facts.peer_ids[name][:12]


Check = Callable[[Trace], tuple[list[str], list[str]]]


def _join_attempts(tr: Trace) -> list[tuple[str, int, float, float, bool]]:
    """Every newcomer's join attempt: (node, stage, from, until, became a member)."""
    out = []
    ends = ("claimed", "online", "standby", "left")
    for i, e in enumerate(tr.events):
        if e.name != "claimed" or not e.fields.get("join"):
            continue
        nxt = next((x for x in tr.events[i + 1:] if x.who == e.who and x.name in ends), None)
        joined = nxt is not None and nxt.name == "online" and nxt.fields.get("stage") == e.fields["stage"]
        out.append((e.who, int(e.fields["stage"]), e.t, nxt.t if nxt is not None else math.inf, joined))
    return out


def check_join_race(tr: Trace) -> tuple[list[str], list[str]]:
    proof, missing = [], []
    attempts = _join_attempts(tr)
    races = [(a, b) for i, a in enumerate(attempts) for b in attempts[i + 1:]
             if a[0] != b[0] and a[1] == b[1] and a[2] < b[3] and b[2] < a[3]]
    if races:
        a, b = races[0]
        proof.append(f"{a[0]} and {b[0]} wanted stage {a[1]}'s group at once (t={max(a[2], b[2]):.3f})")
    else:
        missing.append("no two newcomers wanted one group at the same time")
    joined = [a for a in attempts if a[4]]
    refused = [a for a in attempts if not a[4]]
    if joined:
        proof.append("exact copies: " + ", ".join(f"{a[0]} into stage {a[1]}" for a in joined))
    else:
        missing.append("no newcomer joined a group")
    if refused:
        proof.append(f"{len(refused)} attempt(s) refused cleanly (the newcomer tried again or waited)")
    else:
        missing.append("no newcomer was refused")
    if tr.facts.compared == 0:
        missing.append("no two members' states were compared")
    return proof, missing


def check_average_kill(tr: Trace) -> tuple[list[str], list[str]]:
    proof, missing = [], []
    hits = tr.faults("all-reduce")
    if not hits:
        return proof, ["the all-reduce fault did not fire"]
    t, _, action = hits[0]
    victims = [v for _, v, _ in hits]
    stage = tr.online_stage(victims[0], t)
    proof.append(f"{action} {', '.join(victims)} (stage {stage}) in the all-reduce at t={t:.3f}")
    broken = [r for r in tr.rounds if r[0] >= t and r[3] != "averaged" and victims[0] in r[2]]
    if broken:
        proof.append(f"its round ended: {broken[0][3]}")
    elif action == "kill":
        missing.append(f"no all-reduce round with {victims[0]} failed after its kill")
    if action == "kill":
        late = [s for tt, s, ms in tr.facts.participants if tt > t
                and any(v in names for v in victims for names in ms.values())]
        if late:
            missing.append(f"a killed member took part in step {late[0]}")
    if "whole_group" in tr.o.scenario.kinds:
        rebuilt = tr.rebuilt(stage, t) if stage is not None else None
        if rebuilt is not None:
            proof.append(f"the group was lost; {rebuilt.who} rebuilt stage {stage} (generation "
                         f"{rebuilt.fields['generation']}) at t={rebuilt.t:.3f}")
        else:
            missing.append(f"stage {stage} lost its whole group and was not rebuilt")
    after = tr.steps_after(t)
    if not after:
        missing.append(f"no step was committed after the {action}")
    else:
        proof.append(f"{len(after)} step(s) committed after it, up to step {after[-1].fields['step']}")
    if tr.facts.compared == 0:
        missing.append("no two members' states were compared")
    return proof, missing


def check_download_kill(tr: Trace) -> tuple[list[str], list[str]]:
    proof, missing = [], []
    hit = tr.fault("rpc_get_weights (state)")
    if hit is None:
        return proof, ["no exact copy was cut"]
    t, victim, action = hit
    kinds = tr.o.scenario.kinds
    role = "the newcomer" if "newcomer" in kinds else "the source"
    proof.append(f"{action} {role} {victim} mid-copy at t={t:.3f}")
    if "newcomer" in kinds:
        gave_up = [e for e in tr.of("member_admission_timed_out") if e.t >= t
                   and e.fields.get("peer") == tr.short(victim)]
        if gave_up:
            proof.append(f"stage 0 stopped holding the ring for it at t={gave_up[0].t:.3f}")
        else:
            missing.append("stage 0 never stopped waiting for the killed newcomer")
    elif action == "stall":
        thawed = next((at for at, who, act, _ in tr.actions if who == victim and act == "thaw" and at > t), math.inf)
        early = [e for e in tr.of("joined_group") if t <= e.t < thawed and e.fields.get("source") == tr.short(victim)]
        if early:
            missing.append(f"{early[0].who} finished a copy of {victim} while it was frozen")
        else:
            proof.append(f"no copy of {victim} completed while it was frozen (until t={thawed:.3f})")
    else:
        stage = tr.online_stage(victim, t)
        copied = [e for e in tr.of("joined_group") if e.t >= t and e.fields.get("source") == tr.short(victim)]
        if copied:
            missing.append(f"{copied[0].who} joined as a copy of killed {victim}")
        rebuilt = tr.rebuilt(stage, t) if stage is not None else None
        if rebuilt is not None:
            proof.append(f"stage {stage}, emptied, was rebuilt by {rebuilt.who} at t={rebuilt.t:.3f}")
        else:
            missing.append(f"stage {stage} was not rebuilt after its only member died")
    after = tr.steps_after(t)
    if after:
        proof.append(f"{len(after)} step(s) committed after it")
    else:
        missing.append(f"no step was committed after the {action}")
    return proof, missing


def check_rebalance(tr: Trace) -> tuple[list[str], list[str]]:
    """Every move leaves the group that is the largest when it moves (never its last member) for the emptied
    stage; one move per loss (two when the first mover is killed mid-rebuild); the last mover rebuilt it."""
    proof, missing = [], []
    hit = tr.fault("member_admitted")
    if hit is None:
        return proof, ["the last member of a group was not killed"]
    t, victim, _ = hit
    emptied = tr.online_stage(victim, t)
    proof.append(f"killed {victim}, the only member of stage {emptied}, at t={t:.3f}")
    mover_killed = "mover_killed" in tr.o.scenario.kinds
    moves = [e for e in tr.of("rebalancing") if e.t > t]
    expected = 2 if mover_killed else 1
    if len(moves) != expected:
        missing.append(f"{len(moves)} rebalancing move(s), expected {expected}: "
                       + ", ".join(f"{e.who} from {e.fields.get('stage')}" for e in moves))
    for e in moves[:expected]:
        groups = tr.members_at(e.t - 1e-9)
        sizes = {i: len(ms) for i, ms in groups.items() if i > 0 and i != emptied}
        largest = min(sizes, key=lambda i: (-sizes[i], i))
        members = groups[largest]
        by_id = "the last" if e.who == max(members, key=lambda n: tr.facts.peer_ids[n]) else "not the last"
        proof.append(f"t={e.t:.3f} {e.who} ({by_id} by peer id of {', '.join(members)}) left stage "
                     f"{e.fields.get('stage')} for stage {e.fields.get('to_stage')}")
        if (e.fields.get("stage"), e.fields.get("to_stage")) != (largest, emptied) or e.who not in members \
                or len(members) < 2:
            missing.append(f"{e.who} should have come from the largest group (stage {largest}: "
                           f"{', '.join(members)}) to stage {emptied}")
        stayed = [n for n in members if n != e.who]
        left = [n for n in stayed if any(e.t < f.t for f in (*tr.of("fenced", n), *tr.of("rebalancing", n)))
                and not (mover_killed and e is moves[0])]
        if left:
            missing.append(f"stage {largest} lost more than {e.who}: {', '.join(left)}")
    if mover_killed:
        killed = tr.fault("recovery_started")
        if killed is None or not moves or killed[1] != moves[0].who:
            missing.append("the first mover was not killed mid-rebuild")
        else:
            proof.append(f"{killed[1]} was killed mid-rebuild at t={killed[0]:.3f}")
    if moves:
        last = moves[min(len(moves), expected) - 1]
        rebuilt = [r for r in tr.of("recovery_finished", last.who, stage=emptied) if r.t > last.t]
        if rebuilt:
            proof.append(f"{last.who} rebuilt stage {emptied} at t={rebuilt[0].t:.3f}")
        else:
            missing.append(f"{last.who} did not rebuild stage {emptied}")
    if not tr.steps_after(t):
        missing.append("no step was committed after the kill")
    return proof, missing


def check_hop_kill(tr: Trace) -> tuple[list[str], list[str]]:
    """The member killed as a hop reached it was routed around within the attempt: no abort, no rebuild."""
    proof, missing = [], []
    hit = tr.fault("rpc_")
    if hit is None:
        return proof, ["the hop fault did not fire"]
    t, victim, _ = hit
    stage = tr.online_stage(victim, t)
    siblings = [m for m in tr.members_at(t).get(stage, ()) if m != victim] if stage is not None else []
    proof.append(f"killed {victim} (stage {stage}) as a hop reached it at t={t:.3f}; its group: {siblings}")
    after = tr.steps_after(t)
    if not after:
        return proof, [*missing, "no step was committed after the kill"]
    proof.append(f"{len(after)} step(s) committed after it, up to step {after[-1].fields['step']}")
    if not siblings:
        return proof, missing  # its group was not full yet: a rebuild, like any lost stage
    rerouted = [e for e in tr.of("hop_rerouted") if e.t >= t and e.fields["peer"] == tr.short(victim)]
    if rerouted:
        proof.append(f"stage 0 sent microbatch(es) {rerouted[0].fields['microbatches']} of step "
                     f"{rerouted[0].fields['step']} again through {siblings}")
    else:
        missing.append(f"stage 0 did not route around {victim}")
    aborted = [e for e in tr.of("step_aborted") if t < e.t < after[0].t]
    if aborted:
        missing.append(f"the step in flight aborted: {aborted[0].fields['reason']} {aborted[0].fields['detail']}")
    if tr.rebuilt(stage, t) is not None:
        missing.append(f"stage {stage} was rebuilt although {siblings} lived")
    late = [s for tt, s, ms in tr.facts.participants if tt > t and victim in ms.get(stage, ())]
    if late:
        missing.append(f"the killed member took part in step {late[0]}")
    if tr.facts.compared == 0:
        missing.append("no two members' states were compared")
    return proof, missing


CHECKS: dict[str, Check] = {"join_race": check_join_race, "average_kill": check_average_kill,
                            "download_kill": check_download_kill, "rebalance": check_rebalance,
                            "hop_kill": check_hop_kill}


def run_group(key: tuple[str, int]) -> GroupSummary:
    """One family's scenario for one seed, its invariants and its family check."""
    family, seed = key
    o = run_scenario(seed, generate_group(family, seed))
    proof, missing = CHECKS[family](Trace(o))
    return GroupSummary(family, seed, o.ok, o.report(), tuple(proof), tuple(missing), o.scenario.kinds, o.digest,
                        o.wall_s)
