"""`cfnode demo`: the main job in one command. Starts a bootstrap, L+1 stage nodes (with `--replicas K`, K
members for each transformer stage) and spares as real OS processes on 127.0.0.1, follows stage 0's event log
with a progress bar, and stops everything it started (SIGTERM, then SIGKILL of each process group) on exit,
error or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import click
from tqdm import tqdm

from cfnode.config import PRESETS, WIRE_DTYPES, GroupConfig
from cfnode.demo_report import summarize, write_loss_plot
from cfnode.device import check_compute_dtype, parse_device
from cfnode.errors import EXIT_UNRECOVERABLE, ConfigError
from cfnode.localswarm import JOIN_LINE, Proc, Swarm, read_events, signal_group, wait_for_event, wait_for_line

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    stages: int = 4
    steps: int = 300
    preset_name: str = "small"
    workdir: str | None = None
    json_summary: str | None = None
    spares: int = 1
    microbatches: int = 4
    microbatch_size: int = 8
    lr: float = 1e-3
    val_every: int = 25
    heartbeat_period: float = 2.0
    heartbeat_ttl: float = 8.0
    kill: tuple[str, ...] = ()
    """STAGE@STEP: SIGKILL the process holding STAGE once STEP steps have committed (repeatable). With
    `replicas` > 1: one member of the stage's group (the longest-serving one); the group carries on, no rebuild."""
    kill_group: tuple[str, ...] = ()
    """STAGE@STEP: SIGKILL every member of STAGE's group at once, so a spare rebuilds it with CheckFree
    (repeatable). With `replicas` 1 the same as `kill`."""
    replicas: int = 1
    """Members started for every stage (`join --replicas`, run-wide); stage 0's lead drives, all its members run a
    share of its microbatches, and a follower takes over when the lead dies."""
    recovery_rule: str = "grad-avg"
    recovery: str = "checkfree"
    """checkfree or checkfree+ (every stage, stage 0 included, survives a kill; needs --stages >= 4), or the
    baselines checkpoint (store in WORKDIR/checkpoints) and redundant."""
    checkpoint_every: int = 50
    export_dir: str | None = None
    """Where stage 0 writes the trained model at the end (default WORKDIR/export)."""
    prompt: str = "ROMEO."
    """The prompt of the sample printed at the end (sampled with seed 0: the same model gives the same text)."""
    seed: int = 0
    """Every node's data order seed and initial-weights seed (`join --seed`, `--init-seed`)."""
    device: str = "cpu"
    """`join --device` of every node (the CLI resolves `auto` once, on this machine)."""
    compute_dtype: str = "float32"
    """`join --compute-dtype` of every node (run-wide)."""
    wire_dtype: str = "float32"
    """`join --wire-dtype` of every node (run-wide)."""

    def kill_plan(self) -> list[Kill]:
        """Every --kill and --kill-group, in the order they are due (the order given among equal steps)."""
        plan = [_parse_kill("--kill", item, self.stages, whole_group=False) for item in self.kill]
        plan += [_parse_kill("--kill-group", item, self.stages, whole_group=True) for item in self.kill_group]
        return sorted(plan, key=lambda k: k.step)

    def __post_init__(self) -> None:
        self.kill_plan()
        if self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.preset_name not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset_name!r}")
        if self.recovery == "checkfree+" and self.stages < 4:
            raise ConfigError(f"--recovery checkfree+ needs --stages >= 4, got {self.stages}")
        GroupConfig(replicas=self.replicas)  # --replicas must be 1..16
        parse_device(self.device)
        check_compute_dtype(self.compute_dtype)
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.kill_group and self.spares < 1:
            raise ConfigError(f"--kill-group needs a spare to rebuild the stage: --spares must be >= 1, "
                              f"got {self.spares}")


@dataclass(frozen=True)
class Kill:
    """One --kill (one member: the stage's holder with one peer per stage) or --kill-group (every member)."""

    stage: int
    step: int
    whole_group: bool


def _parse_kill(flag: str, item: str, stages: int, *, whole_group: bool) -> Kill:
    stage, sep, step = item.partition("@")
    if not sep or not stage.isdigit() or not step.isdigit():
        raise ConfigError(f"{flag} takes STAGE@STEP, e.g. 2@40; got {item!r}")
    if not 0 <= int(stage) <= stages:
        raise ConfigError(f"{flag} {item}: stage must be 0..{stages}")
    return Kill(int(stage), int(step), whole_group)


@dataclass
class Starter:
    """Starts the demo's nodes: stage holders, extra group members pinned to a stage, spares."""

    swarm: Swarm
    common: list[str]
    replicas: int
    spares_started: int = 0

    def node(self, name: str, stage: int) -> Proc:
        return self.swarm.spawn(name, ["join", *self.common, "--stage", str(stage)], events=True)

    def spare(self) -> Proc:
        """A spare waits as STANDBY (with groups: `--spare`, or it would join a live group) to rebuild a stage."""
        self.spares_started += 1
        extra = ["--spare"] if self.replicas > 1 else []
        return self.swarm.spawn(f"spare{self.spares_started - 1}", ["join", *self.common, *extra], events=True)

    def member(self, stage: int) -> Proc:
        """One more member of `stage`'s live group: `--stage N` with N held joins N's group by exact copy."""
        taken = sum(1 for p in self.swarm.procs if p.name.startswith(f"stage{stage}m"))
        return self.node(f"stage{stage}m{taken + 1}", stage)

    def start(self, num_stages: int, spares: int) -> None:
        """One holder per stage 0..L, then the spares, so they wait as STANDBY. With groups, the founders of
        1..L first, then their extra members and stage 0, so the members join at the first step boundaries
        (stage 0 admits them, holding the ring while each copies a founder's state); stage 0's other members
        boot with it (the one that claims first leads, the others join it at its first step boundaries); the
        spares start once stage 0 is claimed (no empty stage left for them), booting while the members join
        rather than later under the training's load."""
        if self.replicas == 1:
            procs = [self.node(f"stage{idx}", idx) for idx in range(num_stages + 1)]
            for proc in procs:
                wait_for_event(proc, "online", 180)
            for _ in range(spares):
                self.spare()
            return
        founders = [self.node(f"stage{idx}", idx) for idx in range(1, num_stages + 1)]
        for proc in founders:
            wait_for_event(proc, "online", 180)
        members = [self.member(idx) for idx in range(1, num_stages + 1) for _ in range(self.replicas - 1)]
        head = self.node("stage0", 0)
        members += [self.member(0) for _ in range(self.replicas - 1)]  # stage 0's followers: they join the lead
        wait_for_event(head, "claimed", 180)
        for _ in range(spares):
            self.spare()
        for proc in [head, *members]:
            wait_for_event(proc, "online", 180)


def run_flags(options: DemoOptions, workdir: str) -> list[str]:
    """The `cfnode join` flags every node of the demo's run gets, apart from the network and the export: what the
    local engine of `cfnode experiment` configures its in-process nodes with too."""
    flags = ["--preset", options.preset_name, "--stages", str(options.stages), "--run-id", "demo", "--threads", "1",
             "--microbatches", str(options.microbatches), "--microbatch-size", str(options.microbatch_size),
             "--lr", str(options.lr), "--val-every", str(options.val_every),
             "--heartbeat-period", str(options.heartbeat_period),
             "--heartbeat-ttl", str(options.heartbeat_ttl), "--recovery-rule", options.recovery_rule,
             "--recovery", options.recovery, "--seed", str(options.seed), "--init-seed", str(options.seed)]
    if options.recovery == "checkpoint":
        flags += ["--checkpoint-dir", os.path.join(workdir, "checkpoints"),
                  "--checkpoint-every", str(options.checkpoint_every)]
    flags += ["--max-steps", str(options.steps)]  # only the stage-0 holder drives, whoever it is
    flags += ["--replicas", str(options.replicas)]  # run-wide: every node sizes the groups alike
    flags += ["--device", options.device, "--compute-dtype", options.compute_dtype, "--wire-dtype", options.wire_dtype]
    return flags


def run_demo(options: DemoOptions) -> int:
    workdir = options.workdir or tempfile.mkdtemp(prefix="cfnode-demo-")
    os.makedirs(workdir, exist_ok=True)
    swarm = Swarm(workdir)
    export_dir = os.path.abspath(options.export_dir or os.path.join(workdir, "export"))
    exported: dict[str, Any] | None = None
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill <demo>` cleans up like Ctrl-C
    logger.info("demo workdir: %s", workdir)
    try:
        boot = swarm.spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                         "--identity-path", os.path.join(workdir, "bootstrap.id")])
        peer = wait_for_line(boot, JOIN_LINE, 60).group(1)
        common = ["--peers", peer, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *run_flags(options, workdir),
                  "--export-dir", export_dir]  # the stage-0 holder exports at --max-steps, before it leaves
        starter = Starter(swarm, common, options.replicas)
        starter.start(options.stages, options.spares)
        code = _follow(options, swarm, starter)
        if code == 0:
            exported = _wait_for_export(swarm)
    except KeyboardInterrupt:
        logger.warning("interrupted; stopping every process the demo started")
        code = 130
    finally:
        swarm.stop()
        signal.signal(signal.SIGTERM, previous)
    summary = summarize({p.name: read_events(p.events_path) for p in swarm.procs}, swarm.kills,
                        tokens_per_step=options.microbatches * options.microbatch_size
                        * PRESETS[options.preset_name].seq_len, replicas=options.replicas, started=started)
    summary.update(_results(options, summary, workdir, export_dir if exported else None))
    if options.json_summary:
        with open(options.json_summary, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    logger.info("demo finished: %d steps, loss %s -> %s, val loss %s -> %s, %.0f tokens/s, logs in %s",
                summary["steps_completed"], _fmt(summary["loss_first"]), _fmt(summary["loss_last"]),
                _fmt(summary["val_loss_first"]), _fmt(summary["val_loss_last"]), summary["tokens_per_s"] or 0,
                workdir)
    if summary["loss_png"]:
        click.echo(f"loss curve:  {summary['loss_png']}")
    if summary["export_dir"]:
        click.echo(f"model:       {summary['export_dir']}  (step {exported['step'] if exported else '-'}; "
                   f"cfnode generate --model {summary['export_dir']} --prompt '...')")
    if summary["sample"] is not None:
        click.echo(f"sample:      {summary['sample']!r}")
    return code


EXPORT_WAIT_S = 600.0


def _wait_for_export(swarm: Swarm) -> dict[str, Any] | None:
    """Stage 0 exports after its last step and then exits: wait for its `exported` event (None if it failed)."""
    proc = next((p for p in swarm.procs if any(e["event"] == "training_finished" for e in read_events(p.events_path))),
                None)
    if proc is None:
        return None
    deadline = time.monotonic() + EXPORT_WAIT_S
    while time.monotonic() < deadline:
        done = [e for e in read_events(proc.events_path) if e["event"] == "exported"]
        if done:
            return done[-1]
        if not proc.alive():
            break
        time.sleep(0.25)
    logger.error("stage 0 did not export the model; see %s", proc.log_path)
    return None


def _results(options: DemoOptions, summary: dict[str, Any], workdir: str, export_dir: str | None) -> dict[str, Any]:
    """What the run produced: loss.png, the export (annotated with how stages were rebuilt) and a sample."""
    out: dict[str, Any] = {"loss_png": None, "export_dir": export_dir, "sample": None}
    try:
        out["loss_png"] = write_loss_plot(os.path.join(workdir, "loss.png"), summary)
    except Exception as e:  # noqa: BLE001 - a failed plot must not hide the run's result
        logger.warning("could not draw loss.png: %s", e)
    if export_dir is None:
        return out
    from cfnode.export import annotate_rebuilds
    from cfnode.generate import GenerateOptions, generate_text

    rebuilt = {e["stage"]: e.get("how") or e.get("rule") for e in summary["events"]
               if e["event"] == "recovery_finished"}
    annotate_rebuilds(export_dir, rebuilt)
    out["sample"] = generate_text(GenerateOptions(model_dir=export_dir, prompt=options.prompt, max_new_tokens=48,
                                                  temperature=0.8, seed=0))
    return out


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def groups(procs: list[Proc]) -> dict[int, list[Proc]]:
    """Which live processes serve each stage, longest-serving first, from the processes' own events: a process
    serves the stage of its latest ONLINE unless it was fenced since."""
    found: dict[int, list[tuple[float, Proc]]] = {}
    for proc in procs:
        if not proc.alive():
            continue
        events = read_events(proc.events_path)
        online = [e for e in events if e["event"] == "online"]
        if not online or any(e["event"] == "fenced" and e["ts"] >= online[-1]["ts"] for e in events):
            continue
        found.setdefault(online[-1]["stage"], []).append((online[-1]["ts"], proc))
    return {stage: [p for _, p in sorted(members, key=lambda m: m[0])] for stage, members in found.items()}


def _latest_mark(proc: Proc) -> dict[str, Any] | None:
    """A live process's latest claimed / online / standby event (None: dead, or none yet)."""
    if not proc.alive():
        return None
    marks = [e for e in read_events(proc.events_path) if e["event"] in ("claimed", "online", "standby")]
    return marks[-1] if marks else None


def _joining(procs: list[Proc], stage: int) -> list[Proc]:
    """Live processes whose latest claim is of `stage` and that are not ONLINE on it yet (copying a member)."""
    return [p for p in procs if (m := _latest_mark(p)) and m["event"] == "claimed" and m.get("stage") == stage]


def _standby(procs: list[Proc]) -> bool:
    return any((m := _latest_mark(p)) and m["event"] == "standby" for p in procs)


def victims(kill: Kill, held: dict[int, list[Proc]], nodes: list[Proc], replicas: int) -> list[Proc]:
    """Whom `kill` SIGKILLs now ([] while it is not due yet on membership): the stage's holder with one peer per
    stage (--kill-group too); with groups, --kill the longest-serving member once the group has another one (so
    it is a member loss, never the whole stage), --kill-group every member (and a newcomer copying one) once a
    spare waits as STANDBY to rebuild it (else a member of another group would move to rebuild it)."""
    members = held.get(kill.stage, [])
    if not members:
        return []
    if replicas == 1:  # one holder: --kill-group is --kill
        return [members[-1]]
    if kill.whole_group:
        if not _standby(nodes):
            return []
        return [*members, *(p for p in _joining(nodes, kill.stage) if p not in members)]
    return [members[0]] if len(members) >= 2 else []


def _stage_map(held: dict[int, list[Proc]], num_stages: int, replicas: int) -> str:
    if replicas == 1:
        return " ".join(f"{i}{'+' if i in held else 'x'}" for i in range(num_stages + 1))
    return " ".join(f"{i}:{len(held.get(i, []))}" for i in range(num_stages + 1))


@dataclass
class _Progress:
    last_step: int = 0
    last_step_ts: float = 0.0
    val: float | None = None


def _show_steps(bar: tqdm, progress: _Progress, steps: list[dict[str, Any]], held: dict[int, list[Proc]],
                nodes: list[Proc], options: DemoOptions) -> None:
    for e in steps:
        if e.get("val_loss") is not None:
            progress.val = e["val_loss"]
    if steps:
        progress.last_step_ts = max(progress.last_step_ts, steps[-1]["ts"])
    if steps and steps[-1]["step"] > progress.last_step:
        e = steps[-1]
        bar.update(e["step"] - progress.last_step)
        progress.last_step = e["step"]
        spares = sum(1 for p in nodes if p.alive()) - sum(len(m) for m in held.values())
        bar.set_postfix_str(f"loss {e['loss']:.3f} val {_fmt(progress.val)} {e['tokens_per_s']:.0f} tok/s "
                            f"stages {_stage_map(held, options.stages, options.replicas)} spares {spares}")


def _do_kill(swarm: Swarm, kill: Kill, targets: list[Proc], members_before: int, last_step: int, *,
             member_loss: bool) -> None:
    flag = "--kill-group" if kill.whole_group else "--kill"
    for victim in targets:
        logger.warning("%s %d@%d: SIGKILL of %s (pid %d), which holds stage %d", flag, kill.stage, kill.step,
                       victim.name, victim.popen.pid, kill.stage)
        signal_group(victim.popen.pid, signal.SIGKILL)
    swarm.kills.append({"stage": kill.stage, "at_step": kill.step, "killed_at_step": last_step, "ts": time.time(),
                        "node": targets[0].name, "nodes": [p.name for p in targets],
                        "whole_group": kill.whole_group, "members_before": members_before,
                        "member_loss": member_loss, "respawned": False})


def _replace(kill: dict[str, Any], nodes: list[Proc], starter: Starter) -> None:
    """Bring the swarm back to its size once the loss is dealt with (starting earlier would compete with the
    rebuild for CPU): after a rebuild one more spare, so later kills find one too, and with groups the members
    the stage lost; after a member loss (the group committed a step without it) one more member."""
    after = [e for p in nodes for e in read_events(p.events_path) if e["ts"] >= kill["ts"]]
    if kill["member_loss"]:
        if any(e["event"] == "step" for e in after):
            kill["respawned"] = True
            starter.member(kill["stage"])
        return
    if any(e["event"] == "recovery_finished" for e in after):
        kill["respawned"] = True
        starter.spare()
        if starter.replicas > 1:
            for _ in range(kill["members_before"] - 1):
                starter.member(kill["stage"])


def _follow(options: DemoOptions, swarm: Swarm, starter: Starter) -> int:
    bar = tqdm(total=options.steps, desc="training", unit="step", dynamic_ncols=True)
    progress = _Progress()
    pending = options.kill_plan()
    try:
        while True:
            nodes = [p for p in swarm.procs if p.events_path]
            held = groups(nodes)
            head = held[0][0] if held.get(0) else None
            events = _stage0_events(held.get(0, []))
            _show_steps(bar, progress, [e for e in events if e["event"] == "step"], held, nodes, options)
            while pending and progress.last_step >= pending[0].step:
                targets = victims(pending[0], held, nodes, options.replicas)
                if not targets:
                    break
                kill = pending.pop(0)
                _do_kill(swarm, kill, targets, len(held.get(kill.stage, [])), progress.last_step,
                         member_loss=options.replicas > 1 and not kill.whole_group)
                held = groups(nodes)
            for kill in swarm.kills:
                if not kill["respawned"]:
                    _replace(kill, nodes, starter)
            if any(e["event"] == "training_finished" for e in events):
                _warn_not_done(pending, options.replicas, progress.last_step)
                return 0
            if head is None and progress.last_step > 0 and _unrecoverable_reported(nodes, progress.last_step_ts):
                logger.error("stage 0 (embedding/head/data) is gone and cannot be rebuilt (it can with "
                             "--recovery checkfree+); the swarm cannot continue. Logs: %s", swarm.workdir)
                return EXIT_UNRECOVERABLE
            time.sleep(0.25)
    finally:
        bar.close()


def _warn_not_done(pending: list[Kill], replicas: int, last_step: int) -> None:
    for kill in pending:
        flag = "--kill-group" if kill.whole_group else "--kill"
        if kill.step > last_step:
            why = f"training ended at step {last_step}"
        elif replicas > 1:
            why = ("no spare waited as STANDBY to rebuild the stage" if kill.whole_group
                   else "the stage's group never had a second member again")
        else:
            why = "nobody held the stage"
        logger.warning("%s %d@%d was not done: %s", flag, kill.stage, kill.step, why)


def _stage0_events(members: list[Proc]) -> list[dict[str, Any]]:
    """What stage 0's driver reported, whichever member of its group drives (a follower takes over when the lead
    dies, and goes on from the step it holds): every member's events, in time order."""
    return sorted((e for p in members for e in read_events(p.events_path)), key=lambda e: e["ts"])


def _unrecoverable_reported(nodes: list[Proc], since: float) -> bool:
    """A live node reported, after the last committed step, that the swarm lost state it cannot rebuild (under
    checkfree+ a lost stage 0 is rebuilt instead, and nobody reports this)."""
    return any(e["event"] == "unrecoverable" and e["ts"] >= since
               for p in nodes if p.alive() for e in read_events(p.events_path))
