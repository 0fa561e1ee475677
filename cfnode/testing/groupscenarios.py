"""Stage-group scenarios (docs/groups.md) from (family, seed): `--replicas 2`, the tiny preset, L transformer
stages founded by the first L + 1 nodes, newcomers that join the groups (started by the fault plan when stage 0
commits a given step, so they arrive while training runs), and one family's fault:

| family | what happens |
|---|---|
| `join_race` | one newcomer per group, all started at the same instant, all want the first group: at most 2 members per group, each newcomer an exact copy or refused cleanly (it then joins another group); sometimes with delayed messages |
| `average_kill` | a member of a group is killed (or stalled) in the all-reduce: after it submitted, or once the round filled and before its results are delivered (the round fails for everyone); sometimes both members (a spare-less rebuild by the STANDBY newcomer), which may also refill a group |
| `download_kill` | a newcomer's exact copy (`rpc_get_weights` uid "state") is cut after some parts by killing its source, or the newcomer itself, or by stalling the source; a `--spare` rebuilds a group the kill emptied |
| `hop_kill` | a member of a full group is killed as a forward hop reaches it, mid-step (or, sometimes, as its backward does), or a follower of stage 0's group as its lead assigns it a microbatch: stage 0 sends that member's microbatches again through its sibling (a follower's: from the lead), no attempt aborts, no stage is rebuilt, the survivor trains on alone |
| `rebalance` | the only member of a group is killed and no spare waits: exactly one member of the largest group leaves it and rebuilds the empty stage; with L = 3 sometimes that mover is killed mid-rebuild, and exactly one member of the (new) largest group follows |

`KINDS` names the variant drawn (the family first). Seeds replay like the other scenarios'.
"""

from __future__ import annotations

import math
import random

from cfnode.testing.faults import DHTFaults, MessageFaults
from cfnode.testing.plan import AtTime, Fault, FaultPlan, OnAverage, OnEvent, OnRpc, Victim
from cfnode.testing.scenario import Scenario

FAMILIES = ("join_race", "average_kill", "download_kill", "rebalance", "hop_kill")
REPLICAS = 2
LATER = math.inf
"""A start time meaning "started by the fault plan"."""


def _starts(rng: random.Random, founders: int) -> list[float]:
    """The founders start within 0.4 s of each other (they race for the stages)."""
    return [round(rng.uniform(0.0, 0.4), 3) for _ in range(founders)]


def _start_on_step(names: list[str], step: int) -> list[OnEvent]:
    """Start `names` (in this order, at one instant) when stage 0 commits `step`."""
    return [OnEvent("step", Fault("start", Victim("node", n)), (("step", step),)) for n in names]


def generate_group(family: str, seed: int) -> Scenario:
    """`family`'s scenario for `seed` (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown group scenario family {family!r}")
    rng = random.Random(f"{seed}:groups:{family}")
    num_stages = rng.choice((2, 2, 3))
    founders = num_stages + 1
    latency = rng.uniform(0.01, 0.03)  # slower hops than the other scenarios': joins happen while training runs
    start = _starts(rng, founders)
    timed: list[AtTime] = []
    on_event: list[OnEvent] = []
    on_rpc: list[OnRpc] = []
    on_average: list[OnAverage] = []
    spares: list[str] = []
    steps = rng.randint(8, 12)
    join_at = rng.randint(1, 2)
    kinds = [family]
    messages, faults_until = MessageFaults(latency_s=latency), 0.0
    if family == "join_race":  # one newcomer per group, all at one instant: all want the first group
        extra = num_stages
        names = [f"n{i}" for i in range(founders + extra)]
        if rng.random() < 0.5:
            on_event += _start_on_step(names[founders:], join_at)
            kinds.append("during_training")
        else:  # before training: the admission waits for the first step boundary
            start += [round(start[-1] + rng.uniform(0.6, 1.2), 3)] * extra
            kinds.append("at_start")
        start += [LATER] * (len(names) - len(start))
        if rng.random() < 0.3:  # and the admissions' messages arrive late
            messages, faults_until = MessageFaults(latency_s=latency, delay=0.3, delay_max_s=0.3), 8.0
            kinds.append("delays")
    elif family == "average_kill":  # newcomers fill the groups (stage 1's first), one more waits as STANDBY
        extra = num_stages + 1
        names = [f"n{i}" for i in range(founders + extra)]
        start += [round(max(start) + rng.uniform(0.3, 0.8), 3)] * extra
        steps = rng.randint(12, 14)
        stage = 1  # the first group to fill: joins go to the smallest group, then the lowest stage
        phase = rng.choice(("submitted", "reducing", "reducing"))
        action = "kill" if rng.random() < 0.8 else "stall"
        victim = Victim("self") if phase == "submitted" else Victim("member", rng.randint(0, 1))
        nth = rng.randint(1, 3)
        on_average.append(OnAverage(phase, Fault(action, victim, rng.uniform(1.5, 4.0)), nth=nth, stage=stage))
        kinds += [phase, action]
        if phase == "reducing" and action == "kill" and rng.random() < 0.25:  # the whole group: a rebuild
            other = Victim("member", 1 - int(victim.value or 0))
            on_average.append(OnAverage(phase, Fault("kill", other), nth=nth, stage=stage))
            kinds.append("whole_group")
    elif family == "download_kill":  # a newcomer's copy cut by a kill of its source or of itself
        extra = 1
        names = [f"n{i}" for i in range(founders + extra + 1)]
        spares = [names[-1]]
        start.append(LATER)
        start.append(round(rng.uniform(0.8, 1.2), 3))  # the spare, once the founders hold their stages
        on_event += _start_on_step([names[founders]], join_at)
        who = rng.choice(("source", "newcomer", "source_stalled"))
        action = "stall" if who == "source_stalled" else "kill"
        fault = Fault(action, Victim("src" if who == "newcomer" else "dst"), rng.uniform(1.2, 4.0))
        on_rpc.append(OnRpc("get_weights", "part", fault, nth=rng.randint(1, 8), detail="state"))
        kinds.append(who)
    elif family == "hop_kill":  # the groups fill at once (one newcomer each); a member dies as a hop reaches it
        extra = num_stages
        names = [f"n{i}" for i in range(founders + extra)]
        start += [round(max(start) + rng.uniform(0.3, 0.8), 3)] * extra
        steps = rng.randint(11, 13)
        stage = rng.randint(1, num_stages)
        method = "forward" if rng.random() < 0.75 else "backward"
        num_mb = 2  # scenario.py's TrainConfig: the nth hop to the stage falls in step 4..8, when its group is full
        variant = random.Random(f"{seed}:groups:hop_kill:stage0")  # its own stream: the other draws stay as they were
        if variant.random() < 1 / 3:  # one newcomer more joins stage 0's group; it dies as its lead assigns it one
            names.append(f"n{len(names)}")
            start.append(start[-1])
            extra += 1
            phase = variant.choice(("before", "after"))  # after: it started the microbatch, its reply is lost
            on_rpc.append(OnRpc("assign", phase, Fault("kill", Victim("dst")), nth=variant.randint(2, 4)))
            kinds += [f"assign_{phase}", "stage0"]
            steps += 6  # the groups fill one admission at a time: its newcomer may be the last, at step ~11
        else:
            on_rpc.append(OnRpc(method, "before", Fault("kill", Victim("dst")),
                                nth=rng.randint(4 * num_mb, 8 * num_mb), to_stage=stage))
            kinds += [method, f"stage{stage}"]
    else:  # rebalance: groups of 2 except the last stage's, whose only member dies; no spare
        extra = num_stages - 1
        names = [f"n{i}" for i in range(founders + extra)]
        on_event += _start_on_step(names[founders:], join_at)
        start += [LATER] * extra
        on_event.append(OnEvent("member_admitted", Fault("kill", Victim("stage", num_stages)), nth=extra))
        if num_stages == 3 and rng.random() < 0.5:  # the mover dies mid-rebuild: another group gives one
            on_event.append(OnEvent("recovery_started", Fault("kill", Victim("self"))))
            steps = rng.randint(12, 14)
            kinds.append("mover_killed")
    return Scenario(seed=seed, num_stages=num_stages, spares=len(spares), steps=steps, start_at=tuple(start),
                    skews=(0.0,) * len(names), messages=messages,
                    dht=DHTFaults(latency_s=latency / 2), faults_until_s=faults_until,
                    plan=FaultPlan(tuple(timed), tuple(on_event), tuple(on_rpc), tuple(on_average)),
                    kinds=tuple(kinds), latency_s=latency, names=tuple(names), replicas=REPLICAS,
                    spare_names=tuple(spares), extra_nodes=extra)
